#!/usr/bin/env python3
"""Completion you can trust, and what it costs: release -> results in the PACS.

    .venv/bin/python benchmarks/completion.py [--runs 2] [--slices 120] [--confirm 10]

A chest CT (the lung model, CPU) is sent by storescu straight to the node, which sends its SEG
and SR to Orthanc. Scenarios, one node each, in one run:

- ``whole, provisional``: one association; complete at its release (contiguous stack), the job
  starts at once, its results are held until ``--confirm`` s after the last instance;
- ``whole, sender declared``: the same from an AE in ``whole_series_senders``: no window;
- ``split 2 s``: two associations 2 s apart; the first half's run is superseded, the whole
  series runs after the second release and is held for the window;
- ``wait, then run`` (the peers' way, mercure's and Orthanc's stable age): no release rule; the
  series completes after ``--confirm`` s of silence and only then runs.

Per scenario: seconds from the last storescu returning to the job's completion, start, end of
run, send, and the results listed by Orthanc (median of ``--runs``); the ratio of ``in PACS`` to
the wait-then-run anchor measured in the same run. Prints a markdown table.
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
from datetime import date
from typing import Any

from dicomnode.app import build_node
from dicomnode.config import Settings
from dicomnode.domain import FINAL_STATES, JobState
from dicomnode.phantoms.chest import chest_ct
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.peers import storescu
from dicomnode.testing.waiting import wait_until

STAGES = ("complete", "started", "finished", "sent", "in PACS")
SCENARIOS = ("whole, provisional", "whole, sender declared", "split 2 s", "wait, then run")
SENDER = "CTSCANNER"


def _node(root: Path, pacs: Orthanc, scenario: str, confirm_s: float) -> Any:
    completion: dict[str, Any] = {"quiet_s": 60, "release_grace_s": 1, "confirm_s": confirm_s}
    if scenario == "whole, sender declared":
        completion["whole_series_senders"] = [SENDER]
    if scenario == "wait, then run":
        completion = {"quiet_s": confirm_s, "release_grace_s": 3600, "expected_counts": False,
                      "confirm_s": 0}  # fmt: skip
    settings = Settings(
        node={"host": "127.0.0.1", "port": 0, "storage_dir": root / "node", "min_free_disk_mb": 1},
        api={"enabled": False},
        routes=[
            {
                "name": "chest",
                "model": "lung_nodule",
                "match": {"Modality": "CT"},
                "destinations": ["pacs"],
                "completion": completion,
            }
        ],
        workers=[{"models": ["lung_nodule"]}],
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    )
    node = build_node(settings)
    node.start()
    return node


def run_once(node: Any, pacs: Orthanc, files: list[Path], scenario: str) -> dict[str, float]:
    port = node.receiver.address[1]
    parts = [files[: len(files) // 2], files[len(files) // 2 :]] if "split" in scenario else [files]
    for number, part in enumerate(parts):
        if number:
            time.sleep(2.0)  # the sender's pause between the parts
        sent = storescu(port, part, calling_aet=SENDER)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-300:]}")
    t0 = time.time()

    def ended() -> list[Any]:
        jobs = node.jobs.list(limit=100)
        done = [j for j in jobs if j.state is JobState.DONE]
        return done if done and all(j.state in FINAL_STATES for j in jobs) else []

    (job,) = wait_until(ended, timeout=600, what="the job to end")
    wanted = {o["sop_instance_uid"] for o in job.result["objects"]}
    study = job.study_instance_uid
    wait_until(
        lambda: wanted <= {i["SOPInstanceUID"] for i in pacs.study_instances(study)},
        timeout=60, interval=0.1, what="the results in the PACS",
    )  # fmt: skip
    in_pacs = time.time()
    stamps = {
        "complete": job.completed_at.timestamp(),
        "started": job.started_at.timestamp(),
        "finished": job.finished_at.timestamp(),
        "sent": job.sent_at.timestamp(),
        "in PACS": in_pacs,
    }
    return {stage: stamps[stage] - t0 for stage in STAGES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--confirm", type=float, default=10.0)
    args = parser.parse_args(argv)
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for run in range(args.runs):
            phantom = chest_ct((args.slices, 256, 256), (1.2, 1.2, 2.0), nodules=2,
                               seed=7100 + run, sizes=(8.0, 14.0))  # fmt: skip
            files = sorted(phantom.write(root / f"ct{run}"))
            for scenario in SCENARIOS:
                case = root / f"{run}-{SCENARIOS.index(scenario)}"
                pacs = Orthanc(case / "orthanc", sync_storage=False).start()
                node = _node(case, pacs, scenario, args.confirm)
                try:
                    rows.setdefault(scenario, []).append(run_once(node, pacs, files, scenario))
                finally:
                    node.stop()
                    pacs.stop(graceful=False)
                print(f"  {scenario} run {run}: {rows[scenario][-1]['in PACS']:.1f} s",
                      file=sys.stderr)  # fmt: skip
    median = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in rows.items()
    }
    anchor = median["wait, then run"]["in PACS"]
    lines = [
        f"# Completion latency, {date.today()}, {platform.machine()}, CPU, "
        f"{args.slices}-slice CT, confirm_s {args.confirm:g}",
        "",
        "Seconds after the sender's last association returned (median of "
        f"{args.runs}); each column is when that stage ended.",
        "",
        "| scenario | " + " | ".join(STAGES) + " | in PACS / wait-then-run |",
        "|" + "---|" * (len(STAGES) + 2),
    ]
    for name, values in median.items():
        cells = " | ".join(f"{values[s]:.1f}" for s in STAGES)
        lines.append(f"| {name} | {cells} | {values['in PACS'] / anchor:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
