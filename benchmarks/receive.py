#!/usr/bin/env python3
"""Receive benchmark: our node against dcmtk storescp and Orthanc, side by side, in one run.

    .venv/bin/python benchmarks/receive.py [--slices 300] [--runs 3] [--big 1000] [--out DIR]

Four measurements, all on loopback; the first three against all three receivers. Our node
receives only (no routes, no embedded worker, no HTTP API): the receiver is what is measured.

1. One association: ``storescu`` sends a ``--slices`` slice 512x512 16-bit CT series; the time
   runs from the start of storescu until it exits with status 0 (every instance acknowledged).
   ``--runs`` times per receiver, each run on a freshly started receiver with empty storage.
2. Four associations at once: four storescu processes, four different series (seeds 2..5).
3. Memory: VmRSS before and VmHWM (peak RSS) after one association that sends ``--big`` slices.
4. Several receivers (issue 15): ``--load-senders`` storescu processes at once, each sending its
   own series of ``--load-each`` small (128x128) instances, against our node as one serve with
   1 process, one serve with ``--processes`` 2 (SQLite and PostgreSQL), two serves on one
   PostgreSQL and one spool (different ports, half the senders each), and ``storescp --fork``;
   ``--runs`` times each, interleaved. ``--only-load`` runs this one alone.

A run counts only if the receiver then holds every instance (our node: ``dicomnode studies list
--json``; Orthanc: ``GET /statistics``; storescp: the files in its output folder); otherwise the
script stops with an error. Every peer and storescu run with TCP_NODELAY=1 (dcmtk reads it).

The generated series are kept in ``--out DIR`` (reused by a later run with the same sizes) and the
report is written to ``DIR/receive.md``; without ``--out`` everything goes to a temporary folder
that is removed at the end. Receiver storage always lives in temporary folders, removed after each
run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DICOMNODE = VENV_BIN / "dicomnode"
HOST = "127.0.0.1"
ROWS = COLUMNS = 512
STARTUP_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 600.0

OURS, ORTHANC, STORESCP = "dicomnode", "Orthanc", "storescp"
AET = {OURS: "DICOMNODE", ORTHANC: "ORTHANC", STORESCP: "STORESCP"}


class BenchmarkError(RuntimeError):
    """A receiver failed to start, a send failed, or a receiver did not store everything."""


# -- helpers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    """The caller's environment without any DICOMNODE_* setting, plus TCP_NODELAY=1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env["TCP_NODELAY"] = "1"
    return env


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its children that it has waited for."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of all its live descendants (serve --processes' children,
    PostgreSQL's backends), each with the children it has reaped."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += [child for child, parent in parents.items() if parent == current]
    total = 0.0
    for member in tree:
        with contextlib.suppress(OSError):
            total += cpu_seconds(member)
    return total


