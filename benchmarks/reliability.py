#!/usr/bin/env python3
"""Reliability figures: hostile input and load against a running ``dicomnode serve``.

    .venv/bin/python benchmarks/reliability.py [--datasets 2000] [--associations 600]
    .venv/bin/python benchmarks/reliability.py --only chaos [--series 50]

1. Malformed datasets: ``--datasets`` mutations of a valid CT slice (truncated, bytes flipped,
   wrong VRs, absurd lengths, huge declared pixel data, bad UIDs, garbage, inserted bytes, a
   broken command set), in explicit VR little endian, deflated or RLE-compressed, each sent as
   a C-STORE on one raw association; each must be refused with a failure status and nothing
   stored, or stored byte for byte (a deflated one: inflated) when the mutation left a
   well-formed dataset; a broken command set may also be aborted, storing nothing.
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
7. Chaos (``--only chaos``): two ``serve`` receivers (no embedded workers) and two ``worker``
   processes on one fresh PostgreSQL and one spool, results to Orthanc. ``--series`` small
   chest CTs, each sent in 1 to 3 associations (0-3 s apart, each part to a random receiver),
   while a thread SIGKILLs a random process every few seconds and starts it again (same spool,
   port, receiver id). A part cut by a kill is sent again, as a scanner would. Once every job
   has settled: no acknowledged instance lost, no result from an incomplete series, no duplicate
   result object (nor a second result set for a series) in Orthanc.

The node runs as a child process (``serve``, receiving only). Prints a markdown report.
``--only hostile,load,crash,outage,chaos`` picks sections (default: all; hostile covers 1 to 3).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import re
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from dicomnode.domain import FINAL_STATES, JobState
from dicomnode.errors import PeerClosed
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.fuzz import (
    ATTEMPTS,
    Tally,
    fuzz_association,
    hostile_attempt,
    random_mutations,
    send_mutation,
    stored_bytes,
)
from dicomnode.testing.peers import LOOPBACK
from dicomnode.testing.process import ServeProcess, node_env
from dicomnode.testing.rawstore import RawAssociation
from dicomnode.testing.waiting import WaitTimeout, wait_until
from dicomnode.testing.watch import watch


def fuzz_datasets(node: ServeProcess, count: int) -> Tally:
    tally = Tally()
    lookup = stored_bytes(node.storage)
    assoc = fuzz_association("127.0.0.1", node.port)
    for index, mutation in enumerate(random_mutations(count, seed=1)):
        try:
            outcome = send_mutation(assoc, mutation, 100_000 + index, lookup)
        except (ConnectionError, OSError):
            outcome = "hung up"
        except AssertionError as exc:
            outcome = f"NOT CLEAN: {exc}"
        if outcome == "hung up":
            assoc = fuzz_association("127.0.0.1", node.port)
        tally.add(f"{mutation.kind}/{mutation.syntax}", outcome)
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


SECTIONS = ("hostile", "load", "crash", "outage", "chaos")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=2000)
    parser.add_argument("--associations", type=int, default=600)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--each", type=int, default=200)
    parser.add_argument("--crashes", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--outage", type=float, default=120.0, help="seconds the PACS is down")
    parser.add_argument("--series", type=int, default=50, help="series of the chaos run")
    parser.add_argument("--chaos-senders", type=int, default=4, help="series sent at once")
    parser.add_argument("--chaos-seed", type=int, default=15)
    parser.add_argument(
        "--chaos-interval",
        type=float,
        nargs=2,
        default=(2.0, 5.0),
        metavar=("MIN", "MAX"),
        help="seconds between two kills of the chaos run",
    )
    parser.add_argument(
        "--chaos-tail",
        type=float,
        default=120.0,
        help="seconds the kills go on after the last series is sent, while jobs run",
    )
    parser.add_argument(
        "--chaos-dir",
        type=Path,
        help="keep the chaos run's logs, spool and jobs.json here (default: a temporary folder)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)",
    )
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    lines = [f"# Reliability, {date.today()}, {platform.machine()}", ""]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if "hostile" in only or "load" in only:
            lines += hostile_and_load(root, args, only)
        if "crash" in only:
            crashes = [
                crash_during_receive(root / f"crash{n}", seed=n) for n in range(args.crashes)
            ]
            lines += crash_report(crashes)
        if "outage" in only:
            lines += outage_report(pacs_outage(root / "outage", args.jobs, args.outage), args)
        if "chaos" in only:
            chaos = chaos_run(
                args.chaos_dir or root / "chaos",
                series=args.series,
                senders=args.chaos_senders,
                seed=args.chaos_seed,
                confirm_s=CHAOS_CONFIRM_S,
                interval_s=tuple(args.chaos_interval),
                tail_s=args.chaos_tail,
                settle_s=1200,
            )
            lines += chaos_report(chaos)
    print("\n".join(lines))
    return 0


def hostile_and_load(root: Path, args: argparse.Namespace, only: list[str]) -> list[str]:
    """Sections 1 to 4: malformed datasets and hostile associations while a good sender sends,
    then the load against the node and storescp."""
    lines: list[str] = []
    node = ServeProcess(root / "node")
    node.env["DICOMNODE_WORKERS"] = "[]"
    node.env["DICOMNODE_SECURITY__ALLOWED_CALLING_AETS"] = json.dumps(["RAW", "STORESCU", "GOOD"])
    node.start()
    folders = []
    try:
        if "hostile" in only:
            with watch(node.pid, node.port) as seen:
                t0 = time.perf_counter()
                datasets = fuzz_datasets(node, args.datasets)
                t1 = time.perf_counter()
                associations = hostile_associations(node, args.associations)
                t2 = time.perf_counter()
            alive = node.process is not None and node.process.poll() is None
        if "load" in only:
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
    if "hostile" in only:
        lines += [
            f"## Malformed datasets: {datasets.total} in {t1 - t0:.1f} s", "",
            "| kind / syntax | refused | stored exactly | aborted | other |",
            "|---|---|---|---|---|",
        ]  # fmt: skip
        for kind, counts in sorted(datasets.by_kind.items()):
            clean = ("refused", "stored", "aborted")
            other = {k: v for k, v in counts.items() if k not in clean}
            lines.append(
                f"| {kind} | {counts.get('refused', 0)} | {counts.get('stored', 0)} | "
                f"{counts.get('aborted', 0)} | {other or ''} |"
            )
        handled = sum(datasets.count(outcome) for outcome in ("refused", "stored", "aborted"))
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
            f"Throughout: good sender {seen.good_sent - len(seen.good_failures)} of "
            f"{seen.good_sent} succeeded; node peak RSS **{seen.peak_rss_mb:.0f} MB**; node "
            f"alive after: {alive}.",
            "",
        ]
    if "load" in only:
        with peers.storescp(root / "storescp", fork=True) as port:
            storescp_load = load(port, folders)
        lines += [
            f"## Load: {args.senders} senders at once, {args.each} instances each",
            "",
            "| receiver | seconds | failed senders |",
            "|---|---|---|",
            f"| dicomnode | {node_load[0]:.2f} | {node_load[1]} |",
            f"| storescp | {storescp_load[0]:.2f} | {storescp_load[1]} |",
            "",
            f"Ratio dicomnode / storescp: **{node_load[0] / storescp_load[0]:.2f}**.",
            "",
        ]
    return lines


def crash_report(crashes: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"## Crash during receive: SIGKILL mid-association, {len(crashes)} times",
        "",
        "| killed after (s) | instances sent | acknowledged | found after restart, intact |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['killed_after_s']:.2f} | {c['sent']} | {c['acknowledged']} | {c['found']} |"
        for c in crashes
    ]
    return [*lines, ""]


def outage_report(outage: dict[str, Any], args: argparse.Namespace) -> list[str]:
    return [
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
        "",
    ]


def _counts(counter: Counter[str]) -> str:
    total = sum(counter.values())
    named = {k: v for k, v in counter.items() if k}
    return f"{total} {dict(sorted(named.items()))}" if named else str(total)


def chaos_report(c: dict[str, Any]) -> list[str]:
    kills, events = c["kills"], c["events"]
    kills_text = f"{kills.get('receiver', 0)} receivers, {kills.get('worker', 0)} workers"

    def verdict(found: int) -> str:
        return "**0**" if found == 0 else f"**{found}: FAILED**"

    lines = [
        f"## Chaos: 2 receivers + 2 workers on PostgreSQL, {c['series']} series, random SIGKILL",
        "",
        f"{c['series']} chest CTs ({c['instances']} instances) sent in {c['parts']} parts "
        f"(1 to 3 associations each, 0-3 s apart, each part to a random receiver); a part cut "
        f"by a kill, or with a refused instance, is sent again whole. Completion: release_grace_s "
        f"1, confirm_s {CHAOS_CONFIRM_S:g}, quiet_s 30; the lung_nodule model on the CPU.",
        "",
        "| check | found |",
        "|---|---|",
        f"| acknowledged instances lost (of {c['acknowledged']}: not indexed, no file, other "
        f"bytes) | {verdict(len(c['lost']))} |",
        f"| results from incomplete series (of {c['sent_jobs']} jobs that sent) | "
        f"{verdict(len(c['incomplete']))} |",
        f"| duplicate result objects in Orthanc (a SOP Instance UID twice) | "
        f"{verdict(c['duplicate_objects'])} |",
        f"| series with two result sets in Orthanc | {verdict(len(c['duplicate_sets']))} |",
        f"| objects in Orthanc no job made | {verdict(c['unknown_objects'])} |",
        f"| results of done jobs missing from Orthanc | {verdict(c['missing_objects'])} |",
        f"| series whose results more than one job sent | {verdict(c['series_sent_twice'])} |",
        "",
        "| run | |",
        "|---|---|",
        f"| kills (SIGKILL, then restart after 0.5-2 s) | {kills_text} |",
        f"| associations / cut by a kill / refused while down | {c['associations']} / "
        f"{c['cut']} / {c['refused']} |",
        f"| failure statuses (instance refused, part sent again) | {c['statuses'] or 'none'} |",
        f"| series a sender gave up on | {c['gave_up']} |",
        f"| jobs by state | {c['states']} |",
        f"| superseded jobs (cancelled: a new instance inside the window) | {c['superseded']} |",
        f"| runs after a job's first (a worker killed mid-job, a run that failed) | "
        f"{c['retries']} ({c['retried_jobs']} jobs) |",
        f"| runs that failed and were retried | {_counts(events['job_retry_scheduled'])} |",
        f"| leases expired (a worker killed mid-job) | {_counts(events['job_lease_expired'])} |",
        f"| results dropped (a run that lost its job) | {_counts(events['job_result_dropped'])} |",
        f"| instances refused by a receiver, by status | {_counts(events['store_refused'])} |",
        f"| associations left open in the index at the end, by receiver | "
        f"{c['open_associations'] or 0} |",
        f"| files left in transit (incoming/) at the end | {c['in_transit']} |",
        f"| result objects in Orthanc | {c['pacs_instances']} |",
        f"| results sent more than 60 s after their job was done (longest) | "
        f"{sum(lag > 60 for lag in c['send_lags'])} ({max(c['send_lags'], default=0):.0f} s) |",
        f"| time: sending / with kills / until every job settled | {c['sent_s']:.0f} s / "
        f"{c['chaos_s']:.0f} s / {c['took_s']:.0f} s |",
        "",
    ]
    for name, rows in (
        ("Lost", c["lost"]),
        ("Incomplete", c["incomplete"]),
        ("Two result sets", c["duplicate_sets"]),
    ):
        if rows:
            lines += [f"{name}: {rows[:10]}", ""]
    return lines


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


# -- 7. chaos: two receivers and two workers on PostgreSQL, killed at random under load --------

#: longer than the longest pause of a sender between two parts (3 s) plus a receiver's restart
CHAOS_CONFIRM_S = 8.0

#: the chaos run's node: no embedded workers (the worker processes run the jobs); a confirmation
#: window longer than any sender's gap (3 s) and any restart (a cut part is re-sent at once)
CHAOS_CONFIG = """\
workers = []

