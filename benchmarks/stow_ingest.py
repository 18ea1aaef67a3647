#!/usr/bin/env python3
"""STOW-RS ingest against C-STORE: the same series into the same node, in one run.

    .venv/bin/python benchmarks/stow_ingest.py [--slices 300] [--runs 3] [--out DIR]

Our node (``dicomnode serve``, receiving only: no routes, no worker) is started fresh, with
empty storage, for every send of a generated ``--slices`` slice 512x512 16-bit CT series:

1. C-STORE: dcmtk ``storescu`` (TCP_NODELAY=1) sends the files in one association; timed from
   its start to its exit 0 (every instance acknowledged, so fsynced and indexed);
2. STOW-RS, curl: ``curl --data-binary`` posts the series as one multipart/related body (built
   beforehand, untimed: it stands for a client that streams its files) to
   ``POST /dicomweb/studies``; timed from curl's start to its exit with HTTP 200 (the node
   answers once every instance is fsynced and indexed);
3. STOW-RS, dicomweb-client: ``DICOMwebClient.store_instances`` in this process, from reading
   the files to the answer (the client encodes every dataset again, as a Python sender does).

Each is run ``--runs`` times, interleaved; a run counts only if the node then holds every
instance (``dicomnode studies list --json``), else the script stops with an error. The series is
kept in ``--out DIR`` (reused by a later run with the same size) with the report,
``DIR/stow_ingest.md``; without ``--out`` all goes to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _receive_benchmark() -> ModuleType:
    """benchmarks/receive.py: its node, peers, series and machine line, shared, not copied."""
    spec = importlib.util.spec_from_file_location("bench_receive", REPO / "benchmarks/receive.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_receive"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _receive_benchmark()
TOKEN = "stow-bench-token-5b0c1e7d9a3f"
BOUNDARY = "dicomnode-bench-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
C_STORE, STOW_CURL, STOW_CLIENT = (
    "C-STORE, storescu",
    "STOW-RS, curl",
    "STOW-RS, dicomweb-client",
)
METHODS = (C_STORE, STOW_CURL, STOW_CLIENT)


@dataclass
class Sample:
    seconds: float
    cpu_s: float
    hwm_mb: float


def start_node(workdir: Path) -> tuple[Any, str]:
    """A fresh receive-only serve with its HTTP API (and the token) on; its API's URL."""
    root = Path(tempfile.mkdtemp(prefix="stow-node-", dir=workdir))
    node = bench.Receiver(
        bench.OURS,
        root,
        bench.AET[bench.OURS],
        settings={"DICOMNODE_API__ENABLED": "true", "DICOMNODE_API__TOKEN": TOKEN},
    ).start()
    url = f"http://{bench.HOST}:{node.env['DICOMNODE_API__PORT']}"

    def api_up() -> bool:
        import urllib.request

        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200

    from dicomnode.testing.waiting import wait_until

    wait_until(api_up, timeout=bench.STARTUP_TIMEOUT_S, interval=0.1, ignore=OSError)
    return node, url


def body_file(files: Sequence[Path], path: Path) -> Path:
    """The series as one multipart/related body, as a STOW-RS client sends it."""
    with path.open("wb") as out:
        for file in files:
            out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            out.write(file.read_bytes())
            out.write(b"\r\n")
        out.write(f"--{BOUNDARY}--\r\n".encode())
    return path


def send_storescu(node: Any, url: str, files: Sequence[Path], body: Path) -> None:
    result = subprocess.run(
        ["storescu", "-aec", bench.AET[bench.OURS], bench.HOST, str(node.port), *map(str, files)],
        env=bench.base_env(),
        capture_output=True,
        text=True,
        timeout=bench.SEND_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise bench.BenchmarkError(f"storescu exited {result.returncode}: {result.stderr[-2000:]}")


def send_curl(node: Any, url: str, files: Sequence[Path], body: Path) -> None:
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
         "--data-binary", f"@{body}", "-H", f"Content-Type: {CONTENT_TYPE}",
         "-H", f"Authorization: Bearer {TOKEN}", f"{url}/dicomweb/studies"],
        capture_output=True, text=True, timeout=bench.SEND_TIMEOUT_S, check=False,
    )  # fmt: skip
    if result.returncode != 0 or result.stdout != "200":
        raise bench.BenchmarkError(
            f"curl exited {result.returncode} with HTTP {result.stdout}: {result.stderr[-2000:]}"
        )


