"""The send queue on SQLite and PostgreSQL: rows made with the job's finish, claims under a lease,
backoff and dead letters, settling jobs, requeueing; the destinations config; result retention.

Times come from a clock the tests move by hand. Deliveries to real peers are in
tests/integration/test_send_orthanc.py.
"""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from dicomnode.audit import list_events
from dicomnode.config import DestinationSettings, QueueSettings, Settings, load_settings
from dicomnode.db import make_engine, make_session_factory, upgrade
from dicomnode.db.models import Send
from dicomnode.domain import JobState
from dicomnode.errors import ConfigError, JobNotFound, JobStateError, NoResults
from dicomnode.queue import JobRepository
from dicomnode.queue.sends import DEAD, PENDING, SENT, SendQueue
from dicomnode.retention import purge_results
from dicomnode.send.sender import Sender, backoff_s
from dicomnode.testing.jobs import Clock

STUDY = "1.2.826.0.1.3680043.99.200"
_keys = itertools.count()


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 21, 8, 0, tzinfo=UTC))


@pytest.fixture
def jobs(engine: Engine, clock: Clock) -> JobRepository:
    return JobRepository(engine, QueueSettings(), clock=clock)


@pytest.fixture
def queue(engine: Engine, clock: Clock) -> SendQueue:
    return SendQueue(make_session_factory(engine), clock=clock)


def objects(n: int = 2, tag: str = "") -> list[dict[str, str]]:
    kinds = ["SEG", "SR", "SC"]
    return [
        {
            "kind": kinds[i % 3],
            "path": f"results/x/dicom/{i}.dcm",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
            "sop_instance_uid": f"{STUDY}.9{tag}{i}",
            "series_instance_uid": f"{STUDY}.8",
            "study_instance_uid": STUDY,
        }
        for i in range(n)
    ]


def finished_job(
    jobs: JobRepository, destinations: list[str], result: dict[str, Any] | None = None
) -> int:
    """A job run through the repository to its finish, with ``result``."""
    n = next(_keys)
    job = jobs.enqueue(
        dedupe_key=f"send/{n}",
        route="r",
        model="standin",
        study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.{n}",
        inputs=[f"{STUDY}.{n}"],
        destinations=destinations,
        state=JobState.QUEUED,
    )
    claimed = jobs.claim("w1", ["standin"])
    assert claimed is not None and claimed.id == job.id
    jobs.finish(job.id, "w1", result if result is not None else {"objects": objects()})
    return job.id


def destination(name: str = "pacs", **values: Any) -> DestinationSettings:
    base: dict[str, Any] = {"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": 1}
    return DestinationSettings(**{**base, **values})


# -- rows with the job's finish -------------------------------------------------------------------


def test_finish_queues_one_row_per_destination_and_object(
    jobs: JobRepository, queue: SendQueue
) -> None:
    job_id = finished_job(jobs, ["pacs", "archive"])
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.SENDING
    rows = queue.for_job(job_id)
    assert sorted((r.destination, r.sop_instance_uid) for r in rows) == sorted(
        (d, o["sop_instance_uid"]) for d in ("pacs", "archive") for o in objects()
    )
    assert {r.state for r in rows} == {PENDING} and {r.attempts for r in rows} == {0}


def test_a_rerun_replaces_the_rows_of_the_earlier_run(
    jobs: JobRepository, queue: SendQueue
) -> None:
    job_id = finished_job(jobs, ["pacs"])
    for row in queue.claim("pacs", 10, 60):
        queue.mark_failed({row.id: "down"}, max_attempts=1, backoff=lambda _: 1)
    jobs.mark_failed(job_id, "results not sent")
    jobs.retry(job_id)
    assert jobs.claim("w2", ["standin"]) is not None
    jobs.finish(job_id, "w2", {"objects": objects(3)})
    rows = queue.for_job(job_id)
    assert len(rows) == 3 and {r.state for r in rows} == {PENDING}


