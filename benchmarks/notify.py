#!/usr/bin/env python3
"""Notification benchmark: from a job's finish to its messages at the RIS (HL7 ORU^R01 over
MLLP) and at a webhook, beside the C-STORE of the same job's SEG and SR to a PACS, in one run.

    .venv/bin/python -P benchmarks/notify.py [--slices 100] [--runs 10] [--out DIR]

Each run finishes one job through ``JobRepository.finish`` (the transaction that writes its
sends and its notifications) with a critical nodule, while the node's sender and notifier run
idle as in ``serve`` (woken by the commit, else polling every 0.5 s), on SQLite, all on
loopback. Measured from just before ``finish`` to when each peer has the message whole:

- RIS: the MLLP listener (dicomnode.testing.mllp) has the ORU block (it parses it strictly as
  HL7 v2.5 afterwards, and ACKs it);
- webhook: the HTTP receiver (dicomnode.testing.http_peers) has the POST's body;
- PACS (the peer baseline): dcmtk's storescp has written the last of the job's objects (its
  file's modification time), a highdicom SEG and a TID 1500 SR on a ``--slices`` 512x512 CT.

A run counts only if the RIS took an ORU with the job's control id, the webhook the job's
Idempotency-Key, and the PACS both objects.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}


def index_study(sessions: Any, study_uid: str) -> None:
    """The CT's study in the index, as the receiver would have filed it."""
    from dicomnode.db.models import Patient, Study

    now = datetime.now(UTC)
    with sessions.begin() as session:
        patient = Patient(patient_id="BENCH-1", issuer_of_patient_id="", sex="O",
                          patient_name="Bench^Mark", birth_date="19600101")  # fmt: skip
        session.add(patient)
        session.flush()
        session.add(Study(study_instance_uid=study_uid, patient_pk=patient.id,
                          study_date="20261207", study_time="101500", study_id="1",
                          accession_number="ACC-BENCH", study_description="CT chest",
                          referring_physician_name="", first_received_at=now,
                          last_received_at=now))  # fmt: skip


