"""``dicomnode route explain``: which route DICOM files take and why each other route does
not, as a JSON-ready report and as the lines the CLI prints."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.routing import Outcome, Router, SeriesFacts

if TYPE_CHECKING:
    from dicomnode.envelope import Envelope


def explain_files(
    router: Router,
    files: Iterable[Path],
    *,
    calling_aet: str | None = None,
    envelopes: Mapping[str, tuple[Envelope, str]] | None = None,
) -> dict[str, Any]:
    """Each series among ``files`` (files or folders) with the route it takes and every rule's
    verdict, and the files that could not be read (``{"series": [...], "errors": [...]}``).
    ``envelopes``: route name -> its model's envelope and the route's policy; each chosen
    route then says whether the series is inside (from the headers alone)."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    from dicomnode.send.scu import expand

    series: dict[str, dict[str, Dataset]] = {}  # Series Instance UID -> SOP Instance UID -> header
    errors = []
    for path in expand(files):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            uid = str(ds.get("SeriesInstanceUID") or "").strip()
            sop = str(ds.get("SOPInstanceUID") or "").strip() or str(path)
        except Exception as exc:  # whatever is wrong with one file is reported, not a crash
            error = f"not readable: {exc or type(exc).__name__}"
            errors.append({"path": str(path), "error": error})
            continue
        if not uid:
            errors.append({"path": str(path), "error": "has no Series Instance UID"})
            continue
        series.setdefault(uid, {}).setdefault(sop, ds)
    reports = []
    for uid, instances in series.items():
        facts = SeriesFacts.from_datasets(list(instances.values()), calling_aet=calling_aet)
        decision = router.route(facts)
        routes: list[dict[str, Any]] = [
            {
                "name": r.name,
                "model": r.model,
                "destinations": list(r.destinations),
                "priority": r.priority.name.lower(),
                "level": r.level,
            }
            for r in decision.routes
        ]
        for route in routes:
            if envelopes and route["name"] in envelopes:
                from dicomnode.pipeline.envelope import Acquisition, check_envelope

                envelope, policy = envelopes[route["name"]]
                headers = list(instances.values())
                verdict = check_envelope(envelope, [Acquisition.of_headers(headers)])
                route["envelope"] = verdict.as_json(policy)
        reports.append(
            {
                "series_instance_uid": uid,
                "modality": facts.attributes.get("Modality", ""),
                "series_description": facts.attributes.get("SeriesDescription", ""),
                "slices": facts.slices,
                "calling_aet": facts.calling_aet,
                "decision": {"basis": decision.basis, "routes": routes},
                "rules": [asdict(rule) for rule in router.explain(facts)],
            }
        )
    return {"series": reports, "errors": errors}


def report_lines(report: dict[str, Any], router: Router) -> tuple[list[str], list[str]]:
    """The report as text: the lines for standard output, and those for standard error (the
    files not read, and a count)."""
    marks = {Outcome.MATCH: "yes", Outcome.NO_MATCH: "no", Outcome.PENDING: "?"}
    width = max((len(rule.name) for rule in router.rules), default=0)
    out: list[str] = []
    for series in report["series"]:
        description = f" {series['series_description']!r}" if series["series_description"] else ""
        out.append(
            f"series {series['series_instance_uid']}: {series['modality'] or '?'}{description}, "
            f"{series['slices']} instance(s)"
        )
        for route in series["decision"]["routes"]:
            out.append(
                f"  -> {route['name']}: model {route['model']}, priority {route['priority']}, "
                f"to {', '.join(route['destinations']) or '(no destinations)'} "
                f"[{series['decision']['basis']}]"
            )
            envelope = route.get("envelope")
            if envelope is not None and envelope["inside"]:
                out.append("     inside the model's acquisition envelope")
            elif envelope is not None:
                action = "run and flagged" if envelope["policy"] == "flag" else "refused"
                out.append(f"     outside the model's acquisition envelope ({action}):")
                out.extend(f"       {reason}" for reason in envelope["reasons"])
        if not series["decision"]["routes"]:
            out.append("  -> no route matches: the series is skipped")
        for rule in series["rules"]:
            state = "chosen" if rule["chosen"] else "-"
            # the failing conditions follow, one a line: not repeated in the headline
            failed = "; ".join(
                c["text"] for c in rule["conditions"] if c["outcome"] == Outcome.NO_MATCH
            )
            headline = rule["reason"].removesuffix(f": {failed}") if failed else rule["reason"]
            out.append(f"  {state:<6}  {rule['route']:<{width}}  {headline}")
            for condition in rule["conditions"]:
                mark = marks[condition["outcome"]]
                out.append(f"  {'':<6}  {'':<{width}}    {mark:<3} {condition['text']}")
    if not router.rules:
        out.append("no routes are configured ([[routes]] in the config file)")
    err = [f"dicomnode: {error['path']}: {error['error']}" for error in report["errors"]]
    err.append(f"{len(report['series'])} series, {len(report['errors'])} file(s) not read")
    return out, err