def send_client(node: Any, url: str, files: Sequence[Path], body: Path) -> None:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(f"{url}/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"})
    client.set_http_retry_params(retry=False)
    answer = client.store_instances([pydicom.dcmread(path) for path in files])
    if "FailedSOPSequence" in answer or len(answer.ReferencedSOPSequence) != len(files):
        raise bench.BenchmarkError("dicomweb-client: not every instance stored")


SENDERS: dict[str, Callable[[Any, str, Sequence[Path], Path], None]] = {
    C_STORE: send_storescu,
    STOW_CURL: send_curl,
    STOW_CLIENT: send_client,
}


def measure(method: str, workdir: Path, files: Sequence[Path], body: Path) -> Sample:
    """Start a fresh node, send, check it stored everything, stop it."""
    node, url = start_node(workdir)
    try:
        pid = node.pid
        cpu_before = bench.tree_cpu_seconds(pid)
        start = time.perf_counter()
        SENDERS[method](node, url, files, body)
        seconds = time.perf_counter() - start
        cpu = bench.tree_cpu_seconds(pid) - cpu_before
        hwm = bench.proc_status(pid)["VmHWM"] / 1024
        stored = node.instance_count()
        if stored != len(files):
            raise bench.BenchmarkError(
                f"{method}: the node holds {stored} instances, expected {len(files)}: a run "
                "that did not store everything is an error, not a result\n" + bench.tail(node.log)
            )
        return Sample(seconds, cpu, hwm)
    finally:
        bench.finish_receiver(node)


def report(
    args: argparse.Namespace, files: Sequence[Path], samples: dict[str, list[Sample]]
) -> str:
    size = bench.megabytes(files)
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False)
    lines = [
        *bench.machine(),
        f"- {curl.stdout.splitlines()[0] if curl.stdout else 'curl: ?'}",
        f"- command: `.venv/bin/python benchmarks/stow_ingest.py --slices {args.slices} "
        f"--runs {args.runs}`",
        "",
        f"### {args.slices} slices 512x512x16-bit CT ({size:.0f} MB) into a fresh node, "
        f"{args.runs} runs each",
        "",
        "| sender | median s | min s | MB/s | instances/s | node CPU s | node peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians = {}
    for method in METHODS:
        runs = samples[method]
        median = statistics.median(s.seconds for s in runs)
        medians[method] = median
        lines.append(
            f"| {method} | {median:.2f} | {min(s.seconds for s in runs):.2f} | "
            f"{size / median:.0f} | {len(files) / median:.0f} | "
            f"{statistics.median(s.cpu_s for s in runs):.2f} | "
            f"{max(s.hwm_mb for s in runs):.0f} |"
        )
    lines += [
        "",
        f"- STOW-RS (curl) / C-STORE (storescu), median: "
        f"{medians[STOW_CURL] / medians[C_STORE]:.2f}",
        f"- STOW-RS (dicomweb-client) / C-STORE (storescu), median: "
        f"{medians[STOW_CLIENT] / medians[C_STORE]:.2f}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="runs per sender (default 3)")
    parser.add_argument("--out", type=Path, help="keep the series and stow_ingest.md here")
    args = parser.parse_args(argv)
    for tool in ("storescu", "echoscu", "curl", str(bench.DICOMNODE)):
        if shutil.which(tool) is None:
            print(f"stow_ingest.py: {tool} not found", file=sys.stderr)
            return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, bench._interrupted)
    keep = args.out is not None
    workdir = args.out.resolve() if keep else Path(tempfile.mkdtemp(prefix="stow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        files = bench.generate(workdir / "ct", slices=args.slices, seed=1)
        body = body_file(files, workdir / "body.multipart")
        samples: dict[str, list[Sample]] = {method: [] for method in METHODS}
        for run in range(args.runs):
            for method in METHODS:
                sample = measure(method, workdir, files, body)
                samples[method].append(sample)
                print(f"run {run + 1} {method}: {sample.seconds:.2f} s", file=sys.stderr)
        text = report(args, files, samples)
        print(text)
        if keep:
            (workdir / "stow_ingest.md").write_text(text + "\n")
        return 0
    except bench.BenchmarkError as exc:
        print(f"stow_ingest.py: {exc}", file=sys.stderr)
        return 1
    finally:
        for node in list(bench.LIVE):
            bench.finish_receiver(node)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