def test_a_job_without_destinations_queues_nothing(jobs: JobRepository, queue: SendQueue) -> None:
    job_id = finished_job(jobs, [])
    assert jobs.get(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert queue.for_job(job_id) == []


def test_a_malformed_object_entry_is_named(jobs: JobRepository) -> None:
    with pytest.raises(ValueError, match=r"result object 0 .* lacks"):
        finished_job(jobs, ["pacs"], {"objects": [{"kind": "SEG"}]})


# -- claims, backoff, dead letters ----------------------------------------------------------------


def test_claimed_rows_are_leased_and_due_again_after_the_lease(
    jobs: JobRepository, queue: SendQueue, clock: Clock
) -> None:
    job_id = finished_job(jobs, ["pacs", "archive"])
    first = queue.claim("pacs", 10, lease_s=60)
    assert [r.destination for r in first] == ["pacs", "pacs"] and first[0].job_id == job_id
    assert queue.claim("pacs", 10, lease_s=60) == []  # held
    assert len(queue.claim("archive", 10, lease_s=60)) == 2  # another destination is free
    clock.advance(61)
    assert {r.id for r in queue.claim("pacs", 10, lease_s=60)} == {r.id for r in first}


def test_failures_back_off_exponentially_then_go_dead(
    jobs: JobRepository, queue: SendQueue, clock: Clock
) -> None:
    settings = destination(max_attempts=3, backoff_s=10, max_backoff_s=15)
    finished_job(jobs, ["pacs"], {"objects": objects(1)})
    waits = []
    for _ in range(3):
        (row,) = queue.claim("pacs", 10, lease_s=60)
        states = queue.mark_failed(
            {row.id: "refused"},
            max_attempts=settings.max_attempts,
            backoff=lambda a: backoff_s(settings, a),
        )
        (after,) = queue.for_job(row.job_id)
        if states[row.id] == PENDING:
            assert after.next_attempt_at is not None
            waits.append((after.next_attempt_at - clock.now).total_seconds())
            assert queue.claim("pacs", 10, lease_s=60) == []  # not due yet
            clock.advance(waits[-1])
    assert waits == [10, 15]  # 10, then 20 capped at max_backoff_s
    assert after.state == DEAD and after.attempts == 3 and after.last_error == "refused"


def test_settle_marks_done_when_every_row_was_sent(
    engine: Engine, jobs: JobRepository, queue: SendQueue, clock: Clock, tmp_path: Path
) -> None:
    sessions = make_session_factory(engine)
    sender = Sender(sessions, jobs, [destination()], tmp_path, clock=clock)
    job_id = finished_job(jobs, ["pacs"])
    rows = queue.claim("pacs", 10, 60)
    queue.mark_sent([rows[0].id])
    assert sender.settle() == {}  # one still pending
    queue.mark_sent([rows[1].id])
    assert sender.settle() == {job_id: "done"}
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.DONE and job.sent_at == clock.now


def test_a_dead_row_fails_the_job_naming_the_destination_and_reason(
    engine: Engine, jobs: JobRepository, queue: SendQueue, clock: Clock, tmp_path: Path
) -> None:
    sessions = make_session_factory(engine)
    sender = Sender(sessions, jobs, [destination(), destination("archive")], tmp_path, clock=clock)
    job_id = finished_job(jobs, ["pacs", "archive"])
    (dead, other) = queue.claim("pacs", 10, 60)
    queue.mark_failed({dead.id: "status 0xA700: out of resources"}, max_attempts=1, backoff=float)
    queue.mark_sent([other.id])
    assert sender.settle() == {}  # archive still owes its rows: the job keeps sending
    queue.mark_sent([r.id for r in queue.claim("archive", 10, 60)])
    assert sender.settle() == {job_id: "failed"}
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.FAILED
    assert "destination 'pacs'" in (job.error or "") and "0xA700" in (job.error or "")
    with sessions() as session:
        events, _ = list_events(session, job_id=job_id, action="send_failed")
    assert len(events) == 1 and events[0].actor == "node"


def test_pending_rows_of_a_cancelled_job_are_dropped(
    engine: Engine, jobs: JobRepository, queue: SendQueue, clock: Clock, tmp_path: Path
) -> None:
    sender = Sender(make_session_factory(engine), jobs, [destination()], tmp_path, clock=clock)
    job_id = finished_job(jobs, ["pacs"])
    jobs.cancel(job_id)
    assert queue.claim("pacs", 10, 60) == []
    sender.settle()
    assert {(r.state, r.last_error) for r in queue.for_job(job_id)} == {(DEAD, "job cancelled")}


# -- requeue (dicomnode send --job) ---------------------------------------------------------------


def test_requeue_sends_dead_and_sent_rows_again(
    engine: Engine, jobs: JobRepository, queue: SendQueue, tmp_path: Path, clock: Clock
) -> None:
    sender = Sender(make_session_factory(engine), jobs, [destination()], tmp_path, clock=clock)
    job_id = finished_job(jobs, ["pacs"])
    (a, b) = queue.claim("pacs", 10, 60)
    queue.mark_sent([a.id])
    queue.mark_failed({b.id: "refused"}, max_attempts=1, backoff=float)
    sender.settle()
    assert jobs.get(job_id).state is JobState.FAILED  # type: ignore[union-attr]
    assert queue.requeue(job_id) == ["pacs"]
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.SENDING and job.error is None
    rows = queue.for_job(job_id)
    assert {(r.state, r.attempts) for r in rows} == {(PENDING, 0)} and len(rows) == 2
    assert queue.requeue(job_id, ["archive"]) == ["archive"]  # a destination it had none for
    destinations = sorted(r.destination for r in queue.for_job(job_id))
    assert destinations == ["archive", "archive", "pacs", "pacs"]


def test_requeue_refuses_what_has_nothing_to_send(jobs: JobRepository, queue: SendQueue) -> None:
    with pytest.raises(JobNotFound, match="no job 999"):
        queue.requeue(999)
    job_id = finished_job(jobs, ["pacs"], {"objects": []})
    with pytest.raises(NoResults, match=f"job {job_id}'s result lists no DICOM objects"):
        queue.requeue(job_id)
    queued = jobs.enqueue(
        dedupe_key="send/queued", route="r", model="m", study_instance_uid=STUDY, state="queued"
    )
    with pytest.raises(JobStateError, match="is queued"):
        queue.requeue(queued.id)


# -- several senders on one database --------------------------------------------------------------


@pytest.mark.postgres
def test_concurrent_claims_never_share_a_row(postgres_url: str, clean_postgres_url: str) -> None:
    engine = make_engine(clean_postgres_url)
    upgrade(engine)
    try:
        jobs = JobRepository(engine, QueueSettings())
        queue = SendQueue(make_session_factory(engine))
        for _ in range(10):
            finished_job(jobs, ["pacs"], {"objects": objects(10, tag=str(next(_keys)))})
        taken: list[list[int]] = [[] for _ in range(4)]

        def claim(slot: int) -> None:
            while rows := queue.claim("pacs", 7, 60):
                taken[slot].extend(r.id for r in rows)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        every = [i for ids in taken for i in ids]
        assert len(every) == 100 and len(set(every)) == 100
    finally:
        engine.dispose()


# -- configuration --------------------------------------------------------------------------------


def test_routes_must_name_configured_destinations(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.1"\nport = 104\n'
        '[[routes]]\nname = "chest"\nmodel = "m"\ndestinations = ["pacs", "archiv"]\n'
    )
    with pytest.raises(ConfigError, match=r"route 'chest' sends to \['archiv'\].*\['pacs'\]"):
        load_settings(config)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ae_title": "PACS", "host": "h"}, "needs ae_title, host and port together"),
        ({"url": "http://h/dicom-web", "host": "h", "ae_title": "A", "port": 1}, "exactly one"),
        ({"return_to_sender": True}, "return_to_sender needs the port"),
        ({"url": "ftp://h"}, "is not http"),
        ({}, "got none"),
    ],
)
def test_a_destination_is_one_kind(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DestinationSettings(name="d", **values)


def test_destination_kinds_and_lookup() -> None:
    settings = Settings(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 104},
            {"name": "web", "url": "https://pacs/dicom-web", "token": "t"},
            {"name": "back", "return_to_sender": True, "port": 104},
        ]
    )
    assert [d.kind for d in settings.destinations] == ["dimse", "stow", "return_to_sender"]
    assert settings.destination("web").token == "t"
    with pytest.raises(ConfigError, match=r"no destination 'nope'.*\['pacs', 'web', 'back'\]"):
        settings.destination("nope")
    with pytest.raises(ValueError, match=r"repeated: \['pacs'\]"):
        Settings(destinations=[settings.destinations[0], settings.destinations[0]])


