"""``dicomnode worker`` processes sharing one queue: each job runs exactly once, and the job of a
worker killed mid-run is finished by another once its lease expires.

The echo test model appends a line per run to a shared file (``DICOMNODE_TEST_RUN_LOG``), so the
test sees every run, not only the end state in the database.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from dicomnode.db import make_engine, upgrade
from dicomnode.domain import JobState, Priority
from dicomnode.queue import JobRepository
from dicomnode.testing.models import RUN_LOG_ENV
from dicomnode.testing.peers import missing_peer
from dicomnode.testing.waiting import wait_until

STUDY = "1.2.826.0.1.3680043.99.400"
CLI = (sys.executable, "-m", "dicomnode.testing.cli")
#: the reliability suite's queue: a thousand jobs, each run exactly once
JOBS = 1000


class Workers:
    """Starts ``dicomnode worker`` processes on one database; kills leftovers at the end."""

    def __init__(self, folder: Path, database_url: str) -> None:
        self.folder = folder
        self.run_log = folder / "runs.log"
        self.env = {
            **os.environ,
            "DICOMNODE_NODE__STORAGE_DIR": str(folder / "var"),
            "DICOMNODE_NODE__DATABASE_URL": database_url,
            RUN_LOG_ENV: str(self.run_log),
        }
        self.env.pop("DICOMNODE_CONFIG", None)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [*CLI, "worker", "--models", "echo", "--worker-id", name],
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes[name] = process
        return process

    def wait_ready(self, *names: str, timeout: float = 60) -> None:
        for name in names:
            wait_until(
                lambda n=name: f"worker {n} running" in self.output(n),
                timeout=timeout,
                what=f"worker {name} running",
            )

    def output(self, name: str) -> str:
        process = self.processes[name]
        text_ = (self.folder / f"{name}.log").read_text(errors="replace")
        if process.poll() is not None and "running" not in text_:
            raise AssertionError(f"worker {name} exited with {process.returncode}:\n{text_}")
        return text_

    def runs(self) -> list[tuple[str, int, int, str]]:
        """(event, job id, attempt, worker) for every line of the run log."""
        if not self.run_log.exists():
            return []
        lines = self.run_log.read_text().splitlines()
        return [(e, int(j), int(a), w) for e, j, a, w in (line.split() for line in lines)]

    def stop_all(self) -> dict[str, int]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        return {name: p.wait(timeout=30) for name, p in self.processes.items()}

    def kill_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def echo_jobs(
    repo: JobRepository, count: int, route: str, *, mixed_priorities: bool = False
) -> set[int]:
    """``count`` queued jobs for the echo model, one series each; their ids."""
    priorities = (Priority.ROUTINE, Priority.URGENT, Priority.STAT)
    return {
        repo.enqueue(
            dedupe_key=f"{route}/{i}",
            route=route,
            model="echo",
            study_instance_uid=STUDY,
            series_instance_uid=f"{STUDY}.{i}",
            inputs=[f"{STUDY}.{i}"],
            priority=priorities[i % 3] if mixed_priorities else Priority.ROUTINE,
            state=JobState.QUEUED,
        ).id
        for i in range(count)
    }


@pytest.fixture
def queue_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    kind = getattr(request, "param", "postgresql")
    if kind == "postgresql":
        request.applymarker(pytest.mark.postgres)
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'queue.db'}"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("delete from jobs"))
    yield url, engine
    engine.dispose()


@pytest.fixture
def workers(queue_database: tuple[str, Engine], tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path, queue_database[0])
    yield started
    started.kill_all()


@pytest.mark.slow
def test_three_workers_drain_1000_jobs_each_exactly_once(
    queue_database: tuple[str, Engine], workers: Workers
) -> None:
    names = ["w1", "w2", "w3"]
    for name in names:
        workers.start(name)
    workers.wait_ready(*names)
    repo = JobRepository(queue_database[1])
    ids = echo_jobs(repo, JOBS, "drain", mixed_priorities=True)
    wait_until(lambda: repo.counts_by_state()[JobState.DONE] == JOBS, timeout=240, interval=0.2)
    assert workers.stop_all() == dict.fromkeys(names, 0)  # SIGTERM: a clean stop

    runs = workers.runs()
    started = Counter(job for event, job, _, _ in runs if event == "start")
    assert set(started) == ids and len(started) == JOBS
    assert max(started.values()) == 1, [job for job, n in started.items() if n > 1]
    ran_by = {job: worker for event, job, _, worker in runs if event == "end"}
    assert set(ran_by) == ids
    assert set(ran_by.values()) == set(names)  # all three took part
    for job in repo.list(limit=JOBS):
        assert job.state is JobState.DONE and job.attempts == 1
        assert job.lease_owner == ran_by[job.id] == job.result["worker_id"]  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.parametrize("queue_database", ["postgresql", "sqlite"], indirect=True)
def test_a_killed_workers_job_is_finished_by_another(
    queue_database: tuple[str, Engine], workers: Workers
) -> None:
    short_lease = {"DICOMNODE_QUEUE__LEASE_S": "2", "DICOMNODE_QUEUE__HEARTBEAT_S": "0.3"}
    workers.start("doomed", **short_lease)
    workers.wait_ready("doomed")
    repo = JobRepository(queue_database[1])
    job = repo.enqueue(
        dedupe_key="slow/1",
        # long enough for the survivor to start beside it on a loaded machine (4-5 s to import)
        route="slow?sleep=8",
        model="echo",
        study_instance_uid=STUDY,
        inputs=[f"{STUDY}.1"],
        state=JobState.QUEUED,
    )
    wait_until(lambda: ("start", job.id, 1, "doomed") in workers.runs(), timeout=30)
    workers.start("survivor", **short_lease)
    workers.wait_ready("survivor")
    # The doomed worker still heartbeats, so the survivor cannot take the job yet.
    running = repo.get(job.id)
    assert running is not None and running.state is JobState.RUNNING
    assert running.lease_owner == "doomed"

    workers.processes["doomed"].send_signal(signal.SIGKILL)
    workers.processes["doomed"].wait(timeout=10)
    killed_at = time.monotonic()
    wait_until(lambda: repo.counts_by_state()[JobState.DONE] == 1, timeout=30, interval=0.1)
    recovery_s = time.monotonic() - killed_at

    done = repo.get(job.id)
    assert done is not None and done.state is JobState.DONE
    assert done.attempts == 2 and done.lease_owner == "survivor" and done.error is None
    assert workers.runs() == [
        ("start", job.id, 1, "doomed"),
        ("start", job.id, 2, "survivor"),
        ("end", job.id, 2, "survivor"),
    ]
    # lease (2 s) + a reap interval (1 s) + the run (8 s), with room for a slow machine
    assert recovery_s < 20
    assert workers.stop_all()["survivor"] == 0


def result_files(storage: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``results/`` (staging folders included): relative path -> (sha256,
    mtime in ns)."""
    root = storage / "results"
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize("queue_database", ["postgresql", "sqlite"], indirect=True)
def test_a_worker_paused_past_its_lease_changes_no_result_file(
    queue_database: tuple[str, Engine], workers: Workers
) -> None:
    """SIGSTOP (a GC pause, a partition) past the lease: another worker runs the job and
    publishes its files; the paused one, resumed, writes its own but publishes nothing."""
    short_lease = {"DICOMNODE_QUEUE__LEASE_S": "2", "DICOMNODE_QUEUE__HEARTBEAT_S": "0.3"}
    workers.start("paused", **short_lease)
    workers.wait_ready("paused")
    repo = JobRepository(queue_database[1])
    job = repo.enqueue(
        dedupe_key="slow/1",
        route="slow?sleep=1&write=1",
        model="echo",
        study_instance_uid=STUDY,
        inputs=[f"{STUDY}.1"],
        state=JobState.QUEUED,
    )
    wait_until(lambda: ("start", job.id, 1, "paused") in workers.runs(), timeout=30)
    paused = workers.processes["paused"]
    paused.send_signal(signal.SIGSTOP)
    try:
        workers.start("survivor", **short_lease)
        workers.wait_ready("survivor")
        done = wait_until(
            lambda: (j := repo.get(job.id)) and j.state is JobState.DONE and j,
            timeout=60,
            what="the survivor to finish the job",
        )
        storage = workers.folder / "var"
        published = result_files(storage)  # while the paused worker is still stopped
    finally:
        paused.send_signal(signal.SIGCONT)
    assert list(published) == [f"{job.id}/echo.json"]
    written = (storage / "results" / str(job.id) / "echo.json").read_text()
    assert '"attempt": 2' in written and '"worker_id": "survivor"' in written

    # The paused worker wakes, ends its run (writing its files) and finds its lease gone.
    wait_until(lambda: ("end", job.id, 1, "paused") in workers.runs(), timeout=30)
    wait_until(lambda: "dropped" in workers.output("paused"), timeout=30, what="result dropped")
    staging = storage / "results" / ".staging"
    wait_until(
        lambda: not staging.exists() or not any(staging.iterdir()),
        timeout=30,
        what="the paused worker's staging folder removed",
    )
    assert result_files(storage) == published  # the same bytes, never rewritten
    after = repo.get(job.id)
    assert after is not None and after.state is JobState.DONE
    assert after.result == done.result and after.lease_owner == "survivor"
    assert workers.stop_all() == {"paused": 0, "survivor": 0}


