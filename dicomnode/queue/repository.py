"""The job queue in the database: enqueue, claim under a lease, heartbeat, finish, fail, retry.

Each method is one short transaction, and what leaves the repository is a frozen dataclass, never
an ORM object, so one repository serves every thread of a process.

A claim is atomic on both databases. On PostgreSQL it is one statement,
``UPDATE jobs ... WHERE id = (SELECT id ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING ...``:
concurrent claimers skip a row another claimer holds instead of waiting for it, and a row whose
state changed meanwhile is re-checked and passed over. On SQLite the same statement runs inside the
``BEGIN IMMEDIATE`` write transaction that :mod:`dicomnode.db.session` opens for every
transaction, so claims are serialised.

A claimed job carries a lease (``lease_owner``, ``lease_expires_at``). The worker extends it with
:meth:`JobRepository.heartbeat`; :meth:`JobRepository.reap_expired_leases` (run periodically)
puts the job of a worker that stopped heartbeating back in the queue, or fails it when its
attempts are used up. A heartbeat that returns False tells the worker its job was cancelled or
taken from it; :meth:`~JobRepository.finish` and :meth:`~JobRepository.fail` by a worker that no
longer holds the lease change nothing. After a run ``lease_owner`` names the worker that ran it.

Times are UTC from the repository's clock, the host's: hosts sharing a queue need synchronised
clocks (NTP), and ``lease_s`` should exceed any skew by a wide margin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Engine, Row, Table, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import audit
from dicomnode.config import QueueSettings
from dicomnode.db.models import Job
from dicomnode.db.session import insert_unless_present, make_session_factory, rowcount
from dicomnode.domain import FINAL_STATES, JobState, Priority
from dicomnode.errors import JobNotFound, JobStateError
from dicomnode.queue.delivery import PENDING, utc_now
from dicomnode.queue.listing import EVERY_JOB, JobFilter
from dicomnode.queue.notifications import add_notifications, job_context, notifications
from dicomnode.queue.outcomes import Outcome, ReleasePolicy
from dicomnode.queue.records import ClaimedJob, JobRecord, priority_name
from dicomnode.queue.sends import add_sends

logger = logging.getLogger(__name__)

jobs = cast(Table, Job.__table__)
LEASE_EXPIRED = "worker lost (lease expired)"
#: Longest error text kept on a job (a traceback's last line is what admins need).
MAX_ERROR_CHARS = 8000
#: the result key of a job whose route refused its input: skipped, its report sent all the same
REFUSED = "refused"
_PURGE_BATCH = 5000


class JobRepository:
    """The jobs table. ``sessions`` is the node's session factory (or an engine)."""

    def __init__(
        self,
        sessions: sessionmaker[Session] | Engine,
        settings: QueueSettings | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        policy: ReleasePolicy | None = None,
    ) -> None:
        if isinstance(sessions, Engine):
            sessions = make_session_factory(sessions)
        self._sessions = sessions
        self.settings = settings or QueueSettings()
        #: the routes' rules on findings (send_if, critical) and the notifications, applied
        #: where a run's results are released or a job fails (None: no rules, no notifications)
        self.policy = policy or ReleasePolicy()
        self._clock = clock
        bind = sessions.kw.get("bind")
        self._dialect = bind.dialect.name if bind is not None else ""

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory, for reads beside the queue's (an admin's view of a job)."""
        return self._sessions

    def now(self) -> datetime:
        return self._clock().astimezone(UTC)

    def backoff(self, attempts: int) -> timedelta:
        """How long a job waits after its ``attempts``-th run failed: backoff_s, doubling."""
        return timedelta(seconds=self.settings.backoff_s * 2 ** min(max(attempts - 1, 0), 30))

    # -- creating jobs -------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        dedupe_key: str,
        route: str,
        model: str,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        inputs: Sequence[str] = (),
        destinations: Sequence[str] = (),
        level: str = "series",
        mode: str = "live",
        priority: int = Priority.ROUTINE,
        state: JobState | str = JobState.WAITING,
        max_attempts: int | None = None,
        received_at: datetime | None = None,
        completed_at: datetime | None = None,
        error: str | None = None,
        actor: str | None = None,
    ) -> JobRecord:
        """Add a job, or return the one that already has ``dedupe_key`` (never a second one).

        ``state`` is ``waiting`` (its series is not complete; :meth:`mark_queued` later),
        ``queued`` (runnable now) or ``skipped`` (recorded only, with ``error`` as the reason).
        With ``actor``, a new job's audit event (``routed``, or ``skipped``) commits with it.
        A ``shadow`` job (``mode``) runs and keeps its results, but never sends them.
        """
        state = JobState(state)
        if mode not in ("live", "shadow"):
            raise ValueError(f"a job's mode is 'live' or 'shadow', not {mode!r}")
        if state not in (JobState.WAITING, JobState.QUEUED, JobState.SKIPPED):
            raise ValueError(f"a job is enqueued waiting, queued or skipped, not {state}")
        now = self.now()
        queued = state is JobState.QUEUED
        values = {
            "dedupe_key": dedupe_key,
            "route": route,
            "model": model,
            "level": level,
            "mode": mode,
            "state": state.value,
            "priority": int(priority),
            "study_instance_uid": study_instance_uid,
            "series_instance_uid": series_instance_uid,
            "inputs": list(inputs),
            "destinations": list(destinations),
            "attempts": 0,
            "max_attempts": max_attempts or self.settings.max_attempts,
            "run_after": now if queued else None,
            "error": _clip(error),
            "received_at": received_at or now,
            "completed_at": (completed_at or now) if state is not JobState.WAITING else None,
            "queued_at": now if queued else None,
            "finished_at": now if state is JobState.SKIPPED else None,
            "updated_at": now,
        }
        with self._sessions.begin() as session:
            created = self._insert_new(session, values)
            row = session.execute(select(jobs).where(jobs.c.dedupe_key == dedupe_key)).one()
            if created and actor is not None:
                skipped = state is JobState.SKIPPED
                audit.add_event(
                    session,
                    actor,
                    "skipped" if skipped else "routed",
                    job_id=row.id,
                    study_instance_uid=study_instance_uid,
                    detail="no route matched" if skipped else f"route {route}, model {model}",
                    at=now,
                )
        record = JobRecord.from_row(row)
        if created:
            logger.info(
                "job %s enqueued: route %s, model %s, %s, priority %s",
                record.id,
                route,
                model,
                state,
                priority_name(record.priority),
                extra={"action": "job_enqueued", "job_id": record.id},
            )
        else:
            logger.debug(
                "job %s already enqueued under its dedupe key",
                record.id,
                extra={"action": "job_enqueue_duplicate", "job_id": record.id},
            )
        return record

    def _insert_new(self, session: Session, values: dict[str, Any]) -> bool:
        return insert_unless_present(session, jobs, values, ["dedupe_key"])

    def mark_queued(
        self,
        job_id: int,
        *,
        completed_at: datetime | None = None,
        inputs: Sequence[str] | None = None,
        confirm_after: datetime | None = None,
    ) -> bool:
        """A waiting job's series (or study) is complete: it may run now. False if not waiting.

        ``inputs`` replaces the job's series list (a study-level job runs on what arrived).
        With ``confirm_after``, the completion is provisional: the job runs now, but its results
        are held (``confirming``) until :meth:`confirm`.
        """
        now = self.now()
        values: dict[str, Any] = {
            "state": JobState.QUEUED.value,
            "completed_at": completed_at or now,
            "queued_at": now,
            "run_after": now,
            "updated_at": now,
            "confirm_after": confirm_after,
        }
        if inputs is not None:
            values["inputs"] = list(inputs)
        with self._sessions.begin() as session:
            changed = rowcount(
                session,
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.WAITING.value)
                .values(**values),
            )
        if changed:
            logger.info("job %s queued", job_id, extra={"action": "job_queued", "job_id": job_id})
        return bool(changed)

    def mark_skipped(self, job_id: int, reason: str) -> bool:
        """A waiting or queued job will not run (e.g. a count condition failed). False if not."""
        return self._end_unstarted(job_id, JobState.SKIPPED, reason, "job_skipped")

    def mark_failed(self, job_id: int, error: str) -> bool:
        """Fail a job no worker holds: waiting (a study missing a required series, with the
        route's ``on_missing = "fail"``), queued, or sending (its results could not be sent)."""
        return self._end_unstarted(job_id, JobState.FAILED, error, "job_failed")

    def _end_unstarted(self, job_id: int, state: JobState, error: str, action: str) -> bool:
        now = self.now()
        allowed = [JobState.WAITING.value, JobState.QUEUED.value]
        if state is JobState.FAILED:
            allowed.append(JobState.SENDING.value)
        with self._sessions.begin() as session:
            row = session.execute(
                select(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(allowed)).with_for_update()
            ).first()
            changed = row is not None
            if row is not None:
                session.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(state=state.value, error=_clip(error), finished_at=now, updated_at=now)
                )
                if state is JobState.FAILED:
                    self._failed(session, row, error, now)
        if changed:
            logger.info("job %s %s", job_id, state, extra={"action": action, "job_id": job_id})
        return bool(changed)

    # -- the worker's side -----------------------------------------------------------------------

    def claim(
        self, worker_id: str, models: Iterable[str] | None = None, lease_s: float | None = None
    ) -> ClaimedJob | None:
        """Take the most urgent runnable job for one of ``models`` (None: any), or None.

        Runnable: ``queued`` with ``run_after`` passed. Order: priority (stat first), then the
        earliest ``run_after``, then the oldest. The job becomes ``running`` under a lease of
        ``lease_s`` (default: the queue settings') held by ``worker_id``; ``attempts`` counts it.
        """
        now = self.now()
        lease = timedelta(seconds=lease_s if lease_s is not None else self.settings.lease_s)
        candidate = select(jobs.c.id).where(
            jobs.c.state == JobState.QUEUED.value, jobs.c.run_after <= now
        )
        if models is not None:
            names = sorted(set(models))
            if not names:
                return None
            candidate = candidate.where(jobs.c.model.in_(names))
        candidate = candidate.order_by(jobs.c.priority.desc(), jobs.c.run_after, jobs.c.id).limit(1)
        if self._dialect == "postgresql":
            candidate = candidate.with_for_update(skip_locked=True)
        statement = (
            update(jobs)
            .where(jobs.c.id == candidate.scalar_subquery(), jobs.c.state == JobState.QUEUED.value)
            .values(
                state=JobState.RUNNING.value,
                attempts=jobs.c.attempts + 1,
                lease_owner=worker_id,
                lease_expires_at=now + lease,
                started_at=now,
                finished_at=None,
                updated_at=now,
            )
            .returning(*jobs.c)
        )
        with self._sessions.begin() as session:
            row = session.execute(statement).first()
        if row is None:
            return None
        job = ClaimedJob.from_row(row)
        logger.info(
            "job %s claimed by %s: model %s, attempt %d of %d",
            job.id,
            worker_id,
            job.model,
            job.attempts,
            job.max_attempts,
            extra={"action": "job_claimed", "job_id": job.id, "worker_id": worker_id},
        )
        return job

    def heartbeat(self, job_id: int, worker_id: str, lease_s: float | None = None) -> bool:
        """Extend the lease; False when the worker no longer holds it (cancelled, reclaimed)."""
        now = self.now()
        lease = timedelta(seconds=lease_s if lease_s is not None else self.settings.lease_s)
        with self._sessions.begin() as session:
            changed = rowcount(
                session,
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.lease_owner == worker_id,
                    jobs.c.state == JobState.RUNNING.value,
                )
                .values(lease_expires_at=now + lease),
            )
        if not changed:
            logger.warning(
                "job %s: %s lost its lease (cancelled or reclaimed)",
                job_id,
                worker_id,
                extra={"action": "job_lease_lost", "job_id": job_id, "worker_id": worker_id},
            )
        return bool(changed)

    def _held(self, session: Session, job_id: int, worker_id: str) -> Row[Any] | None:
        """The job's row, locked, if ``worker_id`` holds its lease."""
        return session.execute(
            select(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.lease_owner == worker_id,
                jobs.c.state == JobState.RUNNING.value,
            )
            .with_for_update()
        ).first()

    def finish(
        self,
        job_id: int,
        worker_id: str,
        result: Mapping[str, Any] | None = None,
        *,
        publish: Callable[[], None] | None = None,
    ) -> JobState | None:
        """The run succeeded: ``sending`` when the job has destinations, else ``done``; but
        ``confirming`` (nothing sent yet) while its inputs are unconfirmed (:meth:`confirm`),
        and ``review`` when its route holds results for a reviewer (:meth:`approve`).

        Returns the new state, or None (and changes nothing) when ``worker_id`` lost the lease.
        ``publish`` (moving the run's files into place) runs only while the lease is held, with
        the job's row locked, before the commit; if it raises, nothing is recorded.
        """
        return self._end_run(job_id, worker_id, result, None, publish)

    def refuse(
        self,
        job_id: int,
        worker_id: str,
        reason: str,
        result: Mapping[str, Any] | None = None,
        *,
        publish: Callable[[], None] | None = None,
    ) -> JobState | None:
        """The route refused the job's input (outside its model's envelope): ``skipped`` at
        once, never retried (the input cannot change), ``reason`` as its error and ``result``
        (the verdict, the "not analysed" report) kept, the report's sends written in this
        transaction. While its inputs are unconfirmed it is ``confirming`` instead, like a
        finished run: a refusal of a partial series sends nothing, and :meth:`confirm` skips
        it. None when ``worker_id`` lost the lease."""
        return self._end_run(job_id, worker_id, {**(result or {}), REFUSED: True}, reason, publish)

    def _end_run(
        self,
        job_id: int,
        worker_id: str,
        result: Mapping[str, Any] | None,
        error: str | None,
        publish: Callable[[], None] | None,
    ) -> JobState | None:
        """A run's end with its result (a finish, or a refusal with its reason as ``error``),
        released or held in the transaction that records it: a crash loses no send and no
        notification."""
        now = self.now()
        with self._sessions.begin() as session:
            row = self._held(session, job_id, worker_id)
            if row is None:
                state = None
            else:
                if publish is not None:
                    publish()
                if row.confirm_after is not None:
                    state = JobState.CONFIRMING
                else:
                    state, result = self._release_or_hold(session, row, result, now)
                session.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id)
                    .values(
                        state=state.value,
                        result=dict(result) if result is not None else None,
                        error=_clip(error),
                        lease_expires_at=None,
                        finished_at=now,
                        updated_at=now,
                    )
                )
        extra = {"job_id": job_id, "worker_id": worker_id}
        if state is None:
            logger.warning(
                "job %s: result from %s dropped, it no longer holds the lease",
                job_id,
                worker_id,
                extra={"action": "job_result_dropped", **extra},
            )
        elif error is not None:
            logger.warning(
                "job %s refused (%s): %s",
                job_id,
                state,
                _first_line(error),
                extra={"action": "job_refused", **extra},
            )
        else:
            logger.info(
                "job %s finished by %s: %s",
                job_id,
                worker_id,
                state,
                extra={"action": "job_finished", **extra},
            )
        return state

    def fail(
        self, job_id: int, worker_id: str, error: str, *, retry: bool = True
    ) -> JobState | None:
        """The run failed with ``error``. Queued again after the backoff while attempts remain
        (and ``retry``), else ``failed`` with the error kept. None when the lease was lost."""
        now = self.now()
        with self._sessions.begin() as session:
            row = self._held(session, job_id, worker_id)
            if row is None:
                state = None
            else:
                again = retry and row.attempts < row.max_attempts
                state = JobState.QUEUED if again else JobState.FAILED
                values: dict[str, Any] = {
                    "state": state.value,
                    "error": _clip(error),
                    "lease_expires_at": None,
                    "updated_at": now,
                }
                if again:
                    values["run_after"] = now + self.backoff(row.attempts)
                else:
                    values["finished_at"] = now
                session.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
                if not again:
                    self._failed(session, row, error, now)
        if row is None:  # and so state is None
            logger.warning(
                "job %s: failure from %s dropped, it no longer holds the lease",
                job_id,
                worker_id,
                extra={"action": "job_result_dropped", "job_id": job_id, "worker_id": worker_id},
            )
        elif state is JobState.QUEUED:
            logger.warning(
                "job %s failed on attempt %d of %d, retried in %.0f s: %s",
                job_id,
                row.attempts,
                row.max_attempts,
                self.backoff(row.attempts).total_seconds(),
                _first_line(error),
                extra={"action": "job_retry_scheduled", "job_id": job_id, "worker_id": worker_id},
            )
        else:
            logger.error(
                "job %s failed after %d attempts: %s",
                job_id,
                row.attempts,
                _first_line(error),
                extra={"action": "job_failed", "job_id": job_id, "worker_id": worker_id},
            )
        return state

    def confirm(self, job_id: int) -> JobState | None:
        """The job's inputs are confirmed whole: its results may go out. A ``confirming`` job
        becomes ``sending`` (its sends written in this transaction) or ``done`` (or ``review``
        on a review route); a job still
        queued or running just loses its hold, so it sends as soon as it finishes. Returns the
        job's state after, or None when it was no longer held (confirmed, or ended)."""
        now = self.now()
        with self._sessions.begin() as session:
            row = session.execute(
                select(jobs)
                .where(jobs.c.id == job_id, jobs.c.confirm_after.is_not(None))
                .with_for_update()
            ).first()
            if row is None or JobState(row.state) in FINAL_STATES:
                return None
            state = JobState(row.state)
            values: dict[str, Any] = {"confirm_after": None, "updated_at": now}
            if state is JobState.CONFIRMING:
                state, result = self._release_or_hold(session, row, row.result, now)
                values["state"] = state.value
                if result is not None:
                    values["result"] = dict(result)
            session.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
        logger.info(
            "job %s: inputs confirmed, %s",
            job_id,
            state,
            extra={"action": "job_confirmed", "job_id": job_id},
        )
        return state

    def held_past(self, now: datetime) -> list[JobRecord]:
        """Unfinished jobs whose inputs' confirmation window ended before ``now``."""
        with self._sessions() as session:
            rows = session.execute(
                select(jobs)
                .where(
                    jobs.c.confirm_after.is_not(None),
                    jobs.c.confirm_after <= now.astimezone(UTC),
                    jobs.c.state.not_in([state.value for state in FINAL_STATES]),
                )
                .order_by(jobs.c.id)
            ).all()
        return [JobRecord.from_row(row) for row in rows]

    def mark_sent(self, job_id: int) -> bool:
        """Every result reached every destination: ``sending`` -> ``done``. False if not sending."""
        now = self.now()
        with self._sessions.begin() as session:
            changed = rowcount(
                session,
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.SENDING.value)
                .values(state=JobState.DONE.value, sent_at=now, updated_at=now),
            )
        if changed:
            logger.info("job %s sent", job_id, extra={"action": "job_sent", "job_id": job_id})
        return bool(changed)

    # -- outcomes: where results go out, and who is told ---------------------------------------

    def _release_or_hold(
        self, session: Session, row: Row[Any], result: Mapping[str, Any] | None, now: datetime
    ) -> tuple[JobState, Mapping[str, Any] | None]:
        """Where a run's results would go out: held in ``review`` (nothing sent, no one told;
        audited) when the job's route says ``review = true``, else :meth:`_release`d. A shadow
        job never sends, so it is never held; nor is a refusal's "not analysed" report, which
        holds no finding to review."""
        refused = bool((result or {}).get(REFUSED))
        if row.mode == "shadow" or refused or not self.policy.review(row.route):
            return self._release(session, row, result, now)
        audit.add_event(
            session,
            audit.NODE,
            "review",
            job_id=row.id,
            study_instance_uid=row.study_instance_uid,
            detail=f"results held for review (route {row.route})",
            at=now,
        )
        logger.info(
            "job %s: results held for review",
            row.id,
            extra={"action": "job_review", "job_id": row.id},
        )
        return JobState.REVIEW, result

    def _release(
        self, session: Session, row: Row[Any], result: Mapping[str, Any] | None, now: datetime
    ) -> tuple[JobState, Mapping[str, Any] | None]:
        """In the caller's transaction, a run's results may go out: its outcome decided on its
        findings (kept in the result as ``outcome``), its sends written (``sending``) when its
        route's ``send_if`` lets them go and it has destinations, else ``done``; a critical
        finding makes the study's other unstarted jobs stat; its notifications written. A
        shadow job is ``done`` with none of these (its results are kept for ``models compare``
        and never leave the node, whatever its destinations). A refused job (its route refused
        the input) is ``skipped``, its "not analysed" report sent to every destination: it
        holds no finding for ``send_if`` or a notification to weigh."""
        if (result or {}).get(REFUSED):
            if row.mode != "shadow" and row.destinations:
                add_sends(session, row.id, row.destinations, result, now)
            return JobState.SKIPPED, result
        if row.mode == "shadow":
            return JobState.DONE, result
        outcome = self.policy.decide(row.route, result)
        if result is not None and "findings" in result:  # a model's result (not a test's)
            result = {**result, "outcome": outcome.as_json()}
        state = JobState.DONE
        if outcome.send and row.destinations:
            add_sends(session, row.id, row.destinations, result, now)
            state = JobState.SENDING
        elif row.destinations:
            logger.info(
                "job %s: results kept, not sent (%s)",
                row.id,
                outcome.held_because,
                extra={"action": "job_send_held", "job_id": row.id},
            )
        if outcome.critical:
            self._escalate(session, row, outcome, now)
        self._notify(session, row, state, result, outcome, now)
        return state, result

    def _failed(self, session: Session, row: Row[Any], error: str, now: datetime) -> None:
        """In the caller's transaction: the job (its row before) failed with ``error``; its
        ``failed`` notifications are written."""
        if row.mode != "shadow":
            values = {**row._mapping, "error": _first_line(error)}
            self._notify(session, values, JobState.FAILED, None, None, now, failed=True)

    def _notify(
        self,
        session: Session,
        row: Row[Any] | Mapping[str, Any],
        state: JobState,
        result: Mapping[str, Any] | None,
        outcome: Outcome | None,
        now: datetime,
        *,
        failed: bool = False,
    ) -> None:
        values = dict(row._mapping if isinstance(row, Row) else row)
        events = {"failed"} if failed or outcome is None else outcome.events
        notices = self.policy.notices(values["route"], events)  # type: ignore[arg-type]
        values["state"] = state.value
        add_notifications(
            session,
            values["id"],
            notices,
            lambda: job_context(session, values, result, outcome, now),
            now,
        )

    def _escalate(self, session: Session, row: Row[Any], outcome: Outcome, now: datetime) -> None:
        """A critical finding: the study's other jobs not yet running become ``stat``, so the
        rest of the study is read first (audited, "escalated", with the finding's reasons)."""
        raised = session.execute(
            update(jobs)
            .where(
                jobs.c.study_instance_uid == row.study_instance_uid,
                jobs.c.id != row.id,
                jobs.c.state.in_([JobState.WAITING.value, JobState.QUEUED.value]),
                jobs.c.priority < int(Priority.STAT),
            )
            .values(priority=int(Priority.STAT), updated_at=now)
            .returning(jobs.c.id)
        ).all()
        ids = sorted(job_id for (job_id,) in raised)
        first = outcome.critical[0]
        audit.add_event(
            session,
            audit.NODE,
            "critical",
            job_id=row.id,
            study_instance_uid=row.study_instance_uid,
            detail=f"{len(outcome.critical)} critical findings ({first.label}: "
            f"{', '.join(first.reasons)}); jobs made stat: {ids or 'none'}",
            at=now,
        )
        logger.warning(
            "job %s: %d critical findings; %d other jobs of the study made stat",
            row.id,
            len(outcome.critical),
            len(ids),
            extra={"action": "job_critical", "job_id": row.id},
        )

    # -- admin actions -----------------------------------------------------------------------------

    def cancel(
        self, job_id: int, *, actor: str | None = None, reason: str | None = None
    ) -> JobRecord:
        """Any unfinished job -> ``cancelled``. A running job's worker sees it at its next
        heartbeat and drops its result. Raises JobNotFound, or JobStateError when final.
        With ``actor``, the ``cancelled`` audit event (detail ``reason``) commits with it; the
        ``reason`` is also the job's error, so its listing says why it ended."""
        now = self.now()
        values: dict[str, Any] = {
            "state": JobState.CANCELLED.value,
            "lease_expires_at": None,
            "finished_at": now,
            "updated_at": now,
        }
        if reason:
            values["error"] = _clip(f"cancelled: {reason}")
        return self._admin_transition(
            job_id,
            allowed=lambda state: state not in FINAL_STATES and state is not JobState.REVIEW,
            refusal="only unfinished jobs can be cancelled",
            refuse=lambda state: (
                f"job {job_id} is {state}; "
                + (
                    "a job in review is ended by its reviewer: approve or reject it"
                    if state is JobState.REVIEW
                    else "only unfinished jobs can be cancelled"
                )
            ),
            values=values,
            action="job_cancelled",
            done="cancelled",
            audit_event=("cancelled", actor, reason),
        )

    def approve(self, job_id: int, *, actor: str, note: str | None = None) -> JobRecord:
        """A reviewer lets a ``review`` job's results go out, exactly as a release without
        review would have: its sends and notifications written in this transaction with the
        ``approved`` audit event (``actor``; detail ``note``), the job ``sending`` or ``done``.
        Raises JobNotFound, or JobStateError for a job not in review (approved already,
        rejected, or never held)."""
        now = self.now()
        with self._sessions.begin() as session:
            state = self._locked_state(session, job_id)
            if state is not JobState.REVIEW:
                raise JobStateError(_not_in_review(job_id, state, "approved"))
            row = session.execute(select(jobs).where(jobs.c.id == job_id)).one()
            state, result = self._release(session, row, row.result, now)
            values: dict[str, Any] = {"state": state.value, "updated_at": now}
            if result is not None:
                values["result"] = dict(result)
            session.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            audit.add_event(
                session,
                actor,
                "approved",
                job_id=job_id,
                study_instance_uid=row.study_instance_uid,
                detail=_clip_detail(f"results released ({state})" + (f": {note}" if note else "")),
                at=now,
            )
            row = session.execute(select(jobs).where(jobs.c.id == job_id)).one()
        logger.info(
            "job %s approved by %s: %s",
            job_id,
            actor,
            state,
            extra={"action": "job_approved", "job_id": job_id},
        )
        return JobRecord.from_row(row)

    def reject(self, job_id: int, *, actor: str, reason: str) -> JobRecord:
        """A reviewer refuses a ``review`` job's results: ``rejected``, nothing sent and no one
        notified, the results kept; ``reason`` (required) is the job's error and the detail of
        the ``rejected`` audit event (``actor``). Raises ValueError for a blank reason,
        JobNotFound, or JobStateError for a job not in review."""
        reason = " ".join(reason.split())
        if not reason:
            raise ValueError("a rejection needs a reason (what is wrong with the results)")
        now = self.now()
        return self._admin_transition(
            job_id,
            allowed=lambda state: state is JobState.REVIEW,
            refusal="only a job in review can be rejected",
            values={
                "state": JobState.REJECTED.value,
                "error": _clip(f"rejected: {reason}"),
                "updated_at": now,
            },
            action="job_rejected",
            done="rejected by review",
            audit_event=("rejected", actor, _clip_detail(reason)),
            refuse=lambda state: _not_in_review(job_id, state, "rejected"),
        )

    def retry(self, job_id: int, *, actor: str | None = None) -> JobRecord:
        """A failed or cancelled job -> ``queued`` now, with its attempts reset and its error
        cleared. Raises JobNotFound, or JobStateError for any other state.
        With ``actor``, the ``retried`` audit event commits with it."""
        now = self.now()
        return self._admin_transition(
            job_id,
            allowed=lambda state: state in (JobState.FAILED, JobState.CANCELLED),
            refusal="only failed or cancelled jobs can be retried",
            values={
                "state": JobState.QUEUED.value,
                "attempts": 0,
                "error": None,
                "result": None,
                "run_after": now,
                "queued_at": now,
                "completed_at": func.coalesce(jobs.c.completed_at, now),
                "lease_owner": None,
                "lease_expires_at": None,
                "started_at": None,
                "finished_at": None,
                "sent_at": None,
                "updated_at": now,
            },
            action="job_retried",
            done="queued again by retry",
            audit_event=("retried", actor, None),
        )

    def _admin_transition(
        self,
        job_id: int,
        *,
        allowed: Callable[[JobState], bool],
        refusal: str,
        values: dict[str, Any],
        action: str,
        done: str,
        audit_event: tuple[str, str | None, str | None] = ("", None, None),
        refuse: Callable[[JobState], str] | None = None,
    ) -> JobRecord:
        """An admin's change of one job's state, decided under the row's lock; the audit
        event (action, actor, detail) commits with it when it names an actor. ``refuse``
        words the refusal for the state found (default: the state and ``refusal``)."""
        with self._sessions.begin() as session:
            state = self._locked_state(session, job_id)
            if not allowed(state):
                raise JobStateError(
                    refuse(state) if refuse else f"job {job_id} is {state}; {refusal}"
                )
            session.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            row = session.execute(select(jobs).where(jobs.c.id == job_id)).one()
            audit_action, actor, detail = audit_event
            if actor is not None:
                audit.add_event(
                    session,
                    actor,
                    audit_action,
                    job_id=job_id,
                    study_instance_uid=row.study_instance_uid,
                    detail=detail or f"was {state}",
                    at=self.now(),
                )
        logger.info(
            "job %s %s (was %s)", job_id, done, state, extra={"action": action, "job_id": job_id}
        )
        return JobRecord.from_row(row)

    def _locked_state(self, session: Session, job_id: int) -> JobState:
        state = session.execute(
            select(jobs.c.state).where(jobs.c.id == job_id).with_for_update()
        ).scalar()
        if state is None:
            raise JobNotFound(f"no job {job_id}")
        return JobState(state)

    # -- periodic work -----------------------------------------------------------------------------

    def reap_expired_leases(self, now: datetime | None = None) -> list[int]:
        """Running jobs whose lease expired (their worker died or hung) go back to the queue,
        or fail when their attempts are used up. Returns their ids."""
        now = (now or self.now()).astimezone(UTC)
        expired = (
            jobs.c.state == JobState.RUNNING.value,
            jobs.c.lease_expires_at < now,
        )
        common = {"error": LEASE_EXPIRED, "lease_expires_at": None, "updated_at": now}
        with self._sessions.begin() as session:
            requeued = session.execute(
                update(jobs)
                .where(*expired, jobs.c.attempts < jobs.c.max_attempts)
                .values(state=JobState.QUEUED.value, run_after=now, **common)
                .returning(jobs.c.id, jobs.c.lease_owner)
            ).all()
            failed = session.execute(
                update(jobs)
                .where(*expired)
                .values(state=JobState.FAILED.value, finished_at=now, **common)
                .returning(*jobs.c)
            ).all()
            for row in failed:
                self._failed(session, row, LEASE_EXPIRED, now)
        for job_id, owner in requeued:
            logger.warning(
                "job %s queued again: %s stopped renewing its lease",
                job_id,
                owner,
                extra={"action": "job_lease_expired", "job_id": job_id, "worker_id": owner},
            )
        for job_id, owner in ((row.id, row.lease_owner) for row in failed):
            logger.error(
                "job %s failed: %s stopped renewing its lease on the last attempt",
                job_id,
                owner,
                extra={"action": "job_failed", "job_id": job_id, "worker_id": owner},
            )
        return sorted([*(job_id for job_id, _ in requeued), *(row.id for row in failed)])

    def purge(self, older_than: datetime) -> int:
        """Delete finished jobs (done, failed, cancelled, skipped) last changed before
        ``older_than``; never an unfinished one. Returns how many, deleted in short batches."""
        older_than = older_than.astimezone(UTC)
        final = [s.value for s in FINAL_STATES]
        total = 0
        while True:
            owed = (
                select(notifications.c.id)
                .where(notifications.c.job_id == jobs.c.id, notifications.c.state == PENDING)
                .exists()
            )
            batch = (
                select(jobs.c.id)
                .where(jobs.c.state.in_(final), jobs.c.updated_at < older_than, ~owed)
                .limit(_PURGE_BATCH)
                .scalar_subquery()
            )
            with self._sessions.begin() as session:
                deleted = rowcount(session, delete(jobs).where(jobs.c.id.in_(batch)))
            total += deleted
            if deleted < _PURGE_BATCH:
                break
        if total:
            logger.info(
                "%d finished jobs older than %s purged",
                total,
                older_than.isoformat(timespec="seconds"),
                extra={"action": "jobs_purged"},
            )
        return total

    # -- reads -------------------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord | None:
        with self._sessions() as session:
            row = session.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return JobRecord.from_row(row) if row is not None else None

    def list(
        self, where: JobFilter = EVERY_JOB, *, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """Jobs matching ``where``, newest first."""
        query = select(jobs).where(*where.clauses()).order_by(jobs.c.id.desc())
        with self._sessions() as session:
            rows = session.execute(query.limit(limit).offset(offset)).all()
        return [JobRecord.from_row(row) for row in rows]

    def count(self, where: JobFilter = EVERY_JOB) -> int:
        """How many jobs :meth:`list` would page through with the same filter."""
        query = select(func.count()).select_from(jobs).where(*where.clauses())
        with self._sessions() as session:
            return int(session.scalar(query) or 0)

    def counts_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state, zeros included)."""
        with self._sessions() as session:
            rows = session.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        counts = dict.fromkeys(JobState, 0)
        for state, count in rows:
            counts[JobState(state)] = count
        return counts


def _clip(error: str | None) -> str | None:
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return error[: MAX_ERROR_CHARS - 20] + " ... (truncated)"


def _not_in_review(job_id: int, state: JobState, verb: str) -> str:
    """Why a job in ``state`` cannot be approved or rejected (``verb``), in words."""
    why = {
        JobState.SENDING: "its results were released already (approved, or never held)",
        JobState.DONE: "its results were released already (approved, or never held)",
        JobState.REJECTED: "a reviewer rejected it; a rejected job sends nothing",
    }.get(state, "its results are not waiting for review")
    return f"job {job_id} is {state}: only a job in review can be {verb}; {why}"


def _clip_detail(text: str) -> str:
    """An audit detail: at most 500 characters."""
    return text if len(text) <= 500 else text[:480] + " ... (truncated)"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:300]