# -- retention of result files --------------------------------------------------------------------


def test_results_stay_until_every_destination_has_them(
    engine: Engine, jobs: JobRepository, queue: SendQueue, clock: Clock, tmp_path: Path
) -> None:
    sessions = make_session_factory(engine)
    sender = Sender(sessions, jobs, [destination()], tmp_path, clock=clock)
    pending = finished_job(jobs, ["pacs"])
    done = finished_job(jobs, [])
    orphan = 10_000  # no such job any more (purged)
    for job_id in (pending, done, orphan):
        (tmp_path / "results" / str(job_id) / "dicom").mkdir(parents=True)
        (tmp_path / "results" / str(job_id) / "dicom" / "seg.dcm").write_bytes(b"x")
    later = clock.now + timedelta(days=1)
    jobs.mark_failed(pending, "given up by hand")  # final, yet its rows are still pending
    assert purge_results(sessions, tmp_path, later) == 2
    assert sorted(int(p.name) for p in (tmp_path / "results").iterdir()) == [pending]
    queue.mark_sent([r.id for r in queue.claim("pacs", 10, 60)])
    sender.settle()
    assert purge_results(sessions, tmp_path, clock.now) == 0  # too recent
    assert purge_results(sessions, tmp_path, later) == 1
    assert list((tmp_path / "results").iterdir()) == []
    with sessions() as session:
        assert {s.state for s in session.scalars(select(Send))} == {SENT}


def test_sends_to_an_unconfigured_destination_are_reported(
    engine: Engine,
    jobs: JobRepository,
    clock: Clock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = Sender(make_session_factory(engine), jobs, [destination()], tmp_path, clock=clock)
    finished_job(jobs, ["gone"])
    with caplog.at_level("WARNING", logger="dicomnode.send.sender"):
        sender.settle()
    (record,) = [r for r in caplog.records if getattr(r, "action", "") == "send_unserved"]
    assert "2 sends wait for destination 'gone', which is not configured" in record.getMessage()
