#!/usr/bin/env python3
"""Send benchmark: one job's SEG and SR to Orthanc through the send queue, next to dcmtk's
storescu sending the same files to the same Orthanc, in one run.

    .venv/bin/python -P benchmarks/results_send.py [--slices 300] [--runs 5] [--out DIR]

The objects are a highdicom binary SEG (a block over a third of the slices) and a TID 1500
Comprehensive 3D SR on a generated ``--slices`` slice 512x512 CT: what one lung job sends. Each run
starts a fresh Orthanc (fsyncing each file, its default) and measures, on loopback:

- queue, C-STORE: from ``JobRepository.finish`` (which creates the send rows) until the job is
  ``done`` (every row sent and settled), with an idle sender as ``serve`` runs it (woken by the
  commit of new sends, else polling every 0.5 s), on SQLite;
- our SCU alone (``send_files``, one association), no queue;
- storescu: the same files, from its start to its exit 0;
- queue, STOW-RS: to Orthanc's DICOMweb plugin, finish to ``done``.

A run counts only if Orthanc then lists both objects under the source study.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROWS = COLUMNS = 512


def generate(folder: Path, slices: int) -> list[Path]:
    """Write (or reuse) the CT series."""
    from dicomnode.phantoms.simple import SeriesSpec, ct_slices
    from dicomnode.phantoms.writer import write_series

    marker = folder / "complete.json"
    spec = {"slices": slices, "rows": ROWS, "columns": COLUMNS}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return sorted(folder.glob("*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    paths = write_series(
        ct_slices(SeriesSpec(slices=slices, rows=ROWS, columns=COLUMNS, seed=7)), folder
    )
    marker.write_text(json.dumps(spec))
    return paths


def queue_send(
    workdir: Path,
    ct: Sequence[Path],
    objects: list[dict[str, str]],
    storage: Path,
    destination: dict[str, Any],
    poll_s: float,
) -> float:
    """Finish a job with ``objects`` and return the seconds until it is ``done``."""
    from pydicom import dcmread

    from dicomnode.config import DestinationSettings, QueueSettings
    from dicomnode.db import make_engine, make_session_factory, upgrade
    from dicomnode.domain import JobState
    from dicomnode.queue import JobRepository
    from dicomnode.send.sender import Sender

    db = Path(tempfile.mkdtemp(dir=workdir)) / "bench.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    jobs = JobRepository(sessions, QueueSettings())
    settings = DestinationSettings(**destination)
    sender = Sender(sessions, jobs, [settings], storage, poll_s=poll_s)
    first = dcmread(ct[0], stop_before_pixels=True)
    job = jobs.enqueue(
        dedupe_key="bench",
        route="chest",
        model="bench",
        study_instance_uid=str(first.StudyInstanceUID),
        inputs=[str(first.SeriesInstanceUID)],
        destinations=[settings.name],
        state=JobState.QUEUED,
    )
    assert jobs.claim("bench", ["bench"]) is not None
    sender.start()
    time.sleep(2 * poll_s)  # the sender is idle, as in a running node
    try:
        started = time.perf_counter()
        jobs.finish(job.id, "bench", {"objects": objects})
        while (record := jobs.get(job.id)) is not None and record.state is JobState.SENDING:
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
    finally:
        sender.stop()
        engine.dispose()
        shutil.rmtree(db.parent, ignore_errors=True)
    if record is None or record.state is not JobState.DONE:
        raise RuntimeError(
            f"job ended {record.state if record else None}: {record and record.error}"
        )
    return elapsed


def measure(
    workdir: Path,
    study: str,
    expected: set[str],
    send: Callable[[Any], float],
    *,
    dicomweb: bool = False,
) -> float:
    """Start a fresh Orthanc, run ``send(orthanc)``, check Orthanc lists every object."""
    from dicomnode.testing.orthanc import orthanc

    root = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
    try:
        with orthanc(root, dicomweb=dicomweb, graceful_stop=False) as server:
            seconds = send(server)
            got = {i["SOPInstanceUID"] for i in server.study_instances(study)}
            if got != expected:
                raise RuntimeError(f"Orthanc lists {sorted(got)}, expected {sorted(expected)}")
        return seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="keep the series and objects here")
    args = parser.parse_args(argv)

    from dicomnode.send.scu import Destination, send_files
    from dicomnode.testing.peers import LOOPBACK, storescu
    from dicomnode.testing.result_objects import write_result_objects

    keep = args.out is not None
    workdir = args.out.resolve() if keep else Path(tempfile.mkdtemp(prefix="send-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.monotonic()
        ct = generate(workdir / "ct", args.slices)
        storage = workdir / "storage"
        shutil.rmtree(storage, ignore_errors=True)
        built = time.perf_counter()
        objects = write_result_objects(ct, storage, 1, kinds=("SEG", "SR"))
        build_s = time.perf_counter() - built
        paths = [storage / o["path"] for o in objects]
        sizes = {o["kind"]: (storage / o["path"]).stat().st_size / 1e6 for o in objects}
        study = objects[0]["study_instance_uid"]
        expected = {o["sop_instance_uid"] for o in objects}
        fast = {"backoff_s": 1, "timeout_s": 30}

        def dimse(server: Any) -> dict[str, Any]:
            return {"name": "pacs", "ae_title": server.ae_title, "host": LOOPBACK,
                    "port": server.dicom_port, **fast}  # fmt: skip

        def storescu_send(server: Any) -> float:
            started = time.perf_counter()
            done = storescu(server.dicom_port, paths, called_aet=server.ae_title)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
            return elapsed

        def scu_send(server: Any) -> float:
            started = time.perf_counter()
            results = send_files(paths, Destination(server.ae_title, LOOPBACK, server.dicom_port))
            elapsed = time.perf_counter() - started
            if not all(r.ok for r in results):
                raise RuntimeError(f"send_files failed: {results}")
            return elapsed

        ways: dict[str, tuple[Callable[[Any], float], bool]] = {
            "queue, C-STORE": (
                lambda s: queue_send(workdir, ct, objects, storage, dimse(s), 0.5), False),
            "our SCU alone (send_files)": (scu_send, False),
            "storescu": (storescu_send, False),
            "queue, STOW-RS": (
                lambda s: queue_send(workdir, ct, objects, storage,
                                     {"name": "web", "url": s.dicomweb_url, **fast}, 0.5), True),
        }  # fmt: skip
        samples: dict[str, list[float]] = {name: [] for name in ways}
        for run in range(args.runs):
            for name, (send, dicomweb) in ways.items():  # interleaved: drift hits all alike
                samples[name].append(measure(workdir, study, expected, send, dicomweb=dicomweb))
            print(f"  run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
        print(render(args, samples, sizes, build_s, time.monotonic() - t0))
        return 0
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def render(
    args: argparse.Namespace,
    samples: dict[str, list[float]],
    sizes: dict[str, float],
    build_s: float,
    total_s: float,
) -> str:
    from importlib.metadata import version

    medians = {name: statistics.median(values) for name, values in samples.items()}
    storescu_s = medians["storescu"]
    lines = [
        f"- date: {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
        f"python {platform.python_version()}, pynetdicom {version('pynetdicom')}, "
        f"highdicom {version('highdicom')}, dicomweb-client {version('dicomweb-client')}",
        f"- Orthanc {_orthanc_version()}",
        f"- command: `.venv/bin/python -P benchmarks/results_send.py --slices {args.slices} "
        f"--runs {args.runs}` (took {total_s:.0f} s)",
        f"- objects: SEG {sizes.get('SEG', 0):.2f} MB (binary, on a {args.slices}-slice "
        f"512x512 CT), SR {sizes.get('SR', 0) * 1000:.0f} kB; built by highdicom in "
        f"{build_s:.2f} s (stand-ins for the results package)",
        "",
        "| way | median s | min s | max s | / storescu |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, values in samples.items():
        lines.append(
            f"| {name} | {medians[name]:.3f} | {min(values):.3f} | {max(values):.3f} | "
            f"{medians[name] / storescu_s:.2f} |"
        )
    return "\n".join(lines)


def _orthanc_version() -> str:
    found = subprocess.run(
        ["/usr/sbin/Orthanc", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return found[1] if len(found) > 1 else "?"


if __name__ == "__main__":
    sys.exit(main())
