#!/usr/bin/env python3
"""Admin listing benchmark: ``dicomnode jobs list`` (the CLI, in-process) and ``GET /api/jobs``
(uvicorn on loopback, with a bearer token) with 100,000 jobs in the database, on SQLite and
PostgreSQL.

    .venv/bin/python benchmarks/admin.py [--rows 100000] [--runs 50] [--postgres-url URL]
                                         [--skip-sqlite] [--skip-postgres]

The jobs table is filled by benchmarks/job_queue.py's generator (mostly done, a few failed, queued,
cancelled; one study per five jobs), plus the index rows the accession and patient filters join
(one study per five jobs, one patient per two studies). Each case runs 3 times to warm up, then
``--runs`` times; p50 and p95 in milliseconds. The CLI case is the whole command as a user runs
it, minus the interpreter's start: settings, opening the database, the query, the JSON
printed. Target: p95 under 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, insert  # noqa: E402

from dicomnode.db.models import Patient, Study  # noqa: E402


def _queue_benchmark() -> Any:
    """benchmarks/job_queue.py, loaded by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_queue", REPO / "benchmarks/job_queue.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _queue_benchmark()
TOKEN = "bench-token"


def fill_index(engine: Engine, rows: int) -> None:
    """The patients and studies of the generator's jobs (study ``i // 5``)."""
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    studies = (rows + 4) // 5
    with engine.begin() as connection:
        connection.execute(
            insert(Patient.__table__),
            [
                {"id": p + 1, "patient_id": f"PID{p:06d}", "issuer_of_patient_id": "",
                 "patient_name": f"Bench^{p}", "birth_date": "", "sex": ""}
                for p in range((studies + 1) // 2)
            ],
        )  # fmt: skip
        connection.execute(
            insert(Study.__table__),
            [
                {"study_instance_uid": f"{bench.STUDY_ROOT}.{s}", "patient_pk": s // 2 + 1,
                 "study_date": "", "study_time": "", "study_id": "",
                 "accession_number": f"ACC{s:07d}", "study_description": "",
                 "referring_physician_name": "", "first_received_at": now,
                 "last_received_at": now}
                for s in range(studies)
            ],
        )  # fmt: skip
    bench.analyze(engine)


def cases(rows: int) -> list[tuple[str, dict[str, str]]]:
    """(name, filters as the API's query parameters)."""
    study = rows // 10  # a study in the middle of the table
    return [
        ("newest 50", {}),
        ("offset 1000", {"offset": "1000"}),
        ("status=failed", {"status": "failed"}),
        ("status=queued,waiting", {"status": "queued,waiting"}),
        ("model=retina_oct", {"model": "retina_oct"}),
        ("study=UID", {"study": f"{bench.STUDY_ROOT}.{study}"}),
        ("accession=", {"accession": f"ACC{study:07d}"}),
        ("patient_id=", {"patient_id": f"PID{study // 2:06d}"}),
        ("since=11d", {"since": "11d"}),
        ("status=failed&model=echo&since=11d",
         {"status": "failed", "model": "echo", "since": "11d"}),
    ]  # fmt: skip


def cli_call(url: str, params: dict[str, str]) -> Callable[[], object]:
    from dicomnode.cli import main

    options = {"status": "--state", "patient_id": "--patient-id"}
    argv = ["jobs", "list", "--json"]
    for key, value in params.items():
        argv += [options.get(key, f"--{key}"), value]

    def call() -> object:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv)
        if code != 0:
            raise RuntimeError(f"jobs list {argv} exited {code}")
        return out.getvalue()

    return call


