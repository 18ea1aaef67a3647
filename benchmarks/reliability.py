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

The node runs as a child process (``serve``, receiving only). Prints a markdown report.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/queue.py would shadow the standard library's queue: keep this folder off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from datetime import date  # noqa: E402

from dicomnode.testing import peers  # noqa: E402
from dicomnode.testing.fuzz import (  # noqa: E402
    ATTEMPTS,
    Tally,
    base_dataset,
    hostile_attempt,
    judge,
    random_mutations,
    stored_bytes,
)
from dicomnode.testing.process import ServeProcess  # noqa: E402
from dicomnode.testing.rawstore import RawAssociation  # noqa: E402
from dicomnode.testing.series import SeriesSpec, ct_slices, write_series  # noqa: E402
from dicomnode.testing.watch import watch  # noqa: E402


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
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
