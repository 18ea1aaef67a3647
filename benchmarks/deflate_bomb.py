#!/usr/bin/env python3
"""Deflate bombs against the node and against dcmtk's storescp: memory while refusing them.

    .venv/bin/python benchmarks/deflate_bomb.py [--sizes 1 12 100] [--peer-cap-mb 4096]

Each bomb is a valid 16x16 CT slice in Deflated Explicit VR Little Endian padded with zeros,
``--sizes`` MB on the wire (each inflates about 1,000 times: 1 MB holds 1 GiB). It goes in one
C-STORE to

- the node: the real ``serve`` in its own process, receiving only, while a good sender stores
  an instance every 0.5 s; its peak RSS is sampled every 50 ms;
- the peer: dcmtk's ``storescp`` (``+xa``: every syntax it supports, deflate included), run
  under ``prlimit --as`` of ``--peer-cap-mb`` so that a bomb it inflates in memory fails it
  rather than the machine.

Prints a markdown table: the C-STORE status, seconds to the answer, peak RSS, whether the good
sender lost anything (node), and the peak RSS ratio node / storescp in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import platform
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import date

import psutil
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicomnode.errors import PeerClosed
from dicomnode.testing import peers
from dicomnode.testing.bombs import Bomb, bomb
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.rawstore import RawAssociation
from dicomnode.testing.watch import watch


def send(port: int, attack: Bomb, called: str) -> tuple[str, float]:
    """One C-STORE of the bomb: the status (or how the peer ended it) and the seconds taken."""
    started = time.perf_counter()
    try:
        with RawAssociation(
            "127.0.0.1",
            port,
            called=called,
            calling="RAW",
            transfer_syntax=DeflatedExplicitVRLittleEndian,
            fragment=16000,  # storescp's maximum PDU is 16 kB
            timeout=600,
        ) as association:
            outcome = f"0x{association.store(attack.payload, attack.sop_instance_uid):04X}"
    except (ConnectionError, OSError, PeerClosed) as exc:
        outcome = f"hung up ({type(exc).__name__})"
    return outcome, time.perf_counter() - started


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, float]]:
    """Sample a process' resident memory every 50 ms until the block ends."""
    seen = {"peak_mb": 0.0}
    stop = threading.Event()
    process = psutil.Process(pid)

    def sample() -> None:
        while not stop.is_set():
            try:
                seen["peak_mb"] = max(seen["peak_mb"], process.memory_info().rss / 2**20)
            except psutil.Error:
                return
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def run_peer(folder: Path, attack: Bomb, cap_mb: int) -> dict[str, str]:
    port = peers.free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["prlimit", f"--as={cap_mb << 20}", peers.require("storescp"), "--aetitle",
         "STORESCP", "--output-directory", str(folder), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=peers.dcmtk_env(),
    )  # fmt: skip
    try:
        peers.wait_for_port(port)
        with peak_rss(process.pid) as seen:
            status, seconds = send(port, attack, "STORESCP")
        alive = process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)
    stored = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "status": status,
        "seconds": f"{seconds:.1f}",
        "peak RSS MB": f"{seen['peak_mb']:.0f}",
        "survived": "yes" if alive else "no",
        "disk MB": f"{stored / 2**20:.0f}",
    }


def run_node(node: ServeProcess, attack: Bomb) -> dict[str, str]:
    with watch(node.pid, node.port) as seen:
        status, seconds = send(node.port, attack, "DICOMNODE")
        time.sleep(1.0)  # let the good sender go on after the refusal too
    alive = node.process is not None and node.process.poll() is None
    return {
        "status": status,
        "seconds": f"{seconds:.1f}",
        "peak RSS MB": f"{seen.peak_rss_mb:.0f}",
        "survived": "yes" if alive else "no",
        "good sender": f"{seen.good_sent - len(seen.good_failures)}/{seen.good_sent}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 12, 100], help="MB on wire")
    parser.add_argument("--peer-cap-mb", type=int, default=4096)
    args = parser.parse_args(argv)

    lines = [
        f"Deflate bombs, {date.today()}, {platform.node()}, {psutil.cpu_count()} CPUs",
        "",
        "| on the wire | inflates to | node status | node s | node peak RSS MB | good sender "
        "| storescp status | storescp s | storescp peak RSS MB | storescp survived "
        "| RSS node/storescp |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        node = ServeProcess(root / "node")
        node.env["DICOMNODE_WORKERS"] = "[]"
        node.start()
        try:
            idle = psutil.Process(node.pid).memory_info().rss / 2**20
            print(f"node idle RSS: {idle:.0f} MB", flush=True)
            for index, size in enumerate(args.sizes):
                attack = bomb(size << 30, seed=index)
                ours = run_node(node, attack)
                theirs = run_peer(root / f"peer{index}", attack, args.peer_cap_mb)
                ratio = float(ours["peak RSS MB"]) / max(float(theirs["peak RSS MB"]), 1.0)
                wire = len(attack.payload) / 2**20
                lines.append(
                    f"| {wire:.1f} MB | {attack.inflated / 2**30:.0f} GiB | {ours['status']} "
                    f"| {ours['seconds']} | {ours['peak RSS MB']} | {ours['good sender']} "
                    f"| {theirs['status']} | {theirs['seconds']} | {theirs['peak RSS MB']} "
                    f"| {theirs['survived']} (disk {theirs['disk MB']} MB) | {ratio:.2f} |"
                )
                print(lines[-1], flush=True)
        finally:
            node.stop()
    lines.append("")
    lines.append(f"node idle RSS {idle:.0f} MB; storescp under prlimit --as={args.peer_cap_mb} MB")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
