#!/usr/bin/env python3
"""Reliability figures: hostile input and load against a running ``dicomnode serve``.

    .venv/bin/python benchmarks/reliability.py [--datasets 2000] [--associations 600]

1. Malformed datasets: ``--datasets`` mutations of a valid CT slice (truncated, bytes flipped,
   wrong VRs, absurd lengths, huge declared pixel data, bad UIDs, garbage, inserted bytes), each
   sent as a C-STORE on one raw association; each must be refused with a failure status and
   nothing stored, or stored byte for byte when the mutation left a well-formed dataset.
2. Hostile associations: unknown calling AE, wrong called AE, wrong application context,
   garbage on the port, truncated A-ASSOCIATE-RQ, absurd PDU lengths.
3. Throughout both, a good sender (storescu, every 0.5 s) must succeed, and the node's peak
   resident memory is recorded.
4. Load: 8 senders at once, 200 instances each (128x128 CT), against storescp receiving the
   same in the same run (the ratio).
5. Crash during receive: a sender streams 256x256 CT instances on one association while the node
   is killed with SIGKILL at a random moment; after a restart, every instance the node had
   acknowledged with Success must be in its index and on disk, byte for byte.
6. PACS outage: results of ``--jobs`` jobs go to two destinations, Orthanc (the PACS) and
   storescp (an archive); Orthanc is stopped for ``--outage`` seconds while the jobs finish;
   the archive must keep receiving meanwhile, and the PACS must get every result once back.

The node runs as a child process (``serve``, receiving only). Prints a markdown report.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import json
import platform
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import Any

from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.fuzz import (
    ATTEMPTS,
    Tally,
    base_dataset,
    hostile_attempt,
    judge,
    random_mutations,
    stored_bytes,
)
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.rawstore import RawAssociation
from dicomnode.testing.waiting import WaitTimeout, wait_until
from dicomnode.testing.watch import watch


def fuzz_datasets(node: ServeProcess, count: int) -> Tally:
    tally = Tally()
    lookup = stored_bytes(node.storage)
    assoc = RawAssociation("127.0.0.1", node.port, calling="RAW")
    for index, mutation in enumerate(random_mutations(count, seed=1)):
        ds = base_dataset(100_000 + index)
        uid = str(ds.SOPInstanceUID)
        payload = mutation.apply(ds)
        try:
            status = assoc.store(payload, uid)
            outcome = judge(status, payload, uid, lookup)
        except (ConnectionError, OSError):
            outcome = "hung up"
            assoc = RawAssociation("127.0.0.1", node.port, calling="RAW")
        except AssertionError as exc:
            outcome = f"NOT CLEAN: {exc}"
        tally.add(mutation.kind, outcome)
    assoc.release()
    return tally


def hostile_associations(node: ServeProcess, count: int) -> Tally:
    rng = random.Random(9)
    tally = Tally()
    for index in range(count):
        kind = ATTEMPTS[index % len(ATTEMPTS)]
        try:
            tally.add(kind, hostile_attempt(kind, node.port, rng))
        except OSError as exc:
            tally.add(kind, f"error: {type(exc).__name__}")
    return tally


def load(port: int, folders: list[list[Path]]) -> tuple[float, int]:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(folders)) as pool:
        results = list(pool.map(lambda files: peers.storescu(port, files, timeout=600), folders))
    return time.perf_counter() - started, sum(r.returncode != 0 for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=2000)
    parser.add_argument("--associations", type=int, default=600)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--each", type=int, default=200)
    parser.add_argument("--crashes", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--outage", type=float, default=120.0, help="seconds the PACS is down")
    args = parser.parse_args(argv)
    lines = [f"# Reliability, {date.today()}, {platform.machine()}", ""]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        node = ServeProcess(root / "node")
        node.env["DICOMNODE_WORKERS"] = "[]"
        node.env["DICOMNODE_SECURITY__ALLOWED_CALLING_AETS"] = json.dumps(
            ["RAW", "STORESCU", "GOOD"]
        )
        node.start()
        try:
            with watch(node.pid, node.port) as seen:
                t0 = time.perf_counter()
                datasets = fuzz_datasets(node, args.datasets)
                t1 = time.perf_counter()
                associations = hostile_associations(node, args.associations)
                t2 = time.perf_counter()
            alive = node.process is not None and node.process.poll() is None
            folders = [
                write_series(
                    ct_slices(SeriesSpec(slices=args.each, rows=128, columns=128, seed=30_000 + s)),
                    root / f"sender{s}",
                )
                for s in range(args.senders)
            ]
            node_load = load(node.port, folders)
        finally:
            node.stop()
        with peers.storescp(root / "storescp", fork=True) as port:
            storescp_load = load(port, folders)
        crashes = [crash_during_receive(root / f"crash{n}", seed=n) for n in range(args.crashes)]
        outage = pacs_outage(root / "outage", args.jobs, args.outage)

    lines += [
        f"## Malformed datasets: {datasets.total} in {t1 - t0:.1f} s", "",
        "| kind | refused | stored exactly | other |", "|---|---|---|---|",
    ]  # fmt: skip
    for kind, counts in sorted(datasets.by_kind.items()):
        other = {k: v for k, v in counts.items() if k not in ("refused", "stored")}
        lines.append(
            f"| {kind} | {counts.get('refused', 0)} | {counts.get('stored', 0)} | {other or ''} |"
        )
    handled = datasets.count("refused") + datasets.count("stored")
    lines += [
        "",
        f"Handled cleanly: **{handled} of {datasets.total}**.",
        "",
        f"## Hostile associations: {associations.total} in {t2 - t1:.1f} s",
        "",
        "| kind | how the node ended it |",
        "|---|---|",
    ]
    for kind, counts in sorted(associations.by_kind.items()):
        lines.append(f"| {kind} | {counts} |")
    lines += [
        "",
        f"Throughout: good sender {seen.good_sent - len(seen.good_failures)} of {seen.good_sent} "
        f"succeeded; node peak RSS **{seen.peak_rss_mb:.0f} MB**; node alive after: {alive}.",
        "",
        f"## Load: {args.senders} senders at once, {args.each} instances each",
        "",
        "| receiver | seconds | failed senders |",
        "|---|---|---|",
        f"| dicomnode | {node_load[0]:.2f} | {node_load[1]} |",
        f"| storescp | {storescp_load[0]:.2f} | {storescp_load[1]} |",
        "",
        f"Ratio dicomnode / storescp: **{node_load[0] / storescp_load[0]:.2f}**.",
    ]
    lines += [
        "",
        f"## Crash during receive: SIGKILL mid-association, {len(crashes)} times",
        "",
        "| killed after (s) | instances sent | acknowledged | found after restart, intact |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['killed_after_s']:.2f} | {c['sent']} | {c['acknowledged']} | {c['found']} |"
        for c in crashes
    ]
    lines += [
        "",
        f"## PACS outage: Orthanc down {args.outage:.0f} s while {args.jobs} jobs finish",
        "",
        "| destination | results expected | delivered during the outage | delivered in the end |",
        "|---|---|---|---|",
        f"| archive (storescp) | {outage['expected']} | {outage['archive_during']} | "
        f"{outage['archive_end']} |",
        f"| PACS (Orthanc) | {outage['expected']} | (down) | {outage['pacs_end']} |",
        "",
        f"Every job done: {outage['all_done']}; the PACS had all its results "
        f"{outage['catch_up_s']:.1f} s after it came back.",
    ]
    print("\n".join(lines))
    return 0


def crash_during_receive(root: Path, *, seed: int, count: int = 400) -> dict[str, Any]:
    """Stream instances, SIGKILL the node mid-way, restart it: acknowledged versus found."""
    from dicomnode.testing.rawstore import encode_dataset

    node = ServeProcess(root / "node")
    node.env["DICOMNODE_WORKERS"] = "[]"
    node.start()
    spec = SeriesSpec(slices=count, rows=256, columns=256, seed=40_000 + seed)
    payloads = [(str(ds.SOPInstanceUID), encode_dataset(ds)) for ds in ct_slices(spec)]
    delay = random.Random(seed).uniform(0.2, 1.0)
    killer = threading.Timer(delay, node.kill)
    acknowledged, sent = [], 0
    assoc = RawAssociation("127.0.0.1", node.port, calling="RAW")
    killer.start()
    for uid, payload in payloads:
        try:
            sent += 1
            if assoc.store(payload, uid) == 0:
                acknowledged.append((uid, payload))
        except (ConnectionError, OSError):
            break
    killer.join()
    node.start()  # the same storage and port
    lookup = stored_bytes(node.storage)
    found = sum(lookup(uid) == payload for uid, payload in acknowledged)
    node.stop()
    return {"killed_after_s": delay, "sent": sent, "acknowledged": len(acknowledged),
            "found": found}  # fmt: skip


def pacs_outage(root: Path, jobs: int, outage_s: float) -> dict[str, Any]:
    """Results pile up while the PACS is down; the archive keeps receiving; all arrive after."""
    from pydicom import dcmread

    from dicomnode.app import open_database
    from dicomnode.config import load_settings
    from dicomnode.domain import JobState
    from dicomnode.queue import JobRepository
    from dicomnode.testing.orthanc import Orthanc
    from dicomnode.testing.result_objects import write_result_objects

    ct = write_series(ct_slices(SeriesSpec(slices=6, rows=64, columns=64, seed=5)), root / "ct")
    first = dcmread(ct[0], stop_before_pixels=True)
    pacs = Orthanc(root / "pacs", sync_storage=False).start()
    with peers.storescp(root / "archive", fork=True) as archive_port:
        storage = root / "node"
        config = root / "node.toml"
        config.write_text(
            f'[node]\nstorage_dir = "{storage}"\n'
            f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
            f"port = {pacs.dicom_port}\nbackoff_s = 1\nmax_backoff_s = 5\ntimeout_s = 5\n"
            "max_attempts = 1000\n"  # retried through the whole outage, never given up
            f'[[destinations]]\nname = "archive"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
            f"port = {archive_port}\nbackoff_s = 1\nmax_backoff_s = 5\n"
        )
        node = ServeProcess(storage, config=config)
        node.env["DICOMNODE_WORKERS"] = "[]"
        node.start()
        settings = load_settings(config)
        database = open_database(settings, migrate=False)
        repo = JobRepository(database.sessions, settings.queue)
        expected, ids = 0, []
        try:
            pacs.stop(graceful=False)
            down_at = time.monotonic()
            for index in range(jobs):
                job = repo.enqueue(
                    dedupe_key=f"outage/{index}", route="outage", model="standin",
                    study_instance_uid=str(first.StudyInstanceUID),
                    inputs=[str(first.SeriesInstanceUID)], destinations=["pacs", "archive"],
                    state=JobState.QUEUED,
                )  # fmt: skip
                objects = write_result_objects(ct, storage, job.id, seed=f"outage{index}")
                repo.claim("bench-worker", ["standin"])
                repo.finish(job.id, "bench-worker", {"objects": objects})
                expected += len(objects)
                ids.append(job.id)
                time.sleep(
                    max(0.0, down_at + (index + 1) * outage_s / jobs * 0.8 - time.monotonic())
                )
            time.sleep(max(0.0, down_at + outage_s - time.monotonic()))
            archive_during = len([p for p in (root / "archive").rglob("*") if p.is_file()])
            pacs.start()
            back_at = time.monotonic()
            with contextlib.suppress(WaitTimeout):  # not caught up: all_done says so below
                wait_until(
                    lambda: all(repo.get(i).final for i in ids),  # type: ignore[union-attr]
                    timeout=600,
                    interval=0.2,
                )
            catch_up = time.monotonic() - back_at
            all_done = all(repo.get(i).state is JobState.DONE for i in ids)  # type: ignore[union-attr]
            return {
                "expected": expected, "archive_during": archive_during,
                "archive_end": len([p for p in (root / "archive").rglob("*") if p.is_file()]),
                "pacs_end": pacs.instance_count(), "all_done": all_done, "catch_up_s": catch_up,
            }  # fmt: skip
        finally:
            node.stop()
            database.engine.dispose()
            pacs.stop(graceful=False)


if __name__ == "__main__":
    raise SystemExit(main())
