"""What every notification says, whatever its protocol: a finding in words, the outcome in one
line, and the variables a webhook's body template may name. Read from a notification's
``context`` (:func:`dicomnode.queue.notifications.job_context`), so every attempt says the
same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def finding_name(finding: Mapping[str, Any]) -> str:
    """Its finding type's meaning (its label when it has none)."""
    meaning = (finding.get("finding_type") or {}).get("meaning")
    return str(meaning or finding.get("label") or "finding")


def finding_numbers(finding: Mapping[str, Any]) -> list[str]:
    """Its measurements in words: ``diameter 9.1 mm``, ``volume 412 mm3``, ``grade 3
    (severe NPDR)``, ``probability 0.93``; ``indeterminate`` when the model could not decide."""
    attributes = finding.get("attributes") or {}
    words = []
    if (diameter := _number(finding.get("diameter_mm"))) is not None:
        words.append(f"diameter {diameter:.1f} mm")
    if (volume := _number(finding.get("volume_mm3"))) is not None:
        words.append(f"volume {volume:.0f} mm3")
    if (grade := _number(attributes.get("grade"))) is not None:
        meaning = attributes.get("grade_meaning")
        words.append(f"grade {grade:g}" + (f" ({meaning})" if meaning else ""))
    if attributes.get("indeterminate") is True:
        words.append("indeterminate")
    if (probability := _number(finding.get("probability"))) is not None:
        words.append(f"probability {probability:.2f}")
    return words


def describe_finding(finding: Mapping[str, Any]) -> str:
    """One finding in a line: ``Nodule: diameter 9.1 mm, probability 0.93; CRITICAL
    (diameter 9.1 mm >= 8 mm)``."""
    text = f"{finding_name(finding)}: {', '.join(finding_numbers(finding)) or 'present'}"
    if finding.get("critical"):
        text += f"; CRITICAL ({', '.join(finding.get('critical_reasons') or ())})"
    return text


def model_line(context: Mapping[str, Any]) -> str:
    """``lung_nodule 0.1.0 (demo weights, not for clinical use)``."""
    result = context.get("result") or {}
    line = " ".join(p for p in (str(result.get("model") or ""), str(result.get("version") or ""))
                    if p)  # fmt: skip
    if result.get("demo"):
        line += " (demo weights, not for clinical use)"
    if result.get("envelope_inside") is False:
        line += " (input outside the model's validated envelope)"
    return line


def summary(context: Mapping[str, Any]) -> str:
    """The outcome in one line: the model, how many findings and how many critical, each
    positive finding briefly; or why the job failed."""
    job = context.get("job") or {}
    if context.get("event") == "failed":
        return f"{job.get('model')} failed: {job.get('error') or 'no reason recorded'}"
    findings = context.get("findings") or []
    shown = [f for f in findings if f.get("positive")]
    critical = sum(bool(f.get("critical")) for f in findings)
    head = f"{model_line(context)}: "
    if not findings:
        return head + "no findings"
    head += f"{len(findings)} finding{'s' if len(findings) != 1 else ''}"
    head += f", {critical} critical" if critical else ""
    brief = [
        f"{finding_name(f)} {', '.join(finding_numbers(f)[:1])}".strip()
        + (" (critical)" if f.get("critical") else "")
        for f in shown
    ]
    return head + (": " + "; ".join(brief) if brief else "")


def variables(context: Mapping[str, Any], delivery_id: str) -> dict[str, Any]:
    """The values of a webhook template's variables, each a JSON value: the names are
    :data:`dicomnode.config.TEMPLATE_VARIABLES`, which the config checks templates against."""
    job = context.get("job") or {}
    study = context.get("study") or {}
    result = context.get("result") or {}
    outcome = context.get("outcome") or {}
    findings = list(context.get("findings") or ())
    critical = [f for f in findings if f.get("critical")]
    return {
        "event": context.get("event"),
        "at": context.get("at"),
        "delivery_id": delivery_id,
        "job_id": job.get("id"),
        "route": job.get("route"),
        "model": result.get("model") or job.get("model"),
        "model_version": result.get("version"),
        "demo": bool(result.get("demo")),
        "state": job.get("state"),
        "error": job.get("error"),
        "study_instance_uid": job.get("study_instance_uid"),
        "accession_number": study.get("accession_number"),
        "patient_id": study.get("patient_id"),
        "patient_name": study.get("patient_name"),
        "study_description": study.get("study_description"),
        "study_date": study.get("study_date"),
        "modalities": list(study.get("modalities") or ()),
        "findings": findings,
        "findings_count": len(findings),
        "positive": bool(outcome.get("positive")),
        "critical": critical,
        "critical_count": len(critical),
        "summary": summary(context),
        "sent": bool(outcome.get("send", False)),
    }
