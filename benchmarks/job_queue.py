#!/usr/bin/env python3
"""Job queue benchmark: claim-and-finish throughput of worker processes, and listing jobs from a
large table, on PostgreSQL and on SQLite.

    .venv/bin/python benchmarks/job_queue.py [--jobs 3000] [--workers 4] [--rows 100000] [--runs 50]
                                         [--postgres-url URL] [--skip-sqlite] [--skip-postgres]

1. Throughput: ``--jobs`` queued jobs (all priorities), then ``--workers`` processes, each a
   :class:`dicomnode.queue.worker.Worker` with the echo test model (claim, heartbeat thread, run,
   finish: the real loop, minus a real model), released together; the time runs from the release
   until the last process found the queue empty. Every job must end ``done`` exactly once.
2. Listing: ``--rows`` jobs in the table (mostly done, as on a node that has run for a while; a
   few failed, queued, cancelled), then the repository's ``list`` with limit 50, newest first,
   unfiltered and filtered, and ``counts_by_state`` (the dashboard's header), each ``--runs``
   times after 3 warm-up calls; p50 and p95 in milliseconds. Target: under 100 ms.
3. Claim with a backlog: ``--rows`` jobs queued at once (a burst, or workers down for a while);
   the time of one claim, ``--runs`` times.

Without ``--postgres-url`` a private PostgreSQL server is started (Debian package postgresql) and
removed after; SQLite runs on a file in a temporary folder, as ``serve`` uses it (WAL, FULL sync).
Prints a markdown report.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, create_engine, insert, select, text, update  # noqa: E402

from dicomnode.config import QueueSettings  # noqa: E402
from dicomnode.db import make_engine, upgrade  # noqa: E402
from dicomnode.db.models import Job  # noqa: E402
from dicomnode.domain import JobState  # noqa: E402
from dicomnode.queue import JobRepository  # noqa: E402
from dicomnode.queue.listing import JobFilter  # noqa: E402

STUDY_ROOT = "1.2.826.0.1.3680043.99.9"
MODELS = ("lung_nodule_ct_detection", "brats_mri_segmentation", "retina_oct", "echo", "spine_ct")
#: (state, share of the rows) for the listing table
MIX = (
    (JobState.DONE, 0.90),
    (JobState.FAILED, 0.04),
    (JobState.SKIPPED, 0.03),
    (JobState.QUEUED, 0.02),
    (JobState.WAITING, 0.009),
    (JobState.CANCELLED, 0.001),
)


# -- setup --------------------------------------------------------------------------------------


def fresh_engine(url: str) -> Engine:
    """An empty, migrated jobs table (SQLite: a new file)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("delete from jobs"))
    return engine


def analyze(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")


def job_row(i: int, state: JobState, now: datetime, rng: random.Random) -> dict[str, Any]:
    at = now - timedelta(seconds=(10**6 - i))
    final = state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED)
    return {
        "dedupe_key": f"bench/{i}",
        "route": "bench",
        "model": MODELS[i % len(MODELS)],
        "level": "series",
        "state": state.value,
        "priority": rng.choice((0, 0, 0, 1, 2)),
        "study_instance_uid": f"{STUDY_ROOT}.{i // 5}",
        "series_instance_uid": f"{STUDY_ROOT}.{i // 5}.{i % 5}",
        "inputs": [f"{STUDY_ROOT}.{i // 5}.{i % 5}"],
        "destinations": ["PACS"],
        "attempts": 1 if final else 0,
        "max_attempts": 3,
        "run_after": at,
        "error": "RuntimeError: example" if state is JobState.FAILED else None,
        "result": {"series_count": 1} if state is JobState.DONE else None,
        "received_at": at,
        "completed_at": at,
        "queued_at": at,
        "started_at": at if final else None,
        "finished_at": at if final else None,
        "updated_at": at,
    }


