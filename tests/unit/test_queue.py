"""The job repository on SQLite and on PostgreSQL: claim order, backoff, leases, cancel, retry.

Times come from a clock the tests move by hand, so backoff and lease expiry are exact.
"""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select

from dicomnode.config import QueueSettings
from dicomnode.db.models import Job, Send
from dicomnode.domain import JobState, Priority
from dicomnode.errors import JobNotFound, JobStateError
from dicomnode.queue import JobRecord, JobRepository
from dicomnode.queue.listing import JobFilter
from dicomnode.queue.repository import LEASE_EXPIRED
from dicomnode.testing.jobs import Clock

STUDY = "1.2.826.0.1.3680043.99.100"
_keys = itertools.count()


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 3, 1, 8, 0, tzinfo=UTC))


@pytest.fixture
def repo(engine: Engine, clock: Clock) -> JobRepository:
    settings = QueueSettings(max_attempts=3, backoff_s=10, lease_s=30, heartbeat_s=5)
    return JobRepository(engine, settings, clock=clock)


def add(
    repo: JobRepository,
    *,
    priority: int = Priority.ROUTINE,
    model: str = "echo",
    state: JobState = JobState.QUEUED,
    **values: object,
) -> JobRecord:
    n = next(_keys)
    fields: dict[str, object] = {
        "dedupe_key": f"route/series-{n}",
        "route": "r",
        "study_instance_uid": STUDY,
        "series_instance_uid": f"{STUDY}.{n}",
        "inputs": [f"{STUDY}.{n}"],
        **values,
    }
    return repo.enqueue(model=model, priority=priority, state=state, **fields)  # type: ignore[arg-type]


def send_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count(Send.id))).scalar() or 0)


def job_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count(Job.id))).scalar() or 0)


