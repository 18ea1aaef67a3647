#!/usr/bin/env python3
"""Memory of each process of a ``dicomnode serve`` (issue 16): the serve itself (receiver,
intake, sender, API) and its worker process running the lung nodule model on the demo's chest
CT (300 slices of 512x512), as ``deploy/SIZING.md`` "Memory limits" quotes them.

    .venv/bin/python benchmarks/process_memory.py [--device cpu] [--max-memory-mb MB]

Starts ``python -m dicomnode.cli serve`` (one ``[[workers]]`` entry, a child process) on a free
port, sends the study with dcmtk's storescu, waits for its job, and reads each process's
``/proc/<pid>/status``: VmHWM (the peak resident memory), VmRSS and VmData (what
``max_memory_mb`` limits), before the study and after its job, and how the job ended (with
``--max-memory-mb`` below its need: failed, the worker process the same). Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.phantoms.demo import chest_study  # noqa: E402
from dicomnode.testing.peers import free_port, storescu, wait_for_port  # noqa: E402
from dicomnode.testing.process import node_env  # noqa: E402
from dicomnode.testing.waiting import wait_until  # noqa: E402

FIELDS = ("VmHWM", "VmRSS", "VmData")


def status(pid: int) -> dict[str, int]:
    """The memory fields of /proc/<pid>/status, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) // 1024
    return values


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory-mb", type=int, default=0, help="[[workers]] max_memory_mb")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-memory-") as scratch:
        folder = Path(scratch)
        study = chest_study(folder / "study")
        port = free_port()
        env = node_env(folder / "node", port)
        env["DICOMNODE_API__ENABLED"] = "false"
        worker_settings = {"device": args.device, "models": ["lung_nodule"],
                           "max_memory_mb": args.max_memory_mb}  # fmt: skip
        env["DICOMNODE_WORKERS"] = json.dumps([worker_settings])
        log = (folder / "serve.log").open("wb")
        serve = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve"], env=env, stdout=log, stderr=log,
            cwd=REPO,
        )  # fmt: skip
        try:
            wait_for_port(port, timeout=60)
            text = lambda: (folder / "serve.log").read_text(errors="replace")  # noqa: E731
            wait_until(lambda: "started: models" in text(), timeout=300, what="worker ready")
            (worker,) = children(serve.pid)
            before = {"serve": status(serve.pid), "worker": status(worker)}
            started = time.monotonic()
            sent = storescu(port, study.files)
            assert sent.returncode == 0, sent.stderr
            ended = wait_until(
                lambda: re.search(r"job \d+ (finished by \S+: \w+|failed after .*)", text()),
                timeout=900,
                what="the job's end",
                detail=lambda: text()[-2000:],
            )
            took = time.monotonic() - started
            after = {"serve": status(serve.pid), "worker": status(worker)}
            assert children(serve.pid) == [worker], "the worker process was restarted"
        finally:
            serve.terminate()
            serve.wait(60)
    print(f"## Process memory ({platform.node()}, {os.cpu_count()} CPUs, {args.device})\n")
    limit = f", max_memory_mb {args.max_memory_mb}" if args.max_memory_mb else ""
    print(f"Demo chest CT (300 x 512 x 512), lung_nodule{limit}, sent and run in {took:.0f} s:")
    print(f"{ended.group(0)[:300]}\n")
    print("| process | when | VmHWM (peak RSS) | VmRSS | VmData |")
    print("|---|---|---|---|---|")
    for name in ("serve", "worker"):
        for when, values in (("models loaded", before), ("after the job", after)):
            v = values[name]
            print(f"| {name} | {when} | {v['VmHWM']} MB | {v['VmRSS']} MB | {v['VmData']} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
