"""Outcomes and the notification queue on SQLite and PostgreSQL: notifications and sends written
in the transaction that releases a run's results (or fails the job), send_if holding results,
a critical finding making the study's other jobs stat, claims, backoff and the dead letter with
their audit, and the purge keeping what is still owed.

Times come from a clock the tests move by hand; deliveries to real peers are in
tests/integration/test_notifications.py.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from dicomnode.audit import list_events
from dicomnode.config import QueueSettings, Settings
from dicomnode.db import make_session_factory
from dicomnode.domain import JobState, Priority
from dicomnode.queue import JobRepository
from dicomnode.queue.delivery import DEAD, PENDING, SENT
from dicomnode.queue.notifications import KEY_CHARS, NotificationQueue
from dicomnode.queue.outcomes import ReleasePolicy
from dicomnode.queue.sends import SendQueue
from dicomnode.testing.jobs import Clock, add_study

NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
_keys = itertools.count()

SETTINGS = Settings(
    routes=[
        {"name": "chest", "model": "standin", "destinations": ["pacs"], "send_if": "positive",
         "critical": {"label": "nodule", "min_diameter_mm": 8}},
        {"name": "shadow", "model": "standin", "mode": "shadow", "destinations": ["pacs"]},
    ],
    destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
    notifications=[
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 1,
         "events": ["done", "failed"]},
        {"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:1/",
         "events": ["critical"], "routes": ["chest"]},
    ],
)  # fmt: skip


def nodule(diameter: float) -> dict[str, Any]:
    return {"label": "nodule", "finding_type": NODULE, "probability": 0.9,
            "diameter_mm": diameter}  # fmt: skip


def result(*findings: dict[str, Any]) -> dict[str, Any]:
    uid = f"1.2.826.0.1.3680043.99.1.{next(_keys)}"
    return {"model": "standin", "version": "1", "demo": False, "findings": list(findings),
            "objects": [{"kind": "SR", "path": "results/x/sr.dcm", "sop_class_uid": "1.2.3",
                         "sop_instance_uid": uid}]}  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 12, 7, 8, 0, tzinfo=UTC))


@pytest.fixture
def jobs(engine: Engine, clock: Clock) -> JobRepository:
    return JobRepository(
        engine, QueueSettings(max_attempts=1), clock=clock,
        policy=ReleasePolicy.from_settings(SETTINGS),
    )  # fmt: skip


@pytest.fixture
def queue(engine: Engine, clock: Clock) -> NotificationQueue:
    return NotificationQueue(make_session_factory(engine), clock=clock)


@pytest.fixture
def study(jobs: JobRepository, clock: Clock) -> str:
    with jobs.sessions.begin() as session:
        return add_study(session, "n", "PID-N", "ACC-N", "Doe^Jane", clock.now)


def enqueue(jobs: JobRepository, study: str, route: str = "chest", **kw: Any) -> int:
    n = next(_keys)
    mode = "shadow" if route == "shadow" else "live"
    job = jobs.enqueue(dedupe_key=f"n/{n}", route=route, model="standin", mode=mode,
                       study_instance_uid=study, series_instance_uid=f"{study}.{n}",
                       destinations=["pacs"], state=JobState.QUEUED, **kw)  # fmt: skip
    return job.id


def run(jobs: JobRepository, job_id: int, outcome: dict[str, Any] | str) -> JobState | None:
    claimed = jobs.claim("w1", ["standin"])
    assert claimed is not None and claimed.id == job_id
    if isinstance(outcome, str):
        return jobs.fail(job_id, "w1", outcome)
    return jobs.finish(job_id, "w1", outcome)


def test_a_critical_finding_writes_sends_and_notifications_with_the_finish(
    jobs: JobRepository, queue: NotificationQueue, study: str
) -> None:
    other = enqueue(jobs, study, priority=Priority.ROUTINE)
    job_id = enqueue(jobs, study, priority=Priority.STAT)  # claimed first
    assert run(jobs, job_id, result(nodule(9.0), nodule(4.0))) is JobState.SENDING
    rows = queue.for_job(job_id)
    assert [(r.notification, r.event, r.state) for r in rows] == [
        ("ris", "done", PENDING), ("hook", "critical", PENDING)]  # fmt: skip
    assert len({r.delivery_key for r in rows}) == 2
    assert all(len(r.delivery_key) == KEY_CHARS for r in rows)
    context = rows[1].context
    assert context["event"] == "critical" and context["job"]["state"] == "sending"
    assert context["study"]["accession_number"] == "ACC-N"
    assert context["study"]["patient_name"] == "Doe^Jane"
    assert [f["critical"] for f in context["findings"]] == [True, False]
    assert context["findings"][0]["critical_reasons"] == ["label nodule", "diameter 9 mm >= 8 mm"]
    job = jobs.get(job_id)
    assert job is not None and job.result is not None
    assert job.result["outcome"]["critical"][0]["finding"] == 0
    assert len(SendQueue(jobs.sessions).for_job(job_id)) == 1
    # the study's other unstarted job is read next
    assert jobs.get(other).priority == Priority.STAT  # type: ignore[union-attr]
    with jobs.sessions() as session:
        events, _ = list_events(session, job_id=job_id, action="critical")
    assert "jobs made stat: [" in (events[0].detail or "") and str(other) in events[0].detail


def test_send_if_positive_keeps_the_results_of_a_negative_run(
    jobs: JobRepository, queue: NotificationQueue, study: str
) -> None:
    job_id = enqueue(jobs, study)
    assert run(jobs, job_id, result()) is JobState.DONE
    assert SendQueue(jobs.sessions).for_job(job_id) == []
    job = jobs.get(job_id)
    assert job is not None and job.result is not None
    assert job.result["outcome"]["send"] is False
    assert "no positive finding" in job.result["outcome"]["held_because"]
    assert [(r.notification, r.event) for r in queue.for_job(job_id)] == [("ris", "done")]


def test_a_failed_job_tells_who_listens_for_failed(
    jobs: JobRepository, queue: NotificationQueue, study: str
) -> None:
    job_id = enqueue(jobs, study)
    assert run(jobs, job_id, "RuntimeError: out of memory\nTraceback...") is JobState.FAILED
    [row] = queue.for_job(job_id)
    assert (row.notification, row.event) == ("ris", "failed")
    assert row.context["job"]["error"] == "RuntimeError: out of memory"
    assert row.context["job"]["state"] == "failed" and row.context["findings"] == []
    # failed by the sender, or the intake: the same
    second = enqueue(jobs, study)
    assert jobs.mark_failed(second, "required series T1c missing")
    assert [r.event for r in queue.for_job(second)] == ["failed"]


def test_a_lease_that_runs_out_on_the_last_attempt_tells_failed(
    jobs: JobRepository, queue: NotificationQueue, study: str, clock: Clock
) -> None:
    job_id = enqueue(jobs, study)
    assert jobs.claim("w1", ["standin"]) is not None
    clock.now += timedelta(hours=1)
    assert jobs.reap_expired_leases() == [job_id]
    assert [r.event for r in queue.for_job(job_id)] == ["failed"]


def test_a_shadow_job_tells_nobody(
    jobs: JobRepository, queue: NotificationQueue, study: str
) -> None:
    job_id = enqueue(jobs, "1.2.3", route="shadow")
    assert run(jobs, job_id, result(nodule(20.0))) is JobState.DONE
    assert queue.for_job(job_id) == []


def test_held_results_tell_nobody_until_confirmed(
    jobs: JobRepository, queue: NotificationQueue, study: str, clock: Clock
) -> None:
    job = jobs.enqueue(dedupe_key="held", route="chest", model="standin",
                       study_instance_uid=study, destinations=["pacs"])  # fmt: skip
    jobs.mark_queued(job.id, confirm_after=clock.now + timedelta(seconds=10))
    assert run(jobs, job.id, result(nodule(9.0))) is JobState.CONFIRMING
    assert queue.for_job(job.id) == []
    assert jobs.confirm(job.id) is JobState.SENDING
    assert [r.event for r in queue.for_job(job.id)] == ["done", "critical"]
    confirmed = jobs.get(job.id)
    assert confirmed is not None and confirmed.result["outcome"]["positive"]  # type: ignore[index]


def test_claims_backoff_dead_letter_and_audit(
    jobs: JobRepository, queue: NotificationQueue, study: str, clock: Clock
) -> None:
    job_id = enqueue(jobs, study)
    run(jobs, job_id, result(nodule(9.0)))
    [hook] = queue.claim("hook", 5, lease_s=30)
    assert queue.claim("hook", 5, lease_s=30) == []  # leased
    assert queue.mark_failed(hook, "HTTP 500", max_attempts=2, backoff=lambda a: 60) == PENDING
    clock.now += timedelta(seconds=59)
    assert queue.claim("hook", 5, lease_s=30) == []  # backing off
    clock.now += timedelta(seconds=2)
    [again] = queue.claim("hook", 5, lease_s=30)
    assert again.delivery_key == hook.delivery_key and again.attempts == 1
    assert queue.mark_failed(again, "HTTP 500", max_attempts=2, backoff=lambda a: 60) == DEAD
    [ris] = queue.claim("ris", 5, lease_s=30)
    assert queue.mark_sent(ris, "ACK AA") and not queue.mark_sent(ris, "ACK AA")
    states = {r.notification: (r.state, r.attempts, r.last_error) for r in queue.for_job(job_id)}
    assert states == {"ris": (SENT, 0, None), "hook": (DEAD, 2, "HTTP 500")}
    with jobs.sessions() as session:
        events, _ = list_events(session, job_id=job_id)
    details = {e.action: e.detail for e in events}
    assert details["notified"] == "done to ris (hl7): ACK AA"
    assert details["notify_failed"].startswith("critical to hook (webhook) given up after 2")


def test_the_purge_keeps_a_job_whose_notifications_are_owed(
    jobs: JobRepository, queue: NotificationQueue, study: str, clock: Clock
) -> None:
    job_id = enqueue(jobs, study)
    run(jobs, job_id, result())  # done (send_if held it), a "done" to the RIS owed
    assert jobs.purge(clock.now + timedelta(days=1)) == 0
    [row] = queue.claim("ris", 5, lease_s=30)
    queue.mark_sent(row, "ACK AA")
    assert jobs.purge(clock.now + timedelta(days=1)) == 1
