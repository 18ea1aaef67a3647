#!/usr/bin/env python3
"""End-to-end latency: from the last instance leaving the scanner to the results in the PACS.

    .venv/bin/python benchmarks/e2e.py [--runs 2] [--studies chest,brain,retina] [--device cpu]

The setup of tests/e2e: a scanner (dcmtk storescu) sends each demo study (a 300-slice 512x512
chest CT with five nodules, a four-sequence brain MRI, a retinal OCT volume) to Orthanc, the
hospital PACS, whose auto-routing (deploy/orthanc/autoroute.lua) forwards each instance to the
node as it arrives; the node runs the model and sends SEG, SR (and SC) back to Orthanc. One
study at a time, so no stage waits for another job.

Per study: seconds from the scanner's last instance sent (storescu returned) to the last
instance at the node, then to each stage the node records (complete, queued, started,
finished, sent), then to every result object listed by Orthanc's REST API, the median over
``--runs``. Beside them, the fixed waits of the anchors before they even start a model:
mercure's series completion (60 s without a new instance, its default) and Orthanc's stable
age (60 s, its default).

Prints a markdown report.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select

from dicomnode.app import build_node
from dicomnode.config import DEFAULT_ROUTES, Settings
from dicomnode.db.models import Instance, Series
from dicomnode.domain import FINAL_STATES
from dicomnode.phantoms.demo import demo_studies
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.peers import storescu
from dicomnode.testing.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
AUTOROUTE = REPO / "deploy" / "orthanc" / "autoroute.lua"
ANCHOR_WAIT_S = 60.0
STAGES = ("at node", "complete", "queued", "started", "finished", "sent", "in PACS")


def _node(root: Path, pacs: Orthanc, device: str) -> Any:
    routes = [route.model_copy(update={"destinations": ("pacs",)}) for route in DEFAULT_ROUTES]
    settings = Settings(
        node={"host": "127.0.0.1", "port": 0, "storage_dir": root / "node", "min_free_disk_mb": 1},
        api={"enabled": False},
        routes=routes,
        workers=[{"device": device, "models": ["lung_nodule", "brain_tumor", "oct_grading"]}],
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    )
    node = build_node(settings)
    node.start()
    return node


def _last_instance_at(node: Any, study_uid: str) -> datetime:
    from dicomnode.db.models import Study

    with node.database.sessions() as session:
        return session.scalar(
            select(func.max(Instance.received_at))
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.study_instance_uid == study_uid)
        )


def run_once(node: Any, pacs: Orthanc, study: Any, timeout: float = 900) -> dict[str, float]:
    before = {job.id for job in node.jobs.list(limit=1000)}
    sent = storescu(pacs.dicom_port, study.files, called_aet="ORTHANC")
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to Orthanc failed: {sent.stderr[-300:]}")
    t0 = time.time()
    deadline = time.monotonic() + timeout

    def ended() -> list[Any]:
        jobs = [j for j in node.jobs.list(limit=1000) if j.id not in before]
        return jobs if jobs and all(j.state in FINAL_STATES for j in jobs) else []

    job = wait_until(ended, timeout=timeout, what=f"{study.name}'s job to end")[0]
    if job.state.value != "done":
        raise RuntimeError(f"{study.name}: job did not finish: {job}")
    wanted = {o["sop_instance_uid"] for o in job.result["objects"]}
    wait_until(
        lambda: (
            wanted <= {i["SOPInstanceUID"] for i in pacs.study_instances(study.study_instance_uid)}
        ),
        timeout=max(0.0, deadline - time.monotonic()),
        interval=0.1,
        what=f"{study.name}'s results in the PACS",
    )
    in_pacs = time.time()
    stamps = {
        "at node": _last_instance_at(node, study.study_instance_uid).timestamp(),
        "complete": job.completed_at.timestamp(),
        "queued": job.queued_at.timestamp(),
        "started": job.started_at.timestamp(),
        "finished": job.finished_at.timestamp(),
        "sent": job.sent_at.timestamp() if job.sent_at else float("nan"),
        "in PACS": in_pacs,
    }
    return {stage: stamps[stage] - t0 for stage in STAGES} | {
        "predict": float(job.result.get("timing_s", {}).get("predict", float("nan"))),
        "results": float(job.result.get("timing_s", {}).get("results", float("nan"))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--studies", default="chest,brain,retina")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.studies.split(",") if n.strip()]
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pacs = Orthanc(root / "orthanc", lua_scripts=[AUTOROUTE], sync_storage=False)
        node = _node(root, pacs, args.device)
        pacs.modalities["dicomnode"] = ("DICOMNODE", "127.0.0.1", node.receiver.address[1])
        pacs.start()
        try:
            for run in range(args.runs):
                for study in demo_studies(root / f"run{run}", names, seed=run):
                    rows.setdefault(study.name, []).append(run_once(node, pacs, study))
                    print(f"  {study.name} run {run}: {rows[study.name][-1]['in PACS']:.1f} s",
                          file=sys.stderr)  # fmt: skip
        finally:
            node.stop()
            pacs.stop(graceful=False)
    header = "| study | " + " | ".join(STAGES) + " | of which model | of which results |"
    lines = [
        f"# End to end, {date.today()}, {platform.machine()}, device {args.device}", "",
        "Seconds after the scanner's last instance was sent (median of "
        f"{args.runs}); each column is when that stage ended.", "",
        header, "|" + "---|" * (len(STAGES) + 3),
    ]  # fmt: skip
    for name, runs in rows.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        cells = " | ".join(f"{median[s]:.1f}" for s in STAGES)
        lines.append(f"| {name} | {cells} | {median['predict']:.1f} | {median['results']:.1f} |")
    lines += [
        "",
        f"Anchors: mercure waits {ANCHOR_WAIT_S:.0f} s without a new instance before it "
        f"calls a series complete, Orthanc {ANCHOR_WAIT_S:.0f} s before a study is stable; "
        "either alone is longer than the whole path above.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
