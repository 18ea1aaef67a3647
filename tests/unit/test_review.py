"""Review before send on SQLite and PostgreSQL: a ``review = true`` route's results held in
``review`` with nothing sent or notified; approval releasing them exactly as a release would
(sends and notifications in its transaction, audited with the actor); rejection with a reason;
the 409s of approving twice or a rejected job; cancel, retry and resend refused; shadow jobs
never held; the purge keeping review jobs and removing rejected ones.
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
from dicomnode.domain import FINAL_STATES, JobState, Priority
from dicomnode.errors import JobStateError
from dicomnode.queue import JobRepository
from dicomnode.queue.listing import JobFilter
from dicomnode.queue.notifications import NotificationQueue
from dicomnode.queue.outcomes import ReleasePolicy
from dicomnode.queue.sends import SendQueue
from dicomnode.testing.jobs import Clock, add_study

NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
_keys = itertools.count()

SETTINGS = Settings(
    routes=[
        {"name": "chest", "model": "standin", "destinations": ["pacs"], "review": True,
         "critical": {"label": "nodule", "min_diameter_mm": 8}},
        {"name": "plain", "model": "standin", "destinations": ["pacs"]},
        {"name": "shadow", "model": "standin", "mode": "shadow", "destinations": ["pacs"],
         "review": True},
    ],
    destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
    notifications=[
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 1, "events": ["done"]},
        {"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:1/",
         "events": ["critical"]},
    ],
)  # fmt: skip
REVIEWER = "token:alice"


def result(*findings: dict[str, Any]) -> dict[str, Any]:
    uid = f"1.2.826.0.1.3680043.99.2.{next(_keys)}"
    return {"model": "standin", "version": "1", "demo": False, "findings": list(findings),
            "objects": [{"kind": "SR", "path": "results/x/sr.dcm", "sop_class_uid": "1.2.3",
                         "sop_instance_uid": uid}]}  # fmt: skip


NODULE_9MM = {"label": "nodule", "finding_type": NODULE, "probability": 0.9, "diameter_mm": 9.0}


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
        return add_study(session, "r", "PID-R", "ACC-R", "Doe^Jane", clock.now)


def run(jobs: JobRepository, study: str, route: str = "chest", **kw: Any) -> int:
    """A job of ``route`` claimed and finished with a critical nodule; its id."""
    n = next(_keys)
    mode = "shadow" if route == "shadow" else "live"
    job = jobs.enqueue(dedupe_key=f"r/{n}", route=route, model="standin", mode=mode,
                       study_instance_uid=study, series_instance_uid=f"{study}.{n}",
                       destinations=["pacs"], state=JobState.QUEUED, **kw)  # fmt: skip
    claimed = jobs.claim("w1", ["standin"])
    assert claimed is not None and claimed.id == job.id
    jobs.finish(job.id, "w1", result(NODULE_9MM))
    return job.id


def events(jobs: JobRepository, job_id: int, action: str) -> list[tuple[str, str | None]]:
    with jobs.sessions() as session:
        found, _ = list_events(session, job_id=job_id, action=action)
    return [(e.actor, e.detail) for e in found]


def state(jobs: JobRepository, job_id: int) -> JobState:
    job = jobs.get(job_id)
    assert job is not None
    return job.state


def test_review_is_unfinished_and_rejected_final() -> None:
    assert JobState.REVIEW not in FINAL_STATES
    assert JobState.REJECTED in FINAL_STATES


def test_a_review_route_holds_its_results_with_nothing_sent_or_notified(
    jobs: JobRepository, queue: NotificationQueue, study: str
) -> None:
    other = jobs.enqueue(dedupe_key="r/other", route="plain", model="other",
                         study_instance_uid=study, state=JobState.QUEUED)  # fmt: skip
    job_id = run(jobs, study)
    assert state(jobs, job_id) is JobState.REVIEW
    assert SendQueue(jobs.sessions).for_job(job_id) == []
    assert queue.for_job(job_id) == []
    assert events(jobs, job_id, "review") == [("node", "results held for review (route chest)")]
    # nothing decided on the findings yet: no escalation, no outcome in the result
    assert jobs.get(other.id).priority == Priority.ROUTINE  # type: ignore[union-attr]
    assert "outcome" not in (jobs.get(job_id).result or {})  # type: ignore[union-attr]
    assert [j.id for j in jobs.list(JobFilter(state=JobState.REVIEW))] == [job_id]
    assert jobs.counts_by_state()[JobState.REVIEW] == 1


def test_approval_releases_exactly_as_a_release_and_names_the_reviewer(
    jobs: JobRepository, queue: NotificationQueue, study: str
) -> None:
    other = jobs.enqueue(dedupe_key="r/other", route="plain", model="other",
                         study_instance_uid=study, state=JobState.QUEUED)  # fmt: skip
    job_id = run(jobs, study)
    approved = jobs.approve(job_id, actor=REVIEWER, note="looks right")
    assert approved.state is JobState.SENDING
    sends = SendQueue(jobs.sessions).for_job(job_id)
    assert [(s.destination, s.state) for s in sends] == [("pacs", "pending")]
    assert sorted((r.notification, r.event) for r in queue.for_job(job_id)) == [
        ("hook", "critical"), ("ris", "done")]  # fmt: skip
    assert approved.result is not None and approved.result["outcome"]["critical"][0]["finding"] == 0
    assert jobs.get(other.id).priority == Priority.STAT  # type: ignore[union-attr]
    assert events(jobs, job_id, "approved") == [
        (REVIEWER, "results released (sending): looks right")]  # fmt: skip
    # approving twice: refused, and nothing written twice
    with pytest.raises(JobStateError, match="only a job in review can be approved; its "
                       "results were released already"):  # fmt: skip
        jobs.approve(job_id, actor=REVIEWER)
    assert len(SendQueue(jobs.sessions).for_job(job_id)) == 1
    assert len(queue.for_job(job_id)) == 2
    assert len(events(jobs, job_id, "approved")) == 1


def test_rejection_keeps_the_reason_and_sends_nothing(
    jobs: JobRepository, queue: NotificationQueue, study: str
) -> None:
    job_id = run(jobs, study)
    with pytest.raises(ValueError, match="needs a reason"):
        jobs.reject(job_id, actor=REVIEWER, reason="  \n ")
    assert state(jobs, job_id) is JobState.REVIEW
    rejected = jobs.reject(job_id, actor=REVIEWER, reason="segmentation  misses\nthe lesion")
    assert rejected.state is JobState.REJECTED
    assert rejected.error == "rejected: segmentation misses the lesion"
    assert rejected.result is not None  # kept
    assert events(jobs, job_id, "rejected") == [(REVIEWER, "segmentation misses the lesion")]
    with pytest.raises(JobStateError, match="is rejected: only a job in review can be approved"):
        jobs.approve(job_id, actor=REVIEWER)
    with pytest.raises(JobStateError, match="only a job in review can be rejected"):
        jobs.reject(job_id, actor=REVIEWER, reason="again")
    assert SendQueue(jobs.sessions).for_job(job_id) == []
    assert queue.for_job(job_id) == []
    with pytest.raises(JobStateError, match="only failed or cancelled"):
        jobs.retry(job_id)


def test_a_job_in_review_is_neither_cancelled_retried_nor_resent(
    jobs: JobRepository, study: str
) -> None:
    job_id = run(jobs, study)
    with pytest.raises(JobStateError, match="ended by its reviewer: approve or reject"):
        jobs.cancel(job_id, actor=REVIEWER)
    with pytest.raises(JobStateError, match="only failed or cancelled"):
        jobs.retry(job_id)
    with pytest.raises(JobStateError, match="in review: its results go out when a reviewer"):
        SendQueue(jobs.sessions).requeue(job_id)
    assert state(jobs, job_id) is JobState.REVIEW
    assert SendQueue(jobs.sessions).for_job(job_id) == []


def test_only_jobs_in_review_are_approved(jobs: JobRepository, study: str) -> None:
    plain = run(jobs, study, route="plain")  # never held
    assert state(jobs, plain) is JobState.SENDING
    with pytest.raises(JobStateError, match="is sending: only a job in review"):
        jobs.approve(plain, actor=REVIEWER)


def test_a_shadow_job_is_never_held(jobs: JobRepository, study: str) -> None:
    job_id = run(jobs, study, route="shadow")
    assert state(jobs, job_id) is JobState.DONE
    assert SendQueue(jobs.sessions).for_job(job_id) == []


def test_a_confirmed_job_enters_review(jobs: JobRepository, study: str, clock: Clock) -> None:
    job = jobs.enqueue(dedupe_key="r/c", route="chest", model="standin",
                       study_instance_uid=study, destinations=["pacs"])  # fmt: skip
    assert jobs.mark_queued(job.id, confirm_after=clock.now + timedelta(seconds=30))
    assert jobs.claim("w1", ["standin"]) is not None
    assert jobs.finish(job.id, "w1", result(NODULE_9MM)) is JobState.CONFIRMING
    assert jobs.confirm(job.id) is JobState.REVIEW
    assert SendQueue(jobs.sessions).for_job(job.id) == []
    assert jobs.approve(job.id, actor=REVIEWER).state is JobState.SENDING


def test_purge_keeps_review_jobs_and_removes_rejected_ones(
    jobs: JobRepository, study: str, clock: Clock
) -> None:
    held = run(jobs, study)
    rejected = run(jobs, study)
    jobs.reject(rejected, actor=REVIEWER, reason="wrong series")
    clock.advance(2 * 86400)
    assert jobs.purge(clock.now - timedelta(days=1)) == 1
    assert jobs.get(rejected) is None
    assert state(jobs, held) is JobState.REVIEW