@pytest.mark.slow
@pytest.mark.postgres
def test_a_database_restart_loses_no_job(tmp_path: Path) -> None:
    from dicomnode.testing.postgres import PostgresServer, postgres_bin

    if postgres_bin() is None:
        missing_peer("PostgreSQL is not installed (Debian package postgresql)")
    server = PostgresServer().start()
    workers = Workers(tmp_path, server.url)
    try:
        engine = make_engine(server.url)
        upgrade(engine)
        short_lease = {"DICOMNODE_QUEUE__LEASE_S": "5", "DICOMNODE_QUEUE__HEARTBEAT_S": "1"}
        for name in ("w1", "w2"):
            workers.start(name, **short_lease)
        workers.wait_ready("w1", "w2")
        repo = JobRepository(engine)
        ids = echo_jobs(repo, 200, "outage?sleep=0.05")
        wait_until(lambda: repo.counts_by_state()[JobState.DONE] >= 40, timeout=60, interval=0.1)
        server.stop()  # the database goes away mid-run, connections cut...
        # Deliberate, not a wait: the outage lasts 3 s (the workers' retries back off meanwhile);
        # its length is what the test puts the workers through.
        time.sleep(3)
        server.start()  # ...and comes back on the same port and data
        engine.dispose()
        wait_until(
            lambda: repo.counts_by_state()[JobState.DONE] == len(ids), timeout=180, interval=0.2
        )
        assert workers.stop_all() == {"w1": 0, "w2": 0}  # both rode it out
        jobs = repo.list(limit=len(ids))
        assert {job.id for job in jobs} == ids
        assert all(job.state is JobState.DONE for job in jobs)
        ended = Counter(job for event, job, _, _ in workers.runs() if event == "end")
        assert set(ended) == ids  # every job ran to its end at least once
        engine.dispose()
    finally:
        workers.kill_all()
        server.remove()