def arrived(folder: Path, uids: set[str]) -> float | None:
    """When storescp had written the last of ``uids`` (None while one is missing)."""
    from pydicom import dcmread

    times = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size:
            try:
                uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            except Exception:
                continue  # still being written
            times[uid] = path.stat().st_mtime
    return max(times[u] for u in uids) if uids <= set(times) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, help="keep the series, objects and database here")
    args = parser.parse_args(argv)

    from dicomnode.db import make_engine, make_session_factory, upgrade
    from dicomnode.testing.http_peers import WebhookReceiver
    from dicomnode.testing.mllp import MllpListener
    from dicomnode.testing.peers import storescp
    from dicomnode.testing.result_objects import write_result_objects

    sys.path.insert(0, str(Path(__file__).parent))
    from results_send import generate

    keep = args.out is not None
    workdir = args.out.resolve() if keep else Path(tempfile.mkdtemp(prefix="notify-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started_all = time.monotonic()
    samples: dict[str, list[float]] = {"RIS (HL7 over MLLP)": [], "webhook (JSON POST)": [],
                                       "PACS (C-STORE of SEG + SR)": []}  # fmt: skip
    try:
        ct = generate(workdir / "ct", args.slices)
        storage = workdir / "storage"
        shutil.rmtree(storage, ignore_errors=True)
        objects = write_result_objects(ct, storage, 1, kinds=("SEG", "SR"))
        sizes = {o["kind"]: (storage / o["path"]).stat().st_size / 1e6 for o in objects}
        study = objects[0]["study_instance_uid"]
        db = workdir / "bench.db"
        db.unlink(missing_ok=True)
        engine = make_engine(f"sqlite:///{db}")
        upgrade(engine)
        sessions = make_session_factory(engine)
        index_study(sessions, study)
        with MllpListener() as ris, WebhookReceiver() as hook:
            for run in range(args.runs):
                pacs_folder = workdir / f"pacs-{run}"
                shutil.rmtree(pacs_folder, ignore_errors=True)
                with storescp(pacs_folder, ae_title="PACS") as pacs_port:
                    times = one_run(sessions, storage, objects, study, run, pacs_folder,
                                    pacs_port, ris, hook)  # fmt: skip
                for name, seconds in zip(samples, times, strict=True):
                    samples[name].append(seconds)
                print(f"  run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
        engine.dispose()
        print(render(args, samples, sizes, time.monotonic() - started_all))
        return 0
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def one_run(
    sessions: Any, storage: Path, objects: list[dict[str, str]], study: str, run: int,
    pacs_folder: Path, pacs_port: int, ris: Any, hook: Any,
) -> tuple[float, float, float]:  # fmt: skip
    """Finish one job; seconds until the RIS, the webhook and the PACS had it."""
    from dicomnode.config import Settings
    from dicomnode.domain import JobState
    from dicomnode.notify.notifier import Notifier
    from dicomnode.queue import JobRepository
    from dicomnode.queue.notifications import NotificationQueue
    from dicomnode.queue.outcomes import ReleasePolicy
    from dicomnode.send.sender import Sender
    from dicomnode.testing.peers import LOOPBACK
    from dicomnode.testing.waiting import wait_until

    uids = {o["sop_instance_uid"] for o in objects}
    settings = Settings(
        routes=[{"name": "chest", "model": "bench", "destinations": ["pacs"],
                 "critical": {"label": "nodule", "min_diameter_mm": 8}}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs_port}],
        notifications=[
            {"name": "ris", "kind": "hl7", "host": LOOPBACK, "port": ris.port,
             "events": ["done"]},
            {"name": "hook", "kind": "webhook", "url": hook.url, "events": ["critical"]}],
    )  # fmt: skip
    jobs = JobRepository(sessions, settings.queue, policy=ReleasePolicy.from_settings(settings))
    sender = Sender(sessions, jobs, settings.destinations, storage, poll_s=0.5)
    notifier = Notifier(sessions, settings.notifications, poll_s=0.5)
    job = jobs.enqueue(dedupe_key=f"bench/{run}", route="chest", model="bench",
                       study_instance_uid=study, destinations=["pacs"],
                       state=JobState.QUEUED)  # fmt: skip
    assert jobs.claim("bench", ["bench"]) is not None
    sender.start()
    notifier.start()
    time.sleep(1.0)  # both idle, as in a running node
    try:
        result = {"model": "bench", "version": "1", "demo": True, "objects": objects,
                  "findings": [{"label": "nodule", "finding_type": NODULE,
                                "probability": 0.93, "diameter_mm": 9.1}]}  # fmt: skip
        t0 = time.time()
        jobs.finish(job.id, "bench", result)
        keys = {r.notification: r.delivery_key for r in NotificationQueue(sessions).for_job(job.id)}
        got_ris = wait_until(lambda: ris.accepted.get(keys["ris"]), timeout=60, interval=0.005,
                             what="the ORU at the RIS")  # fmt: skip
        got_hook = wait_until(lambda: hook.peer.taken().get(keys["hook"]), timeout=60,
                              interval=0.005, what="the webhook")  # fmt: skip
        got_pacs = wait_until(lambda: arrived(pacs_folder, uids), timeout=60, interval=0.02,
                              what="SEG and SR at the PACS")  # fmt: skip
        wait_until(lambda: (j := jobs.get(job.id)) and j.state is JobState.DONE, timeout=60,
                   what="the job done")  # fmt: skip
    finally:
        notifier.stop()
        sender.stop()
    return got_ris.at - t0, got_hook.at - t0, got_pacs - t0


def render(
    args: argparse.Namespace, samples: dict[str, list[float]], sizes: dict[str, float],
    total_s: float,
) -> str:  # fmt: skip
    from importlib.metadata import version

    pacs = statistics.median(samples["PACS (C-STORE of SEG + SR)"])
    lines = [
        f"- date: {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
        f"python {platform.python_version()}, hl7apy {version('hl7apy')}, "
        f"fhir.resources {version('fhir.resources')}, httpx {version('httpx')}, "
        f"pynetdicom {version('pynetdicom')}",
        f"- command: `.venv/bin/python -P benchmarks/notify.py --slices {args.slices} "
        f"--runs {args.runs}` (took {total_s:.0f} s)",
        f"- objects sent to the PACS: SEG {sizes.get('SEG', 0):.2f} MB (on a {args.slices}-slice "
        f"512x512 CT), SR {sizes.get('SR', 0) * 1000:.0f} kB",
        "",
        "| from the job's finish to | median ms | min ms | max ms | / PACS |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1000:.0f} | {min(values) * 1000:.0f} | "
                     f"{max(values) * 1000:.0f} | {median / pacs:.2f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