[node]
storage_dir = "{spool}"
database_url = "{database_url}"
min_free_disk_mb = 1

[api]
enabled = false

[queue]
lease_s = {lease_s}
heartbeat_s = 1
backoff_s = 1
max_attempts = 10

[models]
threads = 1

[[routes]]
name = "chest"
model = "lung_nodule"
destinations = ["pacs"]
match = {{ Modality = "CT" }}
completion = {{ quiet_s = 30, release_grace_s = 1, confirm_s = {confirm_s} }}

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "{host}"
port = {pacs_port}
backoff_s = 1
max_backoff_s = 5
timeout_s = 10
max_attempts = 1000
"""

#: a job in one of these states may still change what reaches the PACS
UNSETTLED = frozenset(JobState) - FINAL_STATES
#: states of a job whose results were (or are being) sent
SENT_STATES = frozenset({JobState.SENDING, JobState.DONE})
CHAOS_CALLING_AET = "CHAOSSCU"
#: statuses the DICOM standard counts as stored: Success and the Warnings (B000, B006, B007)
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def _dataset_bytes(path: Path) -> bytes:
    """A DICOM file's dataset as it travels in P-DATA: the bytes after its File Meta."""
    data = path.read_bytes()
    # preamble, "DICM", then (0002,0000) UL: the length of the rest of the File Meta
    meta_length = struct.unpack_from("<I", data, 128 + 4 + 8)[0]
    return data[128 + 4 + 12 + meta_length :]


