"""``dicomnode demo``: phantom studies in, a running node's findings out.

It writes the demo studies (a chest CT, a brain MRI, a retinal OCT; ``dicomnode.phantoms.demo``),
sends each to the node over C-STORE, follows their jobs through the node's HTTP API until each
ends, and says what the node found next to the phantom's truth, and where the results went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.errors import DemoFailed

FINAL = frozenset({"done", "failed", "cancelled", "skipped"})


@dataclass
class DemoOutcome:
    """One study: what was sent, the jobs it made, and how long until they ended."""

    name: str
    model: str
    study_instance_uid: str
    expected: str
    instances: int
    sent_s: float
    jobs: list[dict[str, Any]] = field(default_factory=list)
    waited_s: float | None = None  # from the last instance sent to the last job's end


class Api:
    """The node's HTTP API with its bearer token."""

    def __init__(self, url: str, token: str = "", timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def get(self, path: str, **params: Any) -> Any:
        response = self.client.get(path, params=params)
        if response.status_code == 401:
            raise DemoFailed(f"the node's API refused the token (401) at {self.client.base_url}")
        response.raise_for_status()
        return response.json()


def run_demo(
    destination: Any,  # dicomnode.send.scu.Destination
    api: Api,
    folder: Path,
    *,
    names: Sequence[str],
    timeout_s: float = 600.0,
    calling_aet: str = "DEMO",
    say: Callable[[str], None] = print,
) -> list[DemoOutcome]:
    """Write, send and follow the demo studies; one outcome per study."""
    import logging

    from dicomnode.phantoms.demo import demo_studies
    from dicomnode.send.scu import send_files

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll is noise here
    try:
        api.get("/api/health")
    except Exception as exc:
        raise DemoFailed(f"the node's API does not answer at {api.client.base_url}: {exc}") from exc
    say(f"writing the demo studies ({', '.join(names)}) into {folder}")
    outcomes = []
    for study in demo_studies(folder, names):
        started = time.monotonic()
        results = send_files(study.files, destination, calling_aet=calling_aet)
        failed = [r for r in results if not r.ok]
        if failed:
            raise DemoFailed(
                f"{destination} refused {len(failed)} of {len(results)} instances of the "
                f"{study.name} study: {failed[0].error or hex(failed[0].status or 0)}"
            )
        outcome = DemoOutcome(
            study.name, study.model, study.study_instance_uid, study.expected,
            len(results), time.monotonic() - started,
        )  # fmt: skip
        say(f"sent the {study.name} study: {len(results)} instances in {outcome.sent_s:.1f} s")
        outcomes.append((outcome, time.monotonic()))
    deadline = time.monotonic() + timeout_s
    for outcome, sent_at in outcomes:
        outcome.jobs = _follow(api, outcome.study_instance_uid, deadline)
        outcome.waited_s = time.monotonic() - sent_at if outcome.jobs else None
    return [outcome for outcome, _ in outcomes]


def _follow(api: Api, study_uid: str, deadline: float) -> list[dict[str, Any]]:
    """The study's jobs once every one has ended (with their details), or as they are at the
    deadline."""
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        jobs = api.get("/api/jobs", study=study_uid, limit=100)["jobs"]
        if jobs and all(job["state"] in FINAL for job in jobs):
            break
        time.sleep(0.5)
    return [api.get(f"/api/jobs/{job['id']}") for job in jobs]


def describe(outcome: DemoOutcome) -> list[str]:
    """What the node found for one study, and where the results went, in words."""
    count = f"{outcome.instances} instance{'s' if outcome.instances != 1 else ''}"
    lines = [f"{outcome.name}: {count}, study {outcome.study_instance_uid}"]
    lines.append(f"  truth:    {outcome.expected}")
    if not outcome.jobs:
        lines.append("  no job yet: is a route matching it configured? (dicomnode route explain)")
        return lines
    for job in outcome.jobs:
        took = f" {outcome.waited_s:.1f} s after the last instance" if outcome.waited_s else ""
        lines.append(f"  job {job['id']} ({job['model']}, route {job['route']}): {job['state']}"
                     f"{took}")  # fmt: skip
        if job.get("error"):
            lines.append(f"  error:    {job['error']}")
        result = job.get("result") or {}
        lines += [f"  found:    {text}" for text in _findings(result)]
        if result.get("demo"):
            lines.append("            (demo weights, trained on phantoms: not for clinical use)")
        objects = ", ".join(o["kind"] for o in result.get("objects", []))
        sends = job.get("sends") or []
        if sends:
            by_destination: dict[str, list[str]] = {}
            for send in sends:
                by_destination.setdefault(send["destination"], []).append(
                    f"{send['kind']} {send['state']}"
                )
            for name, states in by_destination.items():
                lines.append(f"  sent to:  {name}: {', '.join(states)}")
        elif objects:
            lines.append(f"  results:  {objects} kept in the node (results/{job['id']}/dicom; "
                         "no destination on this route)")  # fmt: skip
    return lines


def _findings(result: dict[str, Any]) -> list[str]:
    findings = result.get("findings") or []
    summary = result.get("summary") or {}
    if not findings:
        return ["nothing"]
    lines = []
    for finding in findings:
        attributes = finding.get("attributes") or {}
        parts = [finding["label"].replace("_", " ")]
        if attributes.get("indeterminate"):
            meaning = (finding.get("finding_type") or {}).get("meaning") or finding["label"]
            parts = [f"{meaning}: indeterminate"]
        elif "grade" in attributes:
            meaning = (finding.get("finding_type") or {}).get("meaning") or "grade"
            parts = [f"{meaning} grade {attributes['grade']}"]
            if summary.get("grade_meaning"):
                parts.append(f"({summary['grade_meaning']})")
        if finding.get("diameter_mm") is not None:
            parts.append(f"{finding['diameter_mm']:.1f} mm")
        if finding.get("volume_mm3") is not None:
            parts.append(f"{finding['volume_mm3'] / 1000:.2f} mL")
        if finding.get("probability") is not None:
            parts.append(f"p={finding['probability']:.2f}")
        if finding.get("centre_mm"):
            parts.append("at (" + ", ".join(f"{v:.0f}" for v in finding["centre_mm"]) + ") mm")
        lines.append(" ".join(parts))
    return lines