def echo_ok(aet: str, port: int, env: dict[str, str]) -> bool:
    result = subprocess.run(
        ["echoscu", "-to", "5", "-aec", aet, HOST, str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


def http_json(url: str, timeout: float = 5.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return json.loads(response.read())


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def drop_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # keep the deletions' writeback out of the next timed run


# -- receivers ----------------------------------------------------------------------------------


@dataclass
class Receiver:
    """One running peer: a process in its own process group, with its storage folder."""

    name: str
    root: Path  # temporary folder: storage, config, log
    aet: str
    port: int = 0
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=base_env)
    #: ours only: more DICOMNODE_* settings (processes, database, receiver id, storage)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.root / "receiver.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _spawn(self, argv: Sequence[str]) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
                cwd=self.root,
            )
        LIVE.append(self)

    def _wait_ready(self, extra: Callable[[], bool] | None = None) -> None:
        from dicomnode.testing.waiting import WaitTimeout, wait_until

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"{self.name} exited with {self.process.returncode} while starting:\n"
                    + tail(self.log)
                )
            return (extra is None or extra()) and echo_ok(self.aet, self.port, self.env)

        try:
            wait_until(ready, timeout=STARTUP_TIMEOUT_S, interval=0.2, ignore=(OSError, ValueError))
        except WaitTimeout:
            raise BenchmarkError(
                f"{self.name} did not answer within {STARTUP_TIMEOUT_S}s:\n" + tail(self.log)
            ) from None

    def start(self, *, fork: bool = False) -> Receiver:
        self.port = free_port()
        if self.name == OURS:
            self._start_ours()
        elif self.name == ORTHANC:
            self._start_orthanc()
        else:
            self._start_storescp(fork=fork)
        return self

    def _start_ours(self) -> None:
        self.env.update(
            DICOMNODE_NODE__HOST=HOST,
            DICOMNODE_NODE__PORT=str(self.port),
            DICOMNODE_NODE__STORAGE_DIR=str(self.root / "storage"),
            DICOMNODE_NODE__MIN_FREE_DISK_MB="100",
            # Not served yet by `serve`; kept on loopback and off the default port in case it is.
            DICOMNODE_API__HOST=HOST,
            DICOMNODE_API__PORT=str(free_port()),
        )
        # The receiver alone: the embedded worker would load the demo models (torch) as the
        # serve starts and run the lung model on the CPU while the next series arrives.
        self.env.update(RECEIVE_ONLY)
        self.env.update(self.settings)
        self._spawn([str(DICOMNODE), "serve"])
        self._wait_ready(lambda: "listening on" in self.log.read_text(errors="replace"))

    def _start_orthanc(self) -> None:
        """Orthanc as the tests run it (dicomnode.testing.orthanc), fsyncing each file."""
        from dicomnode.testing.orthanc import Orthanc, OrthancError

        server = Orthanc(self.root, ae_title=self.aet, dicom_port=self.port, sync_storage=True)
        LIVE.append(self)
        try:
            self.process = server.start().process
        except OrthancError as exc:
            raise BenchmarkError(str(exc)) from exc
        self.http_port = server.http_port

    def _start_storescp(self, *, fork: bool) -> None:
        (self.root / "storage").mkdir()
        self._spawn(
            [
                "storescp",
                "--fork" if fork else "--single-process",
                "+xa",  # accept all supported transfer syntaxes
                "--aetitle",
                self.aet,
                "-od",
                str(self.root / "storage"),
                str(self.port),
            ]
        )
        self._wait_ready()

    def instance_count(self) -> int:
        """How many instances the receiver holds now."""
        if self.name == OURS:
            result = subprocess.run(
                [
                    str(DICOMNODE),
                    "--log-level",
                    "WARNING",
                    "studies",
                    "list",
                    "--json",
                    "--limit",
                    "1000",
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode != 0:
                raise BenchmarkError(f"`dicomnode studies list --json` failed: {result.stderr}")
            return sum(int(study["instance_count"]) for study in json.loads(result.stdout))
        if self.name == ORTHANC:
            stats = http_json(f"http://{HOST}:{self.http_port}/statistics")
            assert isinstance(stats, dict)
            return int(stats["CountInstances"])
        return sum(1 for p in (self.root / "storage").rglob("*") if p.is_file())

    def version(self) -> str:
        if self.name == ORTHANC:
            system = http_json(f"http://{HOST}:{self.http_port}/system")
            assert isinstance(system, dict)
            return str(system.get("Version"))
        return ""

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            if self in LIVE:
                LIVE.remove(self)
            self.process = None


LIVE: list[Receiver] = []
SENDERS: list[subprocess.Popen[bytes]] = []


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after the grace time."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # children it left behind (storescp --fork)
    process.wait()


def start_receiver(name: str, workdir: Path, *, fork: bool = False) -> Receiver:
    root = Path(tempfile.mkdtemp(prefix=f"{name.lower()}-", dir=workdir))
    return Receiver(name, root, AET[name]).start(fork=fork)


def finish_receiver(receiver: Receiver) -> None:
    receiver.stop()
    drop_tree(receiver.root)


# -- sending ------------------------------------------------------------------------------------


def storescu_argv(receiver: Receiver, files: Sequence[Path]) -> list[str]:
    return ["storescu", "-aec", receiver.aet, HOST, str(receiver.port), *map(str, files)]


def send(receiver: Receiver, series: Sequence[Sequence[Path]]) -> float:
    """Run one storescu per series at once; return the seconds until the last exits 0."""
    return send_to([(receiver, files) for files in series])


def send_to(work: Sequence[tuple[Receiver, Sequence[Path]]]) -> float:
    """Run one storescu per (receiver, series) at once; the seconds until the last exits 0."""
    failures = []
    with contextlib.ExitStack() as stack:
        outputs = [stack.enter_context(tempfile.TemporaryFile()) for _ in work]
        start = time.perf_counter()
        for (receiver, files), out in zip(work, outputs, strict=True):
            SENDERS.append(
                subprocess.Popen(
                    storescu_argv(receiver, files),
                    env=base_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        for process, out in zip(SENDERS, outputs, strict=True):
            try:
                code = process.wait(timeout=SEND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                stop_group(process)
                code = -1
            if code != 0:
                out.seek(0)
                log = out.read()[-2000:].decode(errors="replace")
                failures.append(f"storescu exited {code}: {log}")
        elapsed = time.perf_counter() - start
        SENDERS.clear()
    if failures:
        names = sorted({receiver.name for receiver, _ in work})
        raise BenchmarkError(f"sending to {', '.join(names)} failed:\n" + "\n".join(failures))
    return elapsed


@dataclass
class Sample:
    seconds: float
    cpu_s: float
    stored: int
    rss_before_kb: int = 0
    hwm_after_kb: int = 0


def measure(
    name: str, workdir: Path, series: Sequence[Sequence[Path]], *, fork: bool = False
) -> Sample:
    """Start a fresh receiver, send, check it stored everything, stop it."""
    expected = sum(len(files) for files in series)
    receiver = start_receiver(name, workdir, fork=fork)
    try:
        before = proc_status(receiver.pid)
        cpu_before = cpu_seconds(receiver.pid)
        seconds = send(receiver, series)
        cpu = cpu_seconds(receiver.pid) - cpu_before
        after = proc_status(receiver.pid)
        stored = receiver.instance_count()
        if stored != expected:
            raise BenchmarkError(
                f"{name} holds {stored} instances after the send, expected {expected}: "
                "a run that did not store everything is an error, not a result\n"
                + tail(receiver.log)
            )
        return Sample(seconds, cpu, stored, before["VmRSS"], after["VmHWM"])
    finally:
        finish_receiver(receiver)


# -- data ---------------------------------------------------------------------------------------


def generate(folder: Path, *, slices: int, seed: int, rows: int = ROWS) -> list[Path]:
    """Write (or reuse) a slices x rows x rows (512 unless told) 16-bit CT series."""
    marker = folder / "complete.json"
    spec = {"slices": slices, "rows": rows, "columns": rows, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return sorted(folder.glob("*.dcm"))
    from dicomnode.phantoms.simple import SeriesSpec, ct_slices
    from dicomnode.phantoms.writer import write_series

    shutil.rmtree(folder, ignore_errors=True)
    paths = write_series(
        ct_slices(SeriesSpec(slices=slices, rows=rows, columns=rows, seed=seed)), folder
    )
    marker.write_text(json.dumps(spec))
    return paths


def megabytes(files: Sequence[Path]) -> float:
    return sum(p.stat().st_size for p in files) / 1e6


# -- several receivers (issue 15) ---------------------------------------------------------------

LOAD_ROWS = 128
ONE, TWO_PROCESSES, TWO_PROCESSES_PG, TWO_SERVES_PG, FORK = (
    "dicomnode, 1 process (SQLite)",
    "dicomnode, --processes 2 (SQLite)",
    "dicomnode, --processes 2 (PostgreSQL)",
    "2 serves, 1 process each, one PostgreSQL + one spool",
    "storescp --fork",
)
LOAD_CONFIGS = (ONE, TWO_PROCESSES, TWO_PROCESSES_PG, TWO_SERVES_PG, FORK)
#: the node receiving only: no routes (nothing queued), no embedded worker, no HTTP API
RECEIVE_ONLY = {
    "DICOMNODE_WORKERS": "[]",
    "DICOMNODE_ROUTES": "[]",
    "DICOMNODE_API__ENABLED": "false",
}


@dataclass
class LoadSample:
    seconds: float
    cpu_s: float  # every receiver process (serves, their children; storescp and its forks)
    db_cpu_s: float  # the PostgreSQL server, where one is used
    associations: dict[str, int]  # receiver id -> associations it handled (ours)


class Postgres:
    """One PostgreSQL (fsync on) for the load scenario; a fresh database per run."""

    def __init__(self) -> None:
        from dicomnode.testing.postgres import PostgresServer

        self.server = PostgresServer().start()
        self.runs = 0

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def new_database(self) -> str:
        from sqlalchemy import create_engine, text

        self.runs += 1
        name = f"bench{self.runs}"
        engine = create_engine(self.server.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.server.url.rsplit("/", 1)[0] + f"/{name}"

    def remove(self) -> None:
        self.server.remove()


def associations_by_receiver(database_url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT receiver_id, count(*) FROM associations GROUP BY receiver_id")
            ).all()
    finally:
        engine.dispose()
    return {str(receiver): int(count) for receiver, count in rows}


def start_ours(root: Path, **settings: str) -> Receiver:
    root.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(OURS, root, AET[OURS], settings={**RECEIVE_ONLY, **settings})
    return receiver.start()


def measure_load(
    config: str,
    workdir: Path,
    series: Sequence[Sequence[Path]],
    postgres: Postgres,
    py_spy: Path | None = None,
) -> tuple[LoadSample, str]:
    """Start fresh receivers as ``config`` says, send every series at once, check every
    instance is stored once, stop them; the sample and (with ``py_spy``) the profile's raw
    stacks."""
    root = Path(tempfile.mkdtemp(prefix="load-", dir=workdir))
    storage = root / "storage"
    receivers: list[Receiver] = []
    database_url = ""
    try:
        if config == FORK:
            receivers.append(Receiver(STORESCP, root, AET[STORESCP]).start(fork=True))
        else:
            settings = {"DICOMNODE_NODE__STORAGE_DIR": str(storage)}
            if config in (TWO_PROCESSES_PG, TWO_SERVES_PG):
                database_url = postgres.new_database()
                settings["DICOMNODE_NODE__DATABASE_URL"] = database_url
            else:
                database_url = f"sqlite:///{storage / 'dicomnode.db'}"
            if config == TWO_SERVES_PG:  # one at a time: the first migrates the new database
                for name in ("a", "b"):
                    receivers.append(
                        start_ours(root / name, DICOMNODE_NODE__RECEIVER_ID=name, **settings)
                    )
            else:
                processes = "1" if config == ONE else "2"
                receivers.append(
                    start_ours(
                        root / "serve",
                        DICOMNODE_NODE__RECEIVER_ID="serve",
                        DICOMNODE_NODE__PROCESSES=processes,
                        **settings,
                    )
                )
        work = [(receivers[i % len(receivers)], files) for i, files in enumerate(series)]
        pg_before = tree_cpu_seconds(postgres.pid)
        before = sum(tree_cpu_seconds(r.pid) for r in receivers)
        profile = root / "profile.raw"
        spy = None
        if py_spy is not None:
            spy_log = root / "py-spy.log"
            with open(spy_log, "wb") as out:
                spy = subprocess.Popen(
                    [str(py_spy), "record", "--pid", str(receivers[0].pid), "--idle", "--rate",
                     "250", "--format", "raw", "--output", str(profile)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            from dicomnode.testing.waiting import wait_until

            wait_until(lambda: b"Sampling" in spy_log.read_bytes(), timeout=30, what="py-spy")
        seconds = send_to(work)
        cpu = sum(tree_cpu_seconds(r.pid) for r in receivers) - before
        db_cpu = tree_cpu_seconds(postgres.pid) - pg_before if "PostgreSQL" in config else 0.0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        expected = sum(len(files) for files in series)
        stored = receivers[0].instance_count()  # the serves share one index
        if stored != expected:
            raise BenchmarkError(
                f"{config} holds {stored} instances after the send, expected {expected}\n"
                + tail(receivers[0].log)
            )
        counts = associations_by_receiver(database_url) if database_url else {}
        stacks = profile.read_text() if profile.exists() else ""
        return LoadSample(seconds, cpu, db_cpu, counts), stacks
    finally:
        for receiver in receivers:
            receiver.stop()
        drop_tree(root)


#: where an association thread's time goes, by the innermost frame that names one
PROFILE_BUCKETS = (
    ("fsync of the received file (outside the lock)", ("fsync_file ",)),
    ("fsync of the spool folder after the rename (in the lock)", ("_fsync_dir ",)),
    ("SQLite BEGIN IMMEDIATE / COMMIT with its WAL fsync (in the lock)",
     ("sqlite_transaction ",)),
    ("index statements (in the lock)", ("dicomnode/db/writer.py", "dicomnode/db/executor.py")),
    ("association row open/close + audit (SQLAlchemy ORM)", ("association_opened ",
     "association_closed ")),
    ("header read and validation", ("dicomnode/receive/validate.py",)),
    ("reading the network (recv, waiting for the sender)", ("dicomnode/receive/pdu.py",)),
)  # fmt: skip
LOCK_WAIT = "waiting for the store lock (another thread indexes: one writer per process)"


def summarise_profile(stacks: str) -> list[str]:
    """Share of the association threads' samples (on CPU or blocked) per bucket."""
    totals: dict[str, int] = {}
    all_samples = 0
    for line in stacks.splitlines():
        stack, _, count = line.rpartition(" ")
        if "AssociationHandler.run " not in stack:
            continue
        samples = int(count)
        all_samples += samples
        frames = stack.split(";")
        bucket = "other (Python of the receive path, DIMSE, logging)"
        if frames[-1].startswith("InstanceStore.store "):  # blocked in `with self._lock`
            bucket = LOCK_WAIT
        for frame in reversed(frames if bucket != LOCK_WAIT else []):  # innermost first
            name = next((b for b, marks in PROFILE_BUCKETS if any(m in frame for m in marks)), None)
            if name is not None:
                bucket = name
                break
        totals[bucket] = totals.get(bucket, 0) + samples
    if not all_samples:
        return ["(no samples of association threads)"]
    lines = ["| where the association threads are | share of their samples |", "| --- | ---: |"]
    for bucket, samples in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"| {bucket} | {100 * samples / all_samples:.0f}% |")
    return lines


# -- report -------------------------------------------------------------------------------------


def machine() -> list[str]:
    model = "?"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    dcmtk = subprocess.run(
        ["storescu", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    mem_kb = 0
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    from importlib.metadata import version

    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return [
        f"- code: dicomnode at {git or '?'}",
        f"- date: {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, "
        f"{mem_kb / 2**20:.0f} GiB RAM, {platform.system()} {platform.release()}",
        f"- python {platform.python_version()}; dicomnode {version('dicomnode')}, "
        f"pynetdicom {version('pynetdicom')}, pydicom {version('pydicom')}, "
        f"SQLAlchemy {version('sqlalchemy')}",
        f"- dcmtk: {dcmtk[0].strip('$ ').removeprefix('dcmtk: ') if dcmtk else '?'}",
    ]


def fmt_ratio(value: float, target: float) -> str:
    return f"{value:.2f} (target <= {target:g}: {'met' if value <= target else 'MISSED'})"


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices per series (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="runs per receiver (default 3)")
    parser.add_argument("--big", type=int, default=1000, help="slices of the memory test series")
    parser.add_argument("--out", type=Path, help="keep generated data and receive.md here")
    parser.add_argument("--senders", type=int, default=4, help="concurrent senders (default 4)")
    parser.add_argument("--load-senders", type=int, default=8, help="senders at once (default 8)")
    parser.add_argument("--load-each", type=int, default=200, help="instances each (default 200)")
    parser.add_argument("--only-load", action="store_true", help="run the several-receivers one")
    parser.add_argument(
        "--py-spy", type=Path, help="py-spy binary: profile the 1-process serve in its first run"
    )
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu", "/usr/sbin/Orthanc", str(DICOMNODE)):
        if shutil.which(tool) is None:
            print(f"receive.py: {tool} not found", file=sys.stderr)
            return 2

    # Stop cleanly on Ctrl-C or SIGTERM (also where a parent left SIGINT ignored): the finally
    # clause below stops every receiver and sender and removes the temporary folders.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupted)
    keep = args.out is not None
    workdir = args.out.resolve() if keep else Path(tempfile.mkdtemp(prefix="receive-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    names = (OURS, ORTHANC, STORESCP)
    postgres: Postgres | None = None
    try:
        t0 = time.monotonic()
        print(f"generating series in {workdir} ...", file=sys.stderr, flush=True)
        load_series = [
            generate(workdir / f"load-{seed}", slices=args.load_each, seed=seed, rows=LOAD_ROWS)
            for seed in range(500, 500 + args.load_senders)
        ]
        if args.only_load:
            postgres = Postgres()
            load, profile = run_load(args, workdir, load_series, postgres)
            report = "\n".join(
                [*machine(), f"- command: `.venv/bin/python benchmarks/receive.py "
                 f"--only-load --runs {args.runs}` (took {time.monotonic() - t0:.0f}s)", "",
                 *render_load(load, load_series, profile)]
            )  # fmt: skip
            print(report)
            if keep:
                (workdir / "receive.md").write_text(report + "\n")
            return 0
        main_series = generate(workdir / "series-1", slices=args.slices, seed=1)
        many = [
            generate(workdir / f"series-{seed}", slices=args.slices, seed=seed)
            for seed in range(2, 2 + args.senders)
        ]
        big = generate(workdir / "series-big", slices=args.big, seed=100)
        os.sync()
        print(f"  done in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)

        # Orthanc's version, from a throwaway instance.
        probe = start_receiver(ORTHANC, workdir)
        try:
            orthanc_version = probe.version()
        finally:
            finish_receiver(probe)

        # 1. one association, --runs times, receivers interleaved so drift hits all alike.
        single: dict[str, list[Sample]] = {n: [] for n in names}
        for run in range(args.runs):
            for name in names:
                sample = measure(name, workdir, [main_series])
                single[name].append(sample)
                print(
                    f"  run {run + 1}/{args.runs} {name:9s} {sample.seconds:6.2f}s  "
                    f"receiver CPU {sample.cpu_s:5.2f}s",
                    file=sys.stderr,
                    flush=True,
                )

        # 2. --senders associations at once (storescp forks a child per association here).
        concurrent: dict[str, list[Sample]] = {n: [] for n in names}
        for run in range(args.runs):
            for name in names:
                sample = measure(name, workdir, many, fork=name == STORESCP)
                concurrent[name].append(sample)
                print(
                    f"  concurrent run {run + 1}/{args.runs} {name:9s} {sample.seconds:6.2f}s",
                    file=sys.stderr,
                    flush=True,
                )

        # 3. memory: one association with the big series (storescp in one process).
        memory: dict[str, Sample] = {}
        for name in names:
            memory[name] = measure(name, workdir, [big])
            print(
                f"  big {name:9s} {memory[name].seconds:6.2f}s  "
                f"VmHWM {memory[name].hwm_after_kb / 1024:.0f} MB",
                file=sys.stderr,
                flush=True,
            )

        # 4. several receivers
        postgres = Postgres()
        load, profile = run_load(args, workdir, load_series, postgres)

        report = render(
            args,
            single,
            concurrent,
            memory,
            main_series,
            many,
            big,
            orthanc_version,
            time.monotonic() - t0,
        )
        report += "\n\n" + "\n".join(render_load(load, load_series, profile))
        print(report)
        if keep:
            (workdir / "receive.md").write_text(report + "\n")
        return 0
    except BenchmarkError as exc:
        print(f"receive.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("receive.py: interrupted, stopping receivers", file=sys.stderr)
        return 130
    finally:
        for process in list(SENDERS):
            stop_group(process)
        for receiver in list(LIVE):
            receiver.stop()
            drop_tree(receiver.root)
        if postgres is not None:
            postgres.remove()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_load(
    args: argparse.Namespace,
    workdir: Path,
    series: Sequence[Sequence[Path]],
    postgres: Postgres,
) -> tuple[dict[str, list[LoadSample]], str]:
    """The several-receivers scenario, ``--runs`` times, configurations interleaved."""
    load: dict[str, list[LoadSample]] = {config: [] for config in LOAD_CONFIGS}
    profile = ""
    for run in range(args.runs):
        for config in LOAD_CONFIGS:
            spy = args.py_spy if (run == 0 and config == ONE) else None
            sample, stacks = measure_load(config, workdir, series, postgres, spy)
            profile = profile or stacks
            load[config].append(sample)
            print(
                f"  load run {run + 1}/{args.runs} {config:52s} {sample.seconds:6.2f}s  "
                f"CPU {sample.cpu_s:5.2f}s  {sample.associations}",
                file=sys.stderr,
                flush=True,
            )
    if profile and args.out is not None:
        (workdir / "profile-serve.raw").write_text(profile)  # py-spy's raw (collapsed) stacks
    if args.py_spy is not None:  # the profiled run is slower: measure it once more, unwatched
        load[ONE][0] = measure_load(ONE, workdir, series, postgres)[0]
    return load, profile


def render_load(
    load: dict[str, list[LoadSample]], series: Sequence[Sequence[Path]], profile: str
) -> list[str]:
    total = sum(len(files) for files in series)
    runs = len(load[FORK])
    fork = statistics.median(s.seconds for s in load[FORK])
    lines = [
        f"### Several receivers: {len(series)} storescu at once, {len(series[0])} instances "
        f"each ({LOAD_ROWS}x{LOAD_ROWS} CT, {megabytes([p for s in series for p in s]):.0f} MB), "
        f"start to last exit 0, {runs} runs",
        "",
        "| receivers | median s | min s | instances/s | / storescp --fork | receivers CPU s "
        "| PostgreSQL CPU s | associations per receiver (last run) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for config, samples in load.items():
        med = statistics.median(s.seconds for s in samples)
        db = statistics.median(s.db_cpu_s for s in samples)
        per = ", ".join(f"{k}: {v}" for k, v in sorted(samples[-1].associations.items()))
        lines.append(
            f"| {config} | {med:.2f} | {min(s.seconds for s in samples):.2f} | "
            f"{total / med:.0f} | {med / fork:.2f} | "
            f"{statistics.median(s.cpu_s for s in samples):.2f} | "
            f"{f'{db:.2f}' if db else '-'} | {per or '-'} |"
        )
    lines += [
        "",
        "Ours receive only (no routes, no worker, no API); the serve's own C-ECHO at start is one "
        "of its associations. Every instance is fsynced and indexed "
        "before its Success (SQLite: WAL, synchronous=FULL; PostgreSQL: fsync on, synchronous "
        "commit). storescp --fork writes each file without fsync and indexes nothing. CPU s: "
        "user+system of the receiver processes and their children during the send.",
    ]
    if profile:
        lines += [
            "",
            "Profile of the 1-process serve (py-spy, 250 Hz, idle samples included, first run):",
            "",
            *summarise_profile(profile),
        ]
    return lines


def render(
    args: argparse.Namespace,
    single: dict[str, list[Sample]],
    concurrent: dict[str, list[Sample]],
    memory: dict[str, Sample],
    main_series: Sequence[Path],
    many: Sequence[Sequence[Path]],
    big: Sequence[Path],
    orthanc_version: str,
    total_s: float,
) -> str:
    mb = megabytes(main_series)
    n = len(main_series)
    lines = [
        *machine(),
        f"- Orthanc {orthanc_version}",
        f"- command: `.venv/bin/python benchmarks/receive.py --slices {args.slices} "
        f"--runs {args.runs} --big {args.big}` (took {total_s:.0f}s)",
        "",
        f"### One association: {n} slices 512x512x16-bit CT ({mb:.0f} MB), "
        f"storescu start to exit 0, {args.runs} runs",
        "",
        "| receiver | median s | min s | MB/s | instances/s | receiver CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians = {}
    for name, samples in single.items():
        med = statistics.median(s.seconds for s in samples)
        medians[name] = med
        lines.append(
            f"| {name} | {med:.2f} | {min(s.seconds for s in samples):.2f} | {mb / med:.0f} | "
            f"{n / med:.0f} | {statistics.median(s.cpu_s for s in samples):.2f} |"
        )
    lines += [
        "",
        f"- ours / Orthanc (median): {fmt_ratio(medians[OURS] / medians[ORTHANC], 1)}",
        f"- ours / storescp (median): {fmt_ratio(medians[OURS] / medians[STORESCP], 2)}",
        "",
        f"### {len(many)} associations at once: {len(many)} storescu, {len(many)} series of "
        f"{len(many[0])} slices ({megabytes([p for s in many for p in s]):.0f} MB), "
        "start to last exit 0",
        "",
        "| receiver | median s | min s | MB/s | instances/s | stored | receiver CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    total_mb = megabytes([p for s in many for p in s])
    total_n = sum(len(s) for s in many)
    cmed = {}
    for name, samples in concurrent.items():
        med = statistics.median(s.seconds for s in samples)
        cmed[name] = med
        label = f"{name} (--fork)" if name == STORESCP else name
        lines.append(
            f"| {label} | {med:.2f} | {min(s.seconds for s in samples):.2f} | "
            f"{total_mb / med:.0f} | {total_n / med:.0f} | {samples[0].stored} | "
            f"{statistics.median(s.cpu_s for s in samples):.2f} |"
        )
    lines += [
        "",
        f"- ours / Orthanc (median): {fmt_ratio(cmed[OURS] / cmed[ORTHANC], 1)}",
        f"- ours / storescp (median): {fmt_ratio(cmed[OURS] / cmed[STORESCP], 2)}",
        "",
        f"### Memory: one association, {len(big)} slices ({megabytes(big):.0f} MB)",
        "",
        "| receiver | RSS before MB | peak RSS (VmHWM) after MB | send s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, sample in memory.items():
        lines.append(
            f"| {name} | {sample.rss_before_kb / 1024:.0f} | {sample.hwm_after_kb / 1024:.0f} | "
            f"{sample.seconds:.2f} |"
        )
    ours_peak = memory[OURS].hwm_after_kb / 1024
    lines += [
        "",
        f"- our peak RSS: {ours_peak:.0f} MB "
        f"(target < 300 MB: {'met' if ours_peak < 300 else 'MISSED'})",
        "",
        "Notes: every receiver is started fresh with empty storage for each run; startup is not "
        "timed. dicomnode receives only (no routes, no embedded worker, no API). dicomnode and "
        "Orthanc fsync each file and commit an index row before "
        "acknowledging (Orthanc SyncStorageArea=true, its default); storescp only writes the file. "
        "Max PDU as each receiver offers by default: dicomnode unlimited (storescu then sends "
        "128 KB PDVs), storescp and Orthanc 16 KB. Receiver CPU s: user+system time of the "
        "receiver process (and of children it reaped) during the send. MB = 10^6 bytes.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