@dataclass
class ChaosSeries:
    """One series of the load: its instances in order, and how it is sent."""

    study_uid: str
    series_uid: str
    instances: list[tuple[str, bytes]]  # (SOP Instance UID, dataset bytes), slice order
    parts: list[tuple[int, int]]  # [start, stop) of each association's part
    gaps_s: list[float]  # the sender's pause before each part after the first


def chaos_load(root: Path, count: int, rng: random.Random) -> list[ChaosSeries]:
    """``count`` small chest CTs (one nodule each), each split into 1 to 3 parts."""
    from pydicom import dcmread

    from dicomnode.phantoms.chest import chest_ct

    load = []
    for index in range(count):
        phantom = chest_ct(
            (40, 128, 128), (2.0, 2.0, 2.5), nodules=1, sizes=(10.0, 14.0), seed=70_000 + index
        )
        files = sorted(phantom.write(root / f"series{index:03d}"))
        first = dcmread(files[0], stop_before_pixels=True)
        instances = [
            (str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), _dataset_bytes(path))
            for path in files
        ]
        cuts = sorted(rng.sample(range(1, len(files)), rng.randint(1, 3) - 1))
        bounds = [0, *cuts, len(files)]
        load.append(
            ChaosSeries(
                study_uid=str(first.StudyInstanceUID),
                series_uid=str(first.SeriesInstanceUID),
                instances=instances,
                parts=list(itertools.pairwise(bounds)),
                gaps_s=[rng.uniform(0.0, 3.0) for _ in cuts],
            )
        )
    return load


