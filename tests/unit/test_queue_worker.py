"""The worker loop in a thread, with the echo test model, and the periodic jobs (SQLite)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from dicomnode.config import QueueSettings
from dicomnode.db import make_engine, upgrade
from dicomnode.domain import JobState
from dicomnode.errors import ConfigError, InputsRefused
from dicomnode.queue import JobRecord, JobRepository
from dicomnode.queue.periodic import PURGE_JOB, REAP_JOB, Periodic, schedule_queue_maintenance
from dicomnode.queue.worker import JobContext, JobModel, Worker
from dicomnode.testing.models import EchoModel, directives, load_models
from dicomnode.testing.waiting import wait_until

STUDY = "1.2.826.0.1.3680043.99.200"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def repo(engine: Engine) -> JobRepository:
    return JobRepository(
        engine, QueueSettings(max_attempts=3, backoff_s=0, lease_s=1.5, heartbeat_s=0.1)
    )


@pytest.fixture
def workers(repo: JobRepository) -> Iterator[Callable[..., tuple[Worker, EchoModel]]]:
    started: list[Worker] = []

    def start(**options: object) -> tuple[Worker, EchoModel]:
        model = EchoModel()
        worker = Worker(repo, {"echo": model}, poll_s=0.02, **options)  # type: ignore[arg-type]
        worker.start()
        started.append(worker)
        return worker, model

    yield start
    for worker in started:
        worker.stop(timeout=10)


def add(repo: JobRepository, route: str = "r", **values: object) -> JobRecord:
    n = len(repo.list(limit=100000))
    return repo.enqueue(
        dedupe_key=f"{route}/{n}",
        route=route,
        model="echo",
        study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.{n}",
        inputs=[f"{STUDY}.{n}", f"{STUDY}.{n}.2"],
        state=JobState.QUEUED,
        **values,  # type: ignore[arg-type]
    )


def state_of(repo: JobRepository, job_id: int) -> JobState | None:
    job = repo.get(job_id)
    return job.state if job else None


def test_worker_runs_jobs_with_its_models_loaded_once(
    repo: JobRepository, workers: Callable[..., tuple[Worker, EchoModel]]
) -> None:
    jobs = [add(repo) for _ in range(5)]
    worker, model = workers(device="cpu", worker_id="test-worker")
    wait_until(lambda: repo.counts_by_state()[JobState.DONE] == 5, timeout=10)
    assert model.loads == 1 and model.runs == 5
    assert isinstance(model, JobModel)
    done = repo.get(jobs[0].id)
    assert done is not None and done.lease_owner == "test-worker" and done.attempts == 1
    assert done.result == {
        "model": "echo",
        "series_count": 2,
        "attempt": 1,
        "device": "cpu",
        "worker_id": "test-worker",
    }
    worker.stop(timeout=5)
    assert worker.jobs_run == 5


def test_a_failing_model_is_retried_then_fails_with_the_exception(
    repo: JobRepository, workers: Callable[..., tuple[Worker, EchoModel]]
) -> None:
    flaky = add(repo, route="flaky?fail=1")
    broken = add(repo, route="broken?fail=always", max_attempts=2)
    workers()
    wait_until(
        lambda: (
            {state_of(repo, flaky.id), state_of(repo, broken.id)}
            == {JobState.DONE, JobState.FAILED}
        ),
        timeout=10,
    )
    recovered = repo.get(flaky.id)
    assert recovered is not None and recovered.state is JobState.DONE
    assert recovered.attempts == 2 and recovered.error is None
    failed = repo.get(broken.id)
    assert failed is not None and failed.state is JobState.FAILED and failed.attempts == 2
    assert failed.error == "ModelFailure: told to fail (attempt 2)"


def test_an_input_the_model_refuses_fails_at_once_without_retries(
    repo: JobRepository, workers: Callable[..., tuple[Worker, EchoModel]]
) -> None:
    """A one-slice localizer does not grow more slices between attempts: no backoff, no retry."""
    refused = add(repo, route="localizer?refuse=1", max_attempts=3)
    workers()
    wait_until(lambda: state_of(repo, refused.id) is JobState.FAILED, timeout=10)
    failed = repo.get(refused.id)
    assert failed is not None and failed.attempts == 1
    assert failed.error == "InputsRejected: echo refuses its 2 input series"


def test_a_refused_input_skips_the_job_with_its_result(repo: JobRepository) -> None:
    """InputsRefused (outside the envelope): skipped at once, its result (the report) kept."""

    class Refusing(EchoModel):
        def run(self, context: JobContext) -> Mapping[str, Any]:
            raise InputsRefused("outside: slice thickness 10 mm", {"envelope": {"inside": False}})

    job = add(repo, max_attempts=3)
    worker = Worker(repo, {"echo": Refusing()})
    worker.load_models()
    assert worker.run_once()
    skipped = repo.get(job.id)
    assert skipped is not None and skipped.state is JobState.SKIPPED and skipped.attempts == 1
    assert skipped.error == "outside: slice thickness 10 mm"
    assert skipped.result == {"envelope": {"inside": False}, "refused": True}
    assert not worker.run_once()  # nothing queued again


def test_heartbeats_keep_a_job_longer_than_its_lease(
    repo: JobRepository, workers: Callable[..., tuple[Worker, EchoModel]]
) -> None:
    job = add(repo, route="slow?sleep=2.5")  # the lease is 1.5 s
    reaping = threading.Event()

    def reaper() -> None:
        while not reaping.wait(0.05):
            repo.reap_expired_leases()

    thread = threading.Thread(target=reaper)
    thread.start()
    try:
        workers(lease_s=1.5, heartbeat_s=0.2)
        wait_until(lambda: state_of(repo, job.id) is JobState.DONE, timeout=10)
    finally:
        reaping.set()
        thread.join()
    done = repo.get(job.id)
    assert done is not None and done.attempts == 1


def test_a_cancelled_job_stops_at_the_next_heartbeat(
    repo: JobRepository, workers: Callable[..., tuple[Worker, EchoModel]]
) -> None:
    job = add(repo, route="slow?sleep=30")
    worker, _ = workers(heartbeat_s=0.1)
    wait_until(lambda: state_of(repo, job.id) is JobState.RUNNING, timeout=10)
    cancelled_at = time.monotonic()
    repo.cancel(job.id)
    wait_until(lambda: worker.jobs_run == 1, timeout=5)
    assert time.monotonic() - cancelled_at < 2
    record = repo.get(job.id)
    assert record is not None and record.state is JobState.CANCELLED and record.result is None
    # and the worker goes on with the next job
    nxt = add(repo)
    wait_until(lambda: state_of(repo, nxt.id) is JobState.DONE, timeout=10)


def test_a_result_that_is_not_json_fails_the_job(repo: JobRepository) -> None:
    class Odd(EchoModel):
        def run(self, context):  # type: ignore[no-untyped-def]
            return {"value": object()}

    job = add(repo, max_attempts=1)
    worker = Worker(repo, {"echo": Odd()})
    worker.load_models()
    assert worker.run_once()
    failed = repo.get(job.id)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.error is not None and failed.error.startswith("result could not be stored")
    assert not worker.run_once()


def test_the_worker_stops_on_its_event_and_waits_for_the_job_in_hand(
    repo: JobRepository,
) -> None:
    job = add(repo, route="slow?sleep=0.5")
    stop = threading.Event()
    worker = Worker(repo, load_models(["echo"]), poll_s=0.02)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    wait_until(lambda: state_of(repo, job.id) is JobState.RUNNING, timeout=10)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert state_of(repo, job.id) is JobState.DONE


def test_model_lookup() -> None:
    assert set(load_models(None)) == {"echo"}
    assert set(load_models(["echo", "echo"])) == {"echo"}
    with pytest.raises(ConfigError, match="unknown model"):
        load_models(["nope"])
    assert directives("slow?sleep=2&fail=always") == {"sleep": "2", "fail": "always"}
    assert directives("plain") == {}


def test_periodic_jobs_run_and_reap_expired_leases(repo: JobRepository) -> None:
    job = add(repo)
    assert repo.claim("dead-worker", lease_s=0.2) is not None
    periodic = Periodic()
    ticks: list[float] = []
    periodic.add_job(lambda: ticks.append(time.monotonic()), 0.1, "tick")
    periodic.add_job(lambda: 1 / 0, 0.1, "broken")  # logged, and the others go on
    schedule_queue_maintenance(periodic, repo, reap_every_s=0.1)
    assert periodic.job_names() == sorted(["tick", "broken", REAP_JOB, PURGE_JOB])
    periodic.start()
    try:
        wait_until(lambda: state_of(repo, job.id) is JobState.QUEUED, timeout=5)
        wait_until(lambda: len(ticks) >= 3, timeout=5)
    finally:
        periodic.shutdown()
    assert not periodic.running
    requeued = repo.get(job.id)
    assert requeued is not None and requeued.lease_expires_at is None
    with pytest.raises(ValueError):
        periodic.add_job(lambda: None, 0, "never")