def test_enqueue_is_idempotent_on_the_dedupe_key(repo: JobRepository, engine: Engine) -> None:
    first = add(repo, dedupe_key="ct/1.2.3", state=JobState.WAITING)
    again = add(repo, dedupe_key="ct/1.2.3", state=JobState.QUEUED, priority=Priority.STAT)
    assert again == first
    assert again.state is JobState.WAITING and again.priority == Priority.ROUTINE

    # Racing enqueues (several receivers completing the same series) still make one job.
    ids: list[int] = []
    start = threading.Barrier(6)

    def racer() -> None:
        start.wait()
        ids.append(add(repo, dedupe_key="ct/race").id)

    threads = [threading.Thread(target=racer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert job_count(engine) == 2


def test_a_waiting_job_runs_only_once_queued(repo: JobRepository, clock: Clock) -> None:
    job = add(repo, state=JobState.WAITING, inputs=["a"])
    assert job.queued_at is None and job.run_after is None
    assert repo.claim("w1") is None
    clock.advance(5)
    assert repo.mark_queued(job.id, inputs=["a", "b"])
    assert not repo.mark_queued(job.id)  # only from waiting
    queued = repo.get(job.id)
    assert queued is not None and queued.state is JobState.QUEUED
    assert queued.queued_at == queued.completed_at == clock.now
    assert queued.inputs == ("a", "b")
    claimed = repo.claim("w1")
    assert claimed is not None and claimed.id == job.id


def test_stat_runs_before_urgent_before_routine_then_oldest_first(repo: JobRepository) -> None:
    routine = [add(repo, priority=Priority.ROUTINE) for _ in range(2)]
    urgent = add(repo, priority=Priority.URGENT)
    stat = [add(repo, priority=Priority.STAT) for _ in range(2)]
    order = []
    while (job := repo.claim("w1")) is not None:
        order.append(job.id)
    assert order == [stat[0].id, stat[1].id, urgent.id, routine[0].id, routine[1].id]


def test_claim_takes_only_the_workers_models(repo: JobRepository) -> None:
    segment = add(repo, model="segment", priority=Priority.STAT)
    echo = add(repo, model="echo")
    assert repo.claim("w1", models=set()) is None
    claimed = repo.claim("w1", models={"echo", "other"})
    assert claimed is not None and claimed.id == echo.id
    assert repo.claim("w1", models={"echo"}) is None
    claimed = repo.claim("w2", models=None)
    assert claimed is not None and claimed.id == segment.id


def test_claim_sets_the_lease(repo: JobRepository, clock: Clock) -> None:
    job = add(repo)
    claimed = repo.claim("host:1:cpu", lease_s=12)
    assert claimed is not None and claimed.id == job.id
    assert claimed.state is JobState.RUNNING and claimed.attempts == 1
    assert claimed.lease_owner == "host:1:cpu"
    assert claimed.lease_expires_at == clock.now + timedelta(seconds=12)
    assert claimed.started_at == clock.now
    assert repo.claim("w2") is None


def test_failures_back_off_exponentially_then_fail_with_the_error(
    repo: JobRepository, clock: Clock
) -> None:
    job = add(repo)
    for attempt, wait in ((1, 10), (2, 20)):
        claimed = repo.claim("w1")
        assert claimed is not None and claimed.attempts == attempt
        assert repo.fail(job.id, "w1", f"RuntimeError: boom {attempt}") is JobState.QUEUED
        queued = repo.get(job.id)
        assert queued is not None and queued.state is JobState.QUEUED
        assert queued.run_after == clock.now + timedelta(seconds=wait)
        assert queued.error == f"RuntimeError: boom {attempt}"
        clock.advance(wait - 0.5)
        assert repo.claim("w1") is None  # still backing off
        clock.advance(0.5)
    claimed = repo.claim("w1")
    assert claimed is not None and claimed.attempts == 3
    assert repo.fail(job.id, "w1", "RuntimeError: boom 3\ndetails") is JobState.FAILED
    failed = repo.get(job.id)
    assert failed is not None and failed.state is JobState.FAILED and failed.final
    assert failed.attempts == 3 and failed.error == "RuntimeError: boom 3\ndetails"
    assert failed.finished_at == clock.now
    assert repo.claim("w1") is None


def test_a_failure_marked_permanent_is_not_retried(repo: JobRepository) -> None:
    job = add(repo)
    assert repo.claim("w1") is not None
    assert repo.fail(job.id, "w1", "bad input", retry=False) is JobState.FAILED


def test_heartbeat_keeps_the_lease_and_an_expired_lease_is_reclaimed(
    repo: JobRepository, clock: Clock
) -> None:
    job = add(repo)
    assert repo.claim("w1") is not None  # lease until +30
    clock.advance(20)
    assert repo.heartbeat(job.id, "w1")  # now until +50
    clock.advance(25)
    assert repo.reap_expired_leases() == []  # +45: the heartbeat kept it
    clock.advance(6)
    assert repo.reap_expired_leases() == [job.id]  # +51: w1 stopped beating
    requeued = repo.get(job.id)
    assert requeued is not None and requeued.state is JobState.QUEUED
    assert requeued.error == LEASE_EXPIRED and requeued.run_after == clock.now

    again = repo.claim("w2")
    assert again is not None and again.id == job.id and again.attempts == 2
    assert not repo.heartbeat(job.id, "w1")  # w1 wakes up: not its job any more
    assert repo.finish(job.id, "w1", {"stale": True}) is None
    assert repo.fail(job.id, "w1", "late") is None
    assert repo.finish(job.id, "w2", {"ok": True}) is JobState.DONE
    done = repo.get(job.id)
    assert done is not None and done.state is JobState.DONE
    assert done.result == {"ok": True} and done.error is None and done.lease_owner == "w2"


def test_an_expired_lease_on_the_last_attempt_fails_the_job(
    repo: JobRepository, clock: Clock
) -> None:
    job = add(repo, max_attempts=1)
    assert repo.claim("w1") is not None
    assert repo.reap_expired_leases(clock.now + timedelta(seconds=31)) == [job.id]
    failed = repo.get(job.id)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.error == LEASE_EXPIRED and failed.attempts == 1


def test_a_job_with_destinations_is_sending_until_sent(repo: JobRepository, clock: Clock) -> None:
    job = add(repo, destinations=["PACS"])
    assert repo.claim("w1") is not None
    assert not repo.mark_sent(job.id)
    assert repo.finish(job.id, "w1", {"seg": "1.2.3"}) is JobState.SENDING
    clock.advance(2)
    assert repo.mark_sent(job.id)
    done = repo.get(job.id)
    assert done is not None and done.state is JobState.DONE
    assert done.sent_at == clock.now and done.finished_at == clock.now - timedelta(seconds=2)


def test_a_provisional_job_holds_its_results_until_confirmed(
    repo: JobRepository, clock: Clock, engine: Engine
) -> None:
    job = add(repo, state=JobState.WAITING, destinations=["PACS"])
    window = clock.now + timedelta(seconds=10)
    assert repo.mark_queued(job.id, confirm_after=window)
    assert repo.claim("w1") is not None
    result = {"objects": [{"kind": "sr", "path": "r/sr.dcm", "sop_class_uid": "1.2",
                           "sop_instance_uid": "1.2.3"}]}  # fmt: skip
    assert repo.finish(job.id, "w1", result) is JobState.CONFIRMING
    assert send_count(engine) == 0  # nothing goes out from unconfirmed inputs
    assert repo.confirm(job.id) is JobState.SENDING
    assert send_count(engine) == 1
    confirmed = repo.get(job.id)
    assert confirmed is not None and confirmed.confirm_after is None
    assert repo.confirm(job.id) is None  # once


def test_a_refusal_is_skipped_at_once_and_sends_its_report(
    repo: JobRepository, clock: Clock, engine: Engine
) -> None:
    """Refused by its model's envelope: skipped after one attempt, its "not analysed" SR sent;
    held like any result while its inputs are unconfirmed; a shadow's report is never sent."""
    refusal = {
        "envelope": {"inside": False, "reasons": ["thick"], "policy": "refuse"},
        "objects": [{"kind": "SR", "path": "r/sr.dcm", "sop_class_uid": "1.2",
                     "sop_instance_uid": "1.2.3"}],
    }  # fmt: skip
    job = add(repo, destinations=["PACS"], max_attempts=3)
    assert repo.claim("w1") is not None
    assert repo.refuse(job.id, "w1", "outside", refusal) is JobState.SKIPPED
    skipped = repo.get(job.id)
    assert skipped is not None and skipped.state is JobState.SKIPPED and skipped.final
    assert skipped.error == "outside" and skipped.result == {**refusal, "refused": True}
    assert skipped.attempts == 1 and skipped.finished_at == clock.now
    assert send_count(engine) == 1  # the report goes to the PACS
    assert repo.refuse(job.id, "w1", "again", refusal) is None  # no lease held any more

    # unconfirmed inputs (a split transfer): held, sending nothing; skipped once confirmed
    held = add(repo, state=JobState.WAITING, destinations=["PACS"])
    assert repo.mark_queued(held.id, confirm_after=clock.now + timedelta(seconds=10))
    assert repo.claim("w1") is not None
    assert repo.refuse(held.id, "w1", "outside", refusal) is JobState.CONFIRMING
    assert send_count(engine) == 1
    assert repo.confirm(held.id) is JobState.SKIPPED
    assert send_count(engine) == 2

    shadow = add(repo, destinations=["PACS"], mode="shadow")
    assert repo.claim("w1") is not None
    assert repo.refuse(shadow.id, "w1", "outside", refusal) is JobState.SKIPPED
    assert send_count(engine) == 2


def test_a_job_confirmed_while_it_runs_sends_when_it_finishes(
    repo: JobRepository, clock: Clock
) -> None:
    job = add(repo, state=JobState.WAITING)
    assert repo.mark_queued(job.id, confirm_after=clock.now + timedelta(seconds=10))
    assert repo.claim("w1") is not None
    assert repo.confirm(job.id) is JobState.RUNNING
    assert repo.finish(job.id, "w1", {}) is JobState.DONE


def test_a_superseded_job_never_sends(repo: JobRepository, clock: Clock, engine: Engine) -> None:
    job = add(repo, state=JobState.WAITING, destinations=["PACS"])
    assert repo.mark_queued(job.id, confirm_after=clock.now + timedelta(seconds=10))
    assert repo.claim("w1") is not None
    repo.cancel(job.id, reason="superseded")
    assert repo.finish(job.id, "w1", {"objects": []}) is None  # its result is dropped
    assert repo.confirm(job.id) is None
    assert send_count(engine) == 0


def test_cancel(repo: JobRepository) -> None:
    queued = add(repo)
    running = add(repo)
    assert repo.cancel(queued.id).state is JobState.CANCELLED
    claimed = repo.claim("w1")
    assert claimed is not None and claimed.id == running.id  # the cancelled one is skipped
    assert repo.cancel(running.id).state is JobState.CANCELLED
    assert not repo.heartbeat(running.id, "w1")  # the worker notices on its next heartbeat
    assert repo.finish(running.id, "w1", {}) is None
    record = repo.get(running.id)
    assert record is not None and record.state is JobState.CANCELLED
    with pytest.raises(JobStateError):
        repo.cancel(running.id)
    with pytest.raises(JobNotFound):
        repo.cancel(99999)


def test_retry_queues_a_failed_or_cancelled_job_with_fresh_attempts(repo: JobRepository) -> None:
    job = add(repo, max_attempts=1)
    assert repo.claim("w1") is not None
    repo.fail(job.id, "w1", "boom")
    other = add(repo)
    with pytest.raises(JobStateError):
        repo.retry(other.id)  # queued: nothing to retry
    retried = repo.retry(job.id)
    assert retried.state is JobState.QUEUED and retried.attempts == 0
    assert retried.error is None and retried.finished_at is None and retried.lease_owner is None
    claimed = repo.claim("w2")
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
    assert repo.retry(repo.cancel(other.id).id).state is JobState.QUEUED
    with pytest.raises(JobNotFound):
        repo.retry(99999)


def test_skipped_and_failed_without_a_worker(repo: JobRepository) -> None:
    skipped = add(repo, state=JobState.SKIPPED, error="no route matched")
    assert skipped.state is JobState.SKIPPED and skipped.error == "no route matched"
    waiting = add(repo, state=JobState.WAITING)
    assert repo.mark_failed(waiting.id, "study incomplete: FLAIR missing")
    assert not repo.mark_skipped(waiting.id, "too late")
    failed = repo.get(waiting.id)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.error == "study incomplete: FLAIR missing"


def test_list_counts_and_purge(repo: JobRepository, clock: Clock) -> None:
    old_done = add(repo, model="a")
    assert repo.claim("w1") is not None
    repo.finish(old_done.id, "w1", {})
    old_waiting = add(repo, model="a", state=JobState.WAITING)
    clock.advance(86400 * 40)
    new = [add(repo, model="b") for _ in range(3)]

    assert [j.id for j in repo.list()] == [new[2].id, new[1].id, new[0].id, old_waiting.id, 1]
    assert [j.id for j in repo.list(limit=2, offset=1)] == [new[1].id, new[0].id]
    assert [j.id for j in repo.list(JobFilter(state="done"))] == [old_done.id]
    assert len(repo.list(JobFilter(state=["done", "waiting"]))) == 2
    assert [j.id for j in repo.list(JobFilter(model="a"))] == [old_waiting.id, old_done.id]
    assert len(repo.list(JobFilter(study=STUDY))) == 5 and repo.list(JobFilter(study="1.2.3")) == []
    assert repo.list(JobFilter(series=new[0].series_instance_uid))[0].id == new[0].id
    with pytest.raises(ValueError):
        repo.list(JobFilter(state="bogus"))
    counts = repo.counts_by_state()
    assert counts[JobState.DONE] == 1 and counts[JobState.WAITING] == 1
    assert counts[JobState.QUEUED] == 3 and counts[JobState.FAILED] == 0
    assert sum(counts.values()) == 5

    # Retention: only finished jobs older than the cut-off go; the old waiting one stays.
    assert repo.purge(clock.now - timedelta(days=30)) == 1
    assert repo.get(old_done.id) is None and repo.get(old_waiting.id) is not None
    assert repo.purge(clock.now - timedelta(days=30)) == 0


def test_record_as_json(repo: JobRepository) -> None:
    job = add(repo, priority=Priority.STAT, destinations=["PACS"])
    values = job.as_json()
    assert values["state"] == "queued" and values["priority_name"] == "stat"
    assert values["destinations"] == ["PACS"] and isinstance(values["updated_at"], str)


def test_concurrent_claimers_never_share_a_job(repo: JobRepository) -> None:
    ids = {add(repo, priority=i % 3).id for i in range(120)}
    taken: list[int] = []
    start = threading.Barrier(6)

    def claimer(name: str) -> None:
        start.wait()
        while (job := repo.claim(name)) is not None:
            taken.append(job.id)
            assert repo.finish(job.id, name, {}) is JobState.DONE

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(ids)
    assert repo.counts_by_state()[JobState.DONE] == 120


def test_a_shadow_job_never_sends_whatever_its_destinations(
    repo: JobRepository, clock: Clock, engine: Engine
) -> None:
    result = {"objects": [{"kind": "sr", "path": "r/sr.dcm", "sop_class_uid": "1.2",
                           "sop_instance_uid": "1.2.3"}]}  # fmt: skip
    live = add(repo, destinations=["PACS"])
    shadow = add(repo, destinations=["PACS"], mode="shadow")
    assert shadow.mode == "shadow" and live.mode == "live"
    for _ in range(2):
        claimed = repo.claim("w1")
        assert claimed is not None
        repo.finish(claimed.id, "w1", result)
    assert [(job.id, job.state) for job in (repo.get(live.id), repo.get(shadow.id)) if job] == [
        (live.id, JobState.SENDING),
        (shadow.id, JobState.DONE),
    ]
    assert send_count(engine) == 1  # the live job's one object
    # a confirmation window ends the same way: kept, not sent
    held = add(repo, state=JobState.WAITING, destinations=["PACS"], mode="shadow")
    assert repo.mark_queued(held.id, confirm_after=clock.now + timedelta(seconds=10))
    assert repo.claim("w1") is not None
    assert repo.finish(held.id, "w1", result) is JobState.CONFIRMING
    assert repo.confirm(held.id) is JobState.DONE
    assert send_count(engine) == 1
    assert repo.get(held.id).as_json()["mode"] == "shadow"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="'live' or 'shadow', not 'dark'"):
        add(repo, mode="dark")