class ChaosProcess:
    """A receiver (``serve``) or a ``worker`` of the chaos run: SIGKILLed and started again
    with the same storage, port, receiver id and worker id."""

    def __init__(
        self,
        name: str,
        kind: str,
        command: list[str],
        env: dict[str, str],
        log: Path,
        *,
        port: int | None = None,
    ) -> None:
        self.name, self.kind, self.command, self.env, self.log = name, kind, command, env, log
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        ready = f"worker {self.name} running "  # a worker's line once its models are loaded
        before = self._log_text().count(ready)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        if self.port is not None:
            peers.wait_for_port(self.port, timeout=120)
        else:
            wait_until(
                lambda: self._alive() and self._log_text().count(ready) > before,
                timeout=180,
                what=f"{self.name} running",
                detail=lambda: self._log_text()[-2000:],
            )

    def _alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self._log_text()[-2000:]}")
        return True

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None


@dataclass
class SendTally:
    """What the senders saw, shared by their threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: dict[str, bytes] = field(default_factory=dict)
    associations: int = 0
    cut: int = 0  # associations that ended before their part was sent (a kill)
    refused: int = 0  # connections or associations refused (a receiver down)
    statuses: Counter[str] = field(default_factory=Counter)  # failure statuses, by code
    gave_up: list[str] = field(default_factory=list)  # series a sender could not send


def send_part(
    ports: list[int],
    instances: list[tuple[str, bytes]],
    tally: SendTally,
    rng: random.Random,
    *,
    attempts: int = 60,
) -> bool:
    """Send one part in one association to a random receiver, as a scanner would: when the
    association is cut or an instance refused, send the whole part again (to a random one)."""
    for _ in range(attempts):
        port = rng.choice(ports)
        try:
            assoc = RawAssociation(LOOPBACK, port, calling=CHAOS_CALLING_AET, timeout=60)
        except (OSError, PeerClosed):
            with tally.lock:
                tally.refused += 1
            time.sleep(rng.uniform(0.2, 1.0))  # the sender's pause before it tries again
            continue
        with tally.lock:
            tally.associations += 1
        whole = True
        try:
            for uid, payload in instances:
                status = assoc.store(payload, uid)
                with tally.lock:
                    if status in STORED_STATUSES:
                        tally.acknowledged[uid] = payload
                    else:
                        tally.statuses[f"0x{status:04X}"] += 1
                        whole = False
            assoc.release()
        except (OSError, PeerClosed):
            with tally.lock:
                tally.cut += 1
            assoc.sock.close()
            continue
        if whole:
            return True
        time.sleep(rng.uniform(0.2, 1.0))  # the sender's pause before it sends the part again
    return False


def send_series(ports: list[int], series: ChaosSeries, tally: SendTally, seed: int) -> None:
    rng = random.Random(seed)
    for index, (start, stop) in enumerate(series.parts):
        if index:
            time.sleep(series.gaps_s[index - 1])  # the scanner pauses between parts
        if not send_part(ports, series.instances[start:stop], tally, rng):
            with tally.lock:
                tally.gave_up.append(series.series_uid)
            return


class ChaosMonkey(threading.Thread):
    """Every few seconds, SIGKILL a random process and start it again after a short pause."""

    def __init__(
        self,
        processes: list[ChaosProcess],
        rng: random.Random,
        interval_s: tuple[float, float],
        pause_s: tuple[float, float],
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.processes, self.rng = processes, rng
        self.interval_s, self.pause_s = interval_s, pause_s
        self.stopping = threading.Event()
        self.kills: Counter[str] = Counter()
        self.error: BaseException | None = None
        #: when each process was killed and back (the logs' clock), for the evidence
        self.journal = processes[0].log.with_name("chaos.log")

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.rng.uniform(*self.interval_s)):
                target = self.rng.choice(self.processes)
                self._note(f"kill {target.name}")
                target.kill()
                self.kills[target.kind] += 1
                time.sleep(self.rng.uniform(*self.pause_s))  # down for a moment, then back
                target.start()
                self._note(f"back {target.name}")
        except BaseException as exc:  # reported by the run, which then stops
            self.error = exc

    def _note(self, event: str) -> None:
        with self.journal.open("a") as journal:
            journal.write(f"{datetime.now().isoformat(' ', 'milliseconds')} {event}\n")


def chaos_run(
    root: Path,
    *,
    series: int,
    senders: int,
    seed: int,
    confirm_s: float,
    interval_s: tuple[float, float],
    tail_s: float,
    settle_s: float,
) -> dict[str, Any]:
    """2 receivers + 2 workers on one PostgreSQL and one spool, sending to Orthanc, under a
    mixed split load and random SIGKILLs; then the three checks."""
    from dicomnode.app import open_database
    from dicomnode.config import NodeSettings, load_settings
    from dicomnode.queue import JobRepository
    from dicomnode.testing.orthanc import Orthanc
    from dicomnode.testing.postgres import PostgresServer

    rng = random.Random(seed)
    load = chaos_load(root / "load", series, rng)
    postgres = PostgresServer().start()
    pacs = Orthanc(root / "pacs", sync_storage=False).start()
    spool = root / "spool"
    config = root / "node.toml"
    config.write_text(
        CHAOS_CONFIG.format(
            spool=spool,
            database_url=postgres.url,
            lease_s=10,
            confirm_s=confirm_s,
            host=LOOPBACK,
            pacs_port=pacs.dicom_port,
        )
    )
    settings = load_settings(config)
    database = open_database(settings, migrate=True)  # the schema, once, before any process
    jobs = JobRepository(database.sessions, settings.queue)
    repo_root = str(Path(__file__).resolve().parent.parent)
    base_env = {**os.environ, "DICOMNODE_CONFIG": str(config)}
    base_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p
    )
    cli = [sys.executable, "-m", "dicomnode.testing.cli"]
    processes: list[ChaosProcess] = []
    for name in ("receiver-a", "receiver-b"):
        port = peers.free_port()
        env = {**node_env(spool, port), **base_env}
        if "receiver_id" in NodeSettings.model_fields:  # issue 15: receivers by name
            env["DICOMNODE_NODE__RECEIVER_ID"] = name
        processes.append(
            ChaosProcess(name, "receiver", [*cli, "serve"], env, root / f"{name}.log", port=port)
        )
    for name in ("worker-1", "worker-2"):
        command = [*cli, "worker", "--models", "lung_nodule", "--worker-id", name]
        processes.append(ChaosProcess(name, "worker", command, base_env, root / f"{name}.log"))
    monkey = ChaosMonkey(processes, rng, interval_s, (0.5, 2.0))
    tally = SendTally()
    ports = [p.port for p in processes if p.port is not None]
    try:
        for chaos_process in processes:
            chaos_process.start()
        started = time.monotonic()
        monkey.start()
        with ThreadPoolExecutor(senders) as pool:
            list(
                pool.map(
                    lambda i: send_series(ports, load[i], tally, seed * 1000 + i), range(len(load))
                )
            )
        sent_s = time.monotonic() - started
        # the monkey goes on while the jobs run, for at most tail_s after the last part
        with contextlib.suppress(WaitTimeout):
            wait_until(lambda: monkey.error or _settled(jobs, load), timeout=tail_s, interval=1)
        monkey.stopping.set()
        monkey.join()
        if monkey.error is not None:
            raise RuntimeError("the chaos thread failed") from monkey.error
        chaos_s = time.monotonic() - started
        found = wait_until(
            _stays_settled(jobs, load, 5.0),
            timeout=settle_s,
            interval=1,
            what="every job to settle",
            detail=lambda: jobs.counts_by_state(),
        )
        took = time.monotonic() - started
        checks = _chaos_checks(database, spool, pacs, load, tally, found)
        checks.update(_leftovers(database, spool), events=_log_events(root))
        (root / "jobs.json").write_text(
            json.dumps([_job_summary(job) for job in sorted(found, key=lambda j: j.id)], indent=1)
        )
    finally:
        monkey.stopping.set()
        if monkey.is_alive():
            monkey.join(timeout=300)
        for chaos_process in processes:
            chaos_process.stop()
        database.engine.dispose()
        pacs.stop(graceful=False)
        postgres.remove()
    states = Counter(job.state.value for job in found)
    return {
        **checks,
        "series": len(load),
        "instances": sum(len(s.instances) for s in load),
        "parts": sum(len(s.parts) for s in load),
        "kills": dict(monkey.kills),
        "superseded": sum("superseded" in (j.error or "") for j in found),
        "retries": sum(max(j.attempts - 1, 0) for j in found),
        "retried_jobs": sum(j.attempts > 1 for j in found),
        "states": dict(sorted(states.items())),
        "associations": tally.associations,
        "cut": tally.cut,
        "refused": tally.refused,
        "statuses": dict(tally.statuses),
        "gave_up": len(tally.gave_up),
        "sent_s": sent_s,
        "chaos_s": chaos_s,
        "took_s": took,
    }


def _leftovers(database: Any, spool: Path) -> dict[str, Any]:
    """What the receivers left behind once everything settled (none should be left): their
    associations still open in the index, and files in transit."""
    from sqlalchemy import func, select

    from dicomnode.db.models import Association

    with database.sessions() as session:
        open_ = session.execute(
            select(Association.receiver_id, func.count())
            .where(Association.outcome.is_(None))
            .group_by(Association.receiver_id)
        ).all()
    incoming = spool / "incoming"
    in_transit = sum(p.is_file() for p in incoming.rglob("*")) if incoming.exists() else 0
    return {"open_associations": {str(r): n for r, n in open_}, "in_transit": in_transit}


#: "LEVEL logger [action] message" in the processes' logs
_LOG_ACTION = re.compile(r" (?:WARNING|ERROR|INFO)\s+\S+ \[(\w+)\] (.*)$")
#: the log actions the chaos report counts
_COUNTED = ("job_lease_expired", "job_retry_scheduled", "job_result_dropped", "store_refused",
            "job_superseded")  # fmt: skip


def _log_events(root: Path) -> dict[str, Counter[str]]:
    """The processes' log lines of interest, by action, then by cause (the exception named
    after the last colon-separated part, for retries)."""
    events: dict[str, Counter[str]] = {action: Counter() for action in _COUNTED}
    for log in sorted(root.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            found = _LOG_ACTION.search(line)
            if found is None or found[1] not in events:
                continue
            cause = ""
            if found[1] == "job_retry_scheduled":
                cause = found[2].partition(" s: ")[2].partition(":")[0]
            elif found[1] == "store_refused":
                cause = found[2].partition("status ")[2].partition(")")[0]
            events[found[1]][cause] += 1
    return events


def _job_summary(job: Any) -> dict[str, Any]:
    """What the evidence of a chaos run keeps of a job."""
    inputs = (job.result or {}).get("inputs", [])
    return {
        "id": job.id, "series": job.series_instance_uid, "state": job.state.value,
        "attempts": job.attempts, "error": job.error,
        "shapes": [item["shape"] for item in inputs],
        "objects": [o["sop_instance_uid"] for o in (job.result or {}).get("objects", [])],
        **{name: str(getattr(job, name)) for name in (
            "received_at", "completed_at", "started_at", "finished_at", "sent_at"
        )},
    }  # fmt: skip


def _settled(jobs: Any, load: list[ChaosSeries]) -> list[Any] | None:
    """Every job, once each series has one and none is unsettled."""
    found = jobs.list(limit=100_000)
    routed = {job.series_instance_uid for job in found}
    if all(s.series_uid in routed for s in load) and not any(
        job.state in UNSETTLED for job in found
    ):
        return list(found)
    return None


def _stays_settled(jobs: Any, load: list[ChaosSeries], stable_s: float) -> Callable[[], Any]:
    """A check: every job, once :func:`_settled` has held for ``stable_s`` (a sweep or more, so
    that a series re-opened by a late instance shows)."""
    since: list[float] = []

    def check() -> list[Any] | None:
        found = _settled(jobs, load)
        if found is None:
            since.clear()
            return None
        since[:] = since or [time.monotonic()]
        return found if time.monotonic() - since[0] >= stable_s else None

    return check


def _chaos_checks(
    database: Any,
    spool: Path,
    pacs: Any,
    load: list[ChaosSeries],
    tally: SendTally,
    found: list[Any],
) -> dict[str, Any]:
    from sqlalchemy import select

    from dicomnode.db.models import Instance

    # 1. every acknowledged instance in the index and on disk, byte for byte
    with database.sessions() as session:
        paths = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
    lost = []
    for uid, payload in tally.acknowledged.items():
        path = paths.get(uid)
        if path is None or not (spool / path).is_file():
            lost.append((uid, "not in the index" if path is None else "no file"))
        elif _dataset_bytes(spool / path) != payload:
            lost.append((uid, "different bytes"))
    # 2. no job that sent (or is sending) results ran on fewer slices than its series has
    slices = {s.series_uid: len(s.instances) for s in load}
    incomplete = []
    sent = [j for j in found if j.state in SENT_STATES or j.sent_at is not None]
    for job in sent:
        inputs = (job.result or {}).get("inputs", [])
        shapes = [int(item["shape"][0]) for item in inputs]
        short = [i for i in inputs if i["shape"][0] < slices.get(i["series_instance_uid"], 0)]
        if not inputs or short:  # no record of its inputs counts against it too
            incomplete.append((job.id, job.series_instance_uid, shapes))
    # 3. Orthanc: each SOP Instance UID once, and the objects of one job per series
    owner: dict[str, set[int]] = {}
    for job in found:
        for item in (job.result or {}).get("objects", []):
            owner.setdefault(item["sop_instance_uid"], set()).add(job.id)
    duplicates, result_sets, unknown, missing = 0, [], 0, 0
    for series in load:
        held = pacs.study_instances(series.study_uid)
        uids = Counter(item["SOPInstanceUID"] for item in held)
        duplicates += sum(n - 1 for n in uids.values())
        owners = set().union(*(owner.get(uid, set()) for uid in uids)) if uids else set()
        unknown += sum(uid not in owner for uid in uids)
        if len(owners) > 1:
            result_sets.append((series.series_uid, sorted(owners)))
        for job in found:
            if job.series_instance_uid == series.series_uid and job.state is JobState.DONE:
                missing += sum(o["sop_instance_uid"] not in uids for o in job.result["objects"])
    per_series = Counter(j.series_instance_uid for j in sent)
    # how long results waited after their job was done and its inputs confirmed
    lags = sorted(
        (j.sent_at - max(j.finished_at, j.completed_at)).total_seconds()
        for j in found
        if j.state is JobState.DONE and j.sent_at and j.finished_at and j.completed_at
    )
    return {
        "acknowledged": len(tally.acknowledged),
        "lost": lost,
        "sent_jobs": len(sent),
        "incomplete": incomplete,
        "duplicate_objects": duplicates,
        "duplicate_sets": result_sets,
        "unknown_objects": unknown,
        "missing_objects": missing,
        "series_sent_twice": sum(n > 1 for n in per_series.values()),
        "send_lags": lags,
        "pacs_instances": pacs.instance_count(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
