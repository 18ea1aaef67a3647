"""The send queue in the database (the ``sends`` table): one row per (job, destination, object).

Rows are created in the transaction that moves a job to ``sending`` (:func:`add_sends`, called by
:meth:`dicomnode.queue.repository.JobRepository.finish`), so a crash cannot lose a send. A sender
claims a destination's due rows (:meth:`SendQueue.claim`) under a lease, and counts failed
attempts with backoff and the dead letter, as every outbox of the node does
(:mod:`dicomnode.queue.delivery`). Delivering twice is harmless: the objects keep their SOP
Instance UIDs, and a PACS files a second copy of one as the same instance.

Like :mod:`dicomnode.queue.repository`, each method is one short transaction and returns frozen
values, never ORM objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, delete, event, func, select, update
from sqlalchemy.orm import Session

from dicomnode.db.models import Instance, Job, Send, Series
from dicomnode.db.session import rowcount
from dicomnode.domain import JobState, ResultObject
from dicomnode.errors import JobNotFound, JobStateError, NoResults, SendError
from dicomnode.queue import delivery
from dicomnode.queue.delivery import DEAD, PENDING, SENT, Outbox, Wakers

logger = logging.getLogger(__name__)

sends = cast(Table, Send.__table__)
jobs = cast(Table, Job.__table__)

#: Job states whose sends may go out: a queued or running job makes new objects (finish()
#: replaces its rows), and a cancelled one sends nothing more.
#: A skipped job sends too: the "not analysed" report of an input its route refused.
SENDABLE_JOB_STATES = (
    JobState.SENDING.value,
    JobState.DONE.value,
    JobState.FAILED.value,
    JobState.SKIPPED.value,
)


@dataclass(frozen=True)
class SendRecord:
    """One row of the sends table, as values."""

    id: int
    job_id: int
    destination: str
    kind: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> SendRecord:
        """The record of a row of the sends table (its columns, as the table returns them)."""
        return cls(**{field.name: row._mapping[field.name] for field in fields(cls)})


def _rows(
    job_id: int, destinations: Iterable[str], objects: Sequence[ResultObject], now: datetime
) -> list[dict[str, Any]]:
    return [
        {
            "job_id": job_id,
            "destination": destination,
            "kind": obj.kind,
            "path": obj.path,
            "sop_class_uid": obj.sop_class_uid,
            "sop_instance_uid": obj.sop_instance_uid,
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "last_error": None,
            "created_at": now,
            "sent_at": None,
            "updated_at": now,
        }
        for destination in dict.fromkeys(destinations)
        for obj in {o.sop_instance_uid: o for o in objects}.values()
    ]


#: the deliverers of this process to wake when sends are added
_wakers = Wakers()
listen, unlisten, _notify = _wakers.listen, _wakers.unlisten, _wakers.wake


def add_sends(
    session: Session,
    job_id: int,
    destinations: Iterable[str],
    result: Mapping[str, Any] | None,
    now: datetime,
) -> int:
    """In the caller's transaction: the job's sends are one pending row per destination and
    object of ``result["objects"]``, replacing the rows of an earlier run. Returns how many.
    The senders of this process are woken when the transaction commits."""
    rows = _rows(job_id, destinations, ResultObject.listed_in(result), now)
    session.execute(delete(sends).where(sends.c.job_id == job_id))
    if rows:
        session.execute(sends.insert(), rows)
        event.listen(session, "after_commit", _notify, once=True)
    return len(rows)


class SendQueue(Outbox):
    """The sends table. ``sessions`` is the node's session factory."""

    # -- the sender's side -------------------------------------------------------------------

    def claim(self, destination: str, limit: int, lease_s: float) -> list[SendRecord]:
        """Take up to ``limit`` due pending rows of ``destination``, oldest due first, and hold
        them for ``lease_s`` (they are not due again before, unless marked)."""
        now = self.now()
        candidates = delivery.due(
            sends,
            now,
            sends.c.destination == destination,
            jobs.c.state.in_(SENDABLE_JOB_STATES),
            limit=limit,
        ).join(jobs, jobs.c.id == sends.c.job_id)
        with self._sessions.begin() as session:
            rows = delivery.claim(
                session, sends, candidates, lease_s=lease_s, now=now, dialect=self._dialect
            )
        return sorted((SendRecord.from_row(row) for row in rows), key=lambda r: (r.job_id, r.id))

    def mark_sent(self, ids: Iterable[int]) -> list[tuple[int, str, int]]:
        """The destination confirmed these rows. Returns (job id, destination, objects) for each
        job whose objects all reached a destination with this call, and writes its audit event
        ("sent", by the node) in the same transaction: exactly one per job and destination, even
        with several senders (the jobs' rows are locked first, in id order)."""
        from dicomnode.audit import NODE, add_event

        ids = list(ids)
        if not ids:
            return []
        now = self.now()
        completed: list[tuple[int, str, int]] = []
        with self._sessions.begin() as session:
            job_ids = sorted(
                set(session.scalars(select(sends.c.job_id).where(sends.c.id.in_(ids))))
            )
            studies = dict(
                session.execute(
                    select(jobs.c.id, jobs.c.study_instance_uid)
                    .where(jobs.c.id.in_(job_ids))
                    .order_by(jobs.c.id)
                    .with_for_update()
                ).all()
            )
            changed = session.execute(
                update(sends)
                .where(sends.c.id.in_(ids), sends.c.state == PENDING)
                .values(state=SENT, sent_at=now, last_error=None, updated_at=now)
                .returning(sends.c.job_id, sends.c.destination)
            ).all()
            for job_id, destination in sorted(set(changed)):
                states = session.execute(
                    select(sends.c.state, func.count())
                    .where(sends.c.job_id == job_id, sends.c.destination == destination)
                    .group_by(sends.c.state)
                ).all()
                counts: dict[str, int] = dict(states)
                if set(counts) == {SENT}:
                    completed.append((job_id, destination, int(counts[SENT])))
                    add_event(
                        session,
                        NODE,
                        "sent",
                        job_id=job_id,
                        study_instance_uid=studies.get(job_id),
                        detail=f"{counts[SENT]} objects to {destination}",
                        at=now,
                    )
        return completed

    def mark_failed(
        self,
        failures: Mapping[int, str],
        *,
        max_attempts: int,
        backoff: Callable[[int], float],
    ) -> dict[int, str]:
        """Count a failed attempt on each row (id -> error): due again after ``backoff(attempts)``
        seconds, or ``dead`` once ``max_attempts`` are used. Returns id -> new state."""
        if not failures:
            return {}
        now = self.now()
        with self._sessions.begin() as session:
            return delivery.count_failures(
                session, sends, failures, max_attempts=max_attempts, backoff=backoff, now=now
            )

    def origin(self, job_id: int) -> tuple[str, str] | None:
        """The calling AE title and host that delivered the job's input (its newest instance),
        for destinations with ``return_to_sender``; None when the index has no such instance."""
        with self._sessions() as session:
            inputs = session.scalar(select(jobs.c.inputs).where(jobs.c.id == job_id)) or []
            series = list(inputs)
            if not series:
                series = list(
                    session.scalars(
                        select(jobs.c.series_instance_uid).where(jobs.c.id == job_id)
                    ).all()
                )
            row = session.execute(
                select(Instance.calling_aet, Instance.calling_host)
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.series_instance_uid.in_([s for s in series if s]))
                .order_by(Instance.received_at.desc(), Instance.id.desc())
                .limit(1)
            ).first()
        if row is None or not row.calling_aet or not row.calling_host:
            return None
        return str(row.calling_aet).strip(), str(row.calling_host)

    # -- settling jobs -----------------------------------------------------------------------

    def settled_jobs(self, job_ids: Iterable[int] | None = None) -> dict[int, list[SendRecord]]:
        """Jobs in ``sending`` with no pending row left, each with its dead rows (none: every
        object reached every destination)."""
        pending = (
            select(sends.c.id).where(sends.c.job_id == jobs.c.id, sends.c.state == PENDING).exists()
        )
        query = select(jobs.c.id).where(jobs.c.state == JobState.SENDING.value, ~pending)
        if job_ids is not None:
            query = query.where(jobs.c.id.in_(list(job_ids)))
        with self._sessions() as session:
            ids = list(session.scalars(query.order_by(jobs.c.id).limit(1000)))
            dead = session.execute(
                select(sends).where(sends.c.job_id.in_(ids), sends.c.state == DEAD)
            ).all()
        settled: dict[int, list[SendRecord]] = {job_id: [] for job_id in ids}
        for row in dead:
            settled[row.job_id].append(SendRecord.from_row(row))
        return settled

    def drop_cancelled(self) -> int:
        """Pending rows of cancelled jobs are given up (``dead``, "job cancelled")."""
        now = self.now()
        cancelled = select(jobs.c.id).where(jobs.c.state == JobState.CANCELLED.value)
        stale = select(sends.c.id).where(sends.c.state == PENDING, sends.c.job_id.in_(cancelled))
        with self._sessions() as session:  # a read first: most ticks have nothing to write
            if session.execute(stale.limit(1)).first() is None:
                return 0
        with self._sessions.begin() as session:
            return rowcount(
                session,
                update(sends)
                .where(sends.c.state == PENDING, sends.c.job_id.in_(cancelled))
                .values(state=DEAD, last_error="job cancelled", next_attempt_at=None,
                        updated_at=now),
            )  # fmt: skip

    # -- admin -------------------------------------------------------------------------------

    def requeue(self, job_id: int, destinations: Sequence[str] | None = None) -> list[str]:
        """Send a finished job's result objects again: to ``destinations`` (default: the
        job's own), every row pending now with its attempts reset (dead and sent ones too),
        rows added for a destination the job had none for, and the job back to ``sending``.

        Returns the destinations. Raises JobNotFound, JobStateError for a job that is not
        done, failed or sending or that is a shadow job (its results are never sent), and
        NoResults when its result lists no objects.
        """
        now = self.now()
        with self._sessions.begin() as session:
            job = session.execute(
                select(jobs.c.state, jobs.c.result, jobs.c.destinations, jobs.c.mode)
                .where(jobs.c.id == job_id)
                .with_for_update()
            ).first()
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if job.state == JobState.REVIEW.value:
                raise JobStateError(
                    f"job {job_id} is in review: its results go out when a reviewer approves "
                    "them (POST /api/jobs/{id}/approve), never by a resend"
                )
            if job.state not in SENDABLE_JOB_STATES:
                raise JobStateError(
                    f"job {job_id} is {job.state}; only done, failed, skipped or sending "
                    "jobs have results to send"
                )
            if job.mode == "shadow":
                raise JobStateError(
                    f"job {job_id} is a shadow job; its results are kept for `models compare` "
                    "and never sent (make its route live to send them)"
                )
            objects = ResultObject.listed_in(job.result)
            if not objects:
                raise NoResults(f"job {job_id}'s result lists no DICOM objects to send")
            targets = list(destinations or job.destinations or ())
            if not targets:
                raise SendError(f"job {job_id} has no destinations; name one with --destination")
            session.execute(
                delete(sends).where(sends.c.job_id == job_id, sends.c.destination.in_(targets))
            )
            session.execute(sends.insert(), _rows(job_id, targets, objects, now))
            session.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(state=JobState.SENDING.value, error=None, sent_at=None, updated_at=now)
            )
        _notify()
        logger.info(
            "job %s: %d objects queued again for %s",
            job_id,
            len(objects),
            ", ".join(targets),
            extra={"action": "sends_requeued", "job_id": job_id},
        )
        return targets

    # -- reads -------------------------------------------------------------------------------

    def for_job(self, job_id: int) -> list[SendRecord]:
        with self._sessions() as session:
            rows = session.execute(
                select(sends).where(sends.c.job_id == job_id).order_by(sends.c.id)
            ).all()
        return [SendRecord.from_row(row) for row in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """How many rows each (destination, state) has."""
        with self._sessions() as session:
            rows = session.execute(
                select(sends.c.destination, sends.c.state, func.count()).group_by(
                    sends.c.destination, sends.c.state
                )
            ).all()
        return {(destination, state): int(n) for destination, state, n in rows}
