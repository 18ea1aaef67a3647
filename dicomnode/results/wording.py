"""How a finding is named and summed up in words, the same on the key images and in the SR
(the label OHIF lists a measurement under)."""

from __future__ import annotations

from collections.abc import Sequence

from dicomnode.domain import Finding

#: ICDR grades, short
ICDR_SHORT = {0: "No DR", 1: "Mild NPDR", 2: "Moderate NPDR", 3: "Severe NPDR", 4: "PDR"}
#: at least this many mm3: shown in mL
ML_FROM_MM3 = 10_000.0


def finding_names(findings: Sequence[Finding]) -> list[str]:
    """Each finding's short name: its label in words, numbered where the label repeats
    (``Nodule 1``, ``Nodule 2``, ``Enhancing tumor``)."""
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.label] = counts.get(finding.label, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for finding in findings:
        words = finding.label.replace("_", " ").strip() or finding.finding_type.meaning
        if "grade" in (finding.attributes or {}):  # indeterminate: grade None
            words = finding.finding_type.meaning  # "Diabetic retinopathy", not "dr grade"
        words = words[:1].upper() + words[1:]
        if counts[finding.label] > 1:
            seen[finding.label] = seen.get(finding.label, 0) + 1
            words = f"{words} {seen[finding.label]}"
        names.append(words)
    return names


def finding_text(finding: Finding, name: str) -> str:
    """One line of a finding's numbers, e.g. ``Nodule 1: 12.3 mm, 905 mm3, p=0.91``, ``Diabetic
    retinopathy grade 3 (Severe NPDR), p=0.85``; an indeterminate finding says so and never
    names a grade (``Diabetic retinopathy: indeterminate (grade probabilities 0: 0.55, ...)``)."""
    probability = f"p={float(finding.probability):.2f}"
    attributes = finding.attributes or {}
    if finding.indeterminate:
        listed = attributes.get("probabilities")
        if isinstance(listed, list | tuple) and listed:
            shown = ", ".join(f"{n}: {float(p):.2f}" for n, p in enumerate(listed))
            return f"{name}: indeterminate (grade probabilities {shown})"
        return f"{name}: indeterminate, {probability}"
    grade = attributes.get("grade")
    if grade is not None:
        scale = str(attributes.get("scale", "ICDR"))
        try:
            short = ICDR_SHORT.get(int(grade)) if scale.upper() == "ICDR" else None
        except (TypeError, ValueError):
            short = None
        words = f" ({short})" if short else ""
        return f"{finding.finding_type.meaning} grade {grade}{words}, {probability}"
    parts = []
    if finding.diameter_mm is not None:
        parts.append(f"{float(finding.diameter_mm):.1f} mm")
    if finding.volume_mm3 is not None:
        volume = float(finding.volume_mm3)
        parts.append(f"{volume / 1000:.1f} mL" if volume >= ML_FROM_MM3 else f"{volume:.0f} mm3")
    if not parts and finding.mask is None and finding.centre_mm is None:
        parts.append("present")
    return f"{name}: {', '.join([*parts, probability])}"