def measure(url: str, rows: int, runs: int, folder: Path) -> list[tuple[str, float, float, float,
                                                                        float, int]]:  # fmt: skip
    """(case, CLI p50, CLI p95, API p50, API p95, jobs in the API's page) per case."""
    import httpx
    from prometheus_client import generate_latest

    from dicomnode.admin import throughput
    from dicomnode.api.metrics import make_registry
    from dicomnode.app import open_database
    from dicomnode.config import Settings
    from dicomnode.testing.jobs import api_server

    engine = bench.fresh_engine(url)
    with engine.begin() as connection:  # fresh_engine empties jobs only
        connection.exec_driver_sql("DELETE FROM studies")
        connection.exec_driver_sql("DELETE FROM patients")
    bench.fill(engine, rows, state_for=bench.mixed_state(rows))
    fill_index(engine, rows)
    engine.dispose()
    os.environ.pop("DICOMNODE_CONFIG", None)
    os.environ["DICOMNODE_NODE__DATABASE_URL"] = url
    os.environ["DICOMNODE_NODE__STORAGE_DIR"] = str(folder)
    settings = Settings(
        node={"storage_dir": folder, "database_url": url}, api={"port": 0, "token": TOKEN}
    )
    database = open_database(settings, migrate=False)
    out = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with api_server(settings, database.sessions) as server, httpx.Client(
        base_url=server.url, headers=headers, timeout=30
    ) as http:  # fmt: skip

        def api(params: dict[str, str]) -> Callable[[], object]:
            def call() -> object:
                response = http.get("/api/jobs", params=params)
                response.raise_for_status()
                return response.json()["jobs"]

            return call

        for name, params in cases(rows):
            cli_p50, cli_p95, _ = bench.timings(cli_call(url, params), runs)
            api_p50, api_p95, size = bench.timings(api(params), runs)
            out.append((name, cli_p50, cli_p95, api_p50, api_p95, size))
        # the two reads that scan the whole table, without the API's 5 s memo
        ctx = server.ctx
        registry = make_registry(ctx)

        def summary() -> object:
            with ctx.sessions() as session:
                return ctx.jobs.counts_by_state(), throughput(session)

        for name, call in (
            ("/api/summary, uncached", summary),
            ("/metrics, uncached", lambda: generate_latest(registry)),
        ):
            p50, p95, _ = bench.timings(call, max(3, runs // 5))
            out.append((name, float("nan"), float("nan"), p50, p95, 0))
    database.engine.dispose()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="jobs in the table (100000)")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per case (50)")
    parser.add_argument("--postgres-url", help="an existing database (its jobs are deleted!)")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args(argv)

    started = time.monotonic()
    results: dict[str, list[tuple[str, float, float, float, float, int]]] = {}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as folder:
        backends: list[tuple[str, str]] = []
        if not args.skip_postgres:
            url = stack.enter_context(bench.postgres(args.postgres_url))
            if url:
                backends.append(("PostgreSQL", url))
        if not args.skip_sqlite:
            backends.append(("SQLite", f"sqlite:///{Path(folder) / 'admin.db'}"))
        for name, url in backends:
            results[name] = measure(url, args.rows, args.runs, Path(folder))

    print("# Admin listing benchmark\n")
    print("\n".join(bench.machine()))
    command = " ".join(["benchmarks/admin.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"- command: `{command}` (took {time.monotonic() - started:.0f} s)\n")
    worst = 0.0
    for name, rows in results.items():
        print(f"## {name}: {args.rows:,} jobs, {args.runs} runs per case, ms\n")
        print("| case | jobs | `jobs list --json` p50 | p95 | `GET /api/jobs` p50 | p95 |")
        # (the last two rows: in-process, without HTTP)
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for case, cli50, cli95, api50, api95, size in rows:
            cli = "-" if cli50 != cli50 else f"{cli50:.1f} | {cli95:.1f}"
            cli = "- | -" if cli == "-" else cli
            print(f"| {case} | {size} | {cli} | {api50:.1f} | {api95:.1f} |")
            if "uncached" not in case:
                worst = max(worst, cli95, api95)
        print()
    verdict = "met" if worst < 100 else "MISSED"
    print(f"Slowest listing p95: {worst:.1f} ms (target < 100 ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