def fill(engine: Engine, rows: int, *, state_for: Callable[[int], JobState], **same: Any) -> None:
    """Insert ``rows`` jobs; ``same`` overrides columns in every row."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    batch = 5000
    for start in range(0, rows, batch):
        values = [
            {**job_row(i, state_for(i), now, rng), **same}
            for i in range(start, min(rows, start + batch))
        ]
        with engine.begin() as connection:
            connection.execute(insert(Job.__table__), values)
    analyze(engine)


def mixed_state(rows: int) -> Callable[[int], JobState]:
    rng = random.Random(11)
    states = rng.choices([s for s, _ in MIX], weights=[w for _, w in MIX], k=rows)
    # The newest few hundred are still in flight, as on a live node.
    for i in range(max(0, rows - 300), rows):
        states[i] = JobState.QUEUED if i % 3 else JobState.WAITING
    return lambda i: states[i]


# -- throughput ---------------------------------------------------------------------------------


def _worker_process(url: str, name: str, barrier: Any, results: Any) -> None:
    from dicomnode.queue.worker import Worker
    from dicomnode.testing.models import load_models

    engine = make_engine(url)
    repository = JobRepository(engine, QueueSettings(lease_s=60, heartbeat_s=10))
    worker = Worker(repository, load_models(["echo"]), worker_id=name)
    worker.load_models()
    repository.list(limit=1)  # connect before the clock starts
    barrier.wait()
    started = time.perf_counter()
    while worker.run_once():
        pass
    results.put((name, worker.jobs_run, time.perf_counter() - started))
    engine.dispose()


def throughput(url: str, jobs: int, workers: int) -> dict[str, float]:
    engine = fresh_engine(url)
    fill(engine, jobs, state_for=lambda _i: JobState.QUEUED, model="echo", destinations=[])
    engine.dispose()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers + 1)
    results = context.Queue()
    processes = [
        context.Process(target=_worker_process, args=(url, f"bench-{n}", barrier, results))
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    barrier.wait(timeout=120)
    started = time.perf_counter()
    finished = [results.get(timeout=600) for _ in processes]
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join(timeout=60)
    engine = make_engine(url)
    counts = JobRepository(engine).counts_by_state()
    engine.dispose()
    ran = sum(n for _, n, _ in finished)
    if counts[JobState.DONE] != jobs or ran != jobs:
        raise RuntimeError(f"expected {jobs} jobs done once each; ran {ran}, counts {counts}")
    return {
        "jobs": jobs,
        "seconds": elapsed,
        "jobs_per_s": jobs / elapsed,
        "min_share": min(n for _, n, _ in finished) / jobs,
        "max_share": max(n for _, n, _ in finished) / jobs,
    }


# -- listing ------------------------------------------------------------------------------------


def timings(call: Callable[[], object], runs: int) -> tuple[float, float, int]:
    for _ in range(3):
        result = call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        result = call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    size = len(result) if isinstance(result, list | dict) else 0
    return statistics.median(samples), p95, size


def listing(url: str, rows: int, runs: int) -> list[tuple[str, float, float, int]]:
    engine = fresh_engine(url)
    fill(engine, rows, state_for=mixed_state(rows))
    repo = JobRepository(engine)
    study = f"{STUDY_ROOT}.{rows // 10}"
    cases: list[tuple[str, Callable[[], object]]] = [
        ("list(limit=50) newest first", lambda: repo.list(limit=50)),
        ("list(limit=50, offset=1000)", lambda: repo.list(limit=50, offset=1000)),
        ("list(state=failed)", lambda: repo.list(JobFilter(state="failed"), limit=50)),
        ("list(state=cancelled) (rare)", lambda: repo.list(JobFilter(state="cancelled"), limit=50)),
        (
            "list(state=queued,waiting)",
            lambda: repo.list(JobFilter(state=["queued", "waiting"]), limit=50),
        ),
        ("list(model=retina_oct)", lambda: repo.list(JobFilter(model="retina_oct"), limit=50)),
        (
            "list(state=failed, model=echo)",
            lambda: repo.list(JobFilter(state="failed", model="echo")),
        ),
        ("list(study=UID)", lambda: repo.list(JobFilter(study=study), limit=50)),
        ("counts_by_state()", repo.counts_by_state),
    ]
    out = []
    for name, call in cases:
        p50, p95, size = timings(call, runs)
        out.append((name, p50, p95, size))
    engine.dispose()
    return out


def claim_backlog(url: str, rows: int, runs: int) -> tuple[float, float]:
    """One claim (p50, p95 ms) while ``rows`` jobs wait in the queue, of mixed priorities."""
    engine = fresh_engine(url)
    fill(engine, rows, state_for=lambda _i: JobState.QUEUED, model="echo", destinations=[])
    repo = JobRepository(engine)
    p50, p95, _ = timings(lambda: [repo.claim("bench", {"echo"})], runs)
    engine.dispose()
    return p50, p95


# -- report -------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[str | None]:
    if url:
        yield url
        return
    from dicomnode.testing.postgres import postgres_bin, postgres_server

    if postgres_bin() is None:
        print("PostgreSQL is not installed; skipping it", file=sys.stderr)
        yield None
        return
    with postgres_server() as started:
        yield started


def machine() -> list[str]:
    import sqlalchemy

    lines = [f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"]
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as fh:
        model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    lines.append(
        f"- machine: {os.cpu_count()} CPUs {model}, {platform.system()} {platform.release()}"
    )
    lines.append(f"- python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}")
    return lines


LATENCY_CONFIG = """
workers = []
[[routes]]
name = "chest"
model = "echo"
match = { Modality = "CT" }
"""


def release_latency(series: int, slices: int, folder: Path) -> list[dict[str, float]]:
    """Send ``series`` CT series, each in one storescu association, to a `dicomnode serve`;
    for each, from the association's release (the node's own clock, its associations row) to
    the job's queued_at, and from storescu's exit to the queued job being visible."""
    from dicomnode.db.models import Association
    from dicomnode.phantoms.simple import SeriesSpec, ct_slices
    from dicomnode.phantoms.writer import write_series
    from dicomnode.testing import peers
    from dicomnode.testing.process import ServeProcess

    config = folder / "latency.toml"
    config.write_text(LATENCY_CONFIG)
    node = ServeProcess(folder / "latency-node", config=config).start()
    engine = create_engine(f"sqlite:///{folder / 'latency-node' / 'dicomnode.db'}")
    results = []
    try:
        for number in range(series):
            files = write_series(
                ct_slices(SeriesSpec(slices=slices, rows=512, columns=512, seed=900 + number)),
                folder / f"latency-{number}",
            )
            result = peers.storescu(node.port, files)
            exited = time.monotonic()
            if result.returncode != 0:
                raise RuntimeError(f"storescu failed: {result.stderr}")
            while True:
                with engine.connect() as connection:
                    queued = connection.execute(
                        select(Job.queued_at).where(Job.state == "queued").order_by(Job.id.desc())
                    ).first()
                    released = connection.execute(
                        select(Association.closed_at).order_by(Association.id.desc())
                    ).first()
                if queued and queued[0] and released and released[0]:
                    seen = time.monotonic() - exited
                    break
                if time.monotonic() - exited > 60:
                    raise RuntimeError("the job was not queued within 60 s")
                time.sleep(0.01)
            results.append({
                "release_to_queued": (queued[0] - released[0]).total_seconds(),
                "exit_to_seen": seen,
            })  # fmt: skip
            with engine.begin() as connection:  # keep the next series' job the only queued one
                connection.execute(update(Job).values(state="done"))
    finally:
        node.stop()
        engine.dispose()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs to drain (default 3000)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows for listing (100000)")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per listing (50)")
    parser.add_argument("--postgres-url", help="an existing database (its jobs are deleted!)")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--latency-series", type=int, default=5, help="series sent (default 5)")
    parser.add_argument("--latency-slices", type=int, default=300, help="slices each (300)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    backends: list[tuple[str, str]] = []
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as folder:
        if not args.skip_postgres:
            url = stack.enter_context(postgres(args.postgres_url))
            if url:
                backends.append(("PostgreSQL", url))
        if not args.skip_sqlite:
            backends.append(("SQLite", f"sqlite:///{Path(folder) / 'queue.db'}"))
        through = {name: throughput(url, args.jobs, args.workers) for name, url in backends}
        lists = {name: listing(url, args.rows, args.runs) for name, url in backends}
        backlog = {name: claim_backlog(url, args.rows, args.runs) for name, url in backends}
        latency = release_latency(args.latency_series, args.latency_slices, Path(folder))

    print("# Job queue benchmark\n")
    print("\n".join(machine()))
    command = " ".join(["benchmarks/job_queue.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"- command: `{command}` (took {time.monotonic() - started:.0f} s)\n")
    print(
        f"## Claim-and-finish throughput: {args.workers} worker processes, {args.jobs} jobs\n\n"
        "| database | jobs | seconds | jobs/s | least / most jobs per worker |\n"
        "| --- | ---: | ---: | ---: | ---: |"
    )
    for name, r in through.items():
        print(
            f"| {name} | {r['jobs']:.0f} | {r['seconds']:.2f} | {r['jobs_per_s']:.0f} | "
            f"{r['min_share']:.0%} / {r['max_share']:.0%} |"
        )
    print(f"\n## Listing with {args.rows:,} jobs in the table ({args.runs} runs, ms)\n")
    names = list(lists)
    print("| call | rows | " + " | ".join(f"{n} p50 | {n} p95" for n in names) + " |")
    print("| --- | ---: | " + " | ".join("---: | ---:" for _ in names) + " |")
    for i, (case, *_rest) in enumerate(next(iter(lists.values()), [])):
        size = lists[names[0]][i][3]
        cells = " | ".join(f"{lists[n][i][1]:.2f} | {lists[n][i][2]:.2f}" for n in names)
        print(f"| {case} | {size} | {cells} |")
    print(
        f"\n## One claim with {args.rows:,} jobs queued ({args.runs} runs, ms)\n\n"
        "| database | p50 | p95 |\n| --- | ---: | ---: |"
    )
    for name, (p50, p95) in backlog.items():
        print(f"| {name} | {p50:.2f} | {p95:.2f} |")
    worst = max((row[2] for rows in lists.values() for row in rows), default=0.0)
    verdict = "met" if worst < 100 else "MISSED"
    print(f"\nSlowest p95: {worst:.1f} ms (target < 100 ms: {verdict})")
    print(
        f"\n## Association release to job queued: {args.latency_series} series of "
        f"{args.latency_slices} slices (512x512), each in one storescu association, "
        "`dicomnode serve` on SQLite\n\n"
        "| series | release -> queued (node clock) s | storescu exit -> queued seen s |\n"
        "| ---: | ---: | ---: |"
    )
    for number, row in enumerate(latency, start=1):
        print(f"| {number} | {row['release_to_queued']:.3f} | {row['exit_to_seen']:.3f} |")
    slowest = max(row["release_to_queued"] for row in latency)
    print(
        f"\nSlowest release -> queued: {slowest:.3f} s (target < 1 s: "
        f"{'met' if slowest < 1 else 'MISSED'}); the anchors wait a fixed 60 s per series "
        "(mercure) or a 60 s stable age (Orthanc)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
