"""The notification queue in the database (the ``notifications`` table): one row per message
owed to a ``[[notifications]]`` target about a job's outcome.

Rows are written in the transaction that records the outcome (:func:`add_notifications`,
called by :class:`dicomnode.queue.repository.JobRepository` where a run's results are released
or a job fails), so a crash loses none. Each row holds the outcome as it was then (its
``context``: the job, the study, the findings), and a ``delivery_key`` made once: every attempt
sends the same message under the same key (the HL7 message control id, the FHIR identifier,
the webhook's Idempotency-Key), so a peer that got a message whose confirmation was lost (a
crash between its answer and our commit) can tell the retry for what it is. Claims, backoff
and the dead letter are the send queue's (:mod:`dicomnode.queue.delivery`); each delivery and
each message given up is audited in the transaction that marks it.

The context holds patient attributes (the RIS needs them to file the result): it stays in the
database, like the index, and no log line or listing quotes it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Row, Table, event, func, select, update
from sqlalchemy.orm import Session

from dicomnode.db.models import Job, Notification, Patient, Series, Study
from dicomnode.queue import delivery
from dicomnode.queue.delivery import DEAD, PENDING, SENT, Outbox, Wakers
from dicomnode.queue.outcomes import Notice, Outcome, findings_of, positive

logger = logging.getLogger(__name__)

notifications = cast(Table, Notification.__table__)
jobs = cast(Table, Job.__table__)

#: the delivery key's length: 20 characters, the most an HL7 v2.5 message control id holds
KEY_CHARS = 20
#: what the context keeps of each result object: enough to point at it in the PACS
OBJECT_KEYS = ("kind", "sop_class_uid", "sop_instance_uid", "series_instance_uid")


def new_key() -> str:
    """A delivery key: 80 random bits as 20 hex digits."""
    return secrets.token_hex(KEY_CHARS // 2)


@dataclass(frozen=True)
class NotificationRecord:
    """One row of the notifications table, as values."""

    id: int
    job_id: int
    notification: str
    kind: str
    event: str
    delivery_key: str
    context: dict[str, Any]
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> NotificationRecord:
        return cls(**{f.name: row._mapping[f.name] for f in fields(cls)})


# -- the outcome, as the message will tell it ---------------------------------------------------


def job_context(
    session: Session,
    job: Mapping[str, Any],
    result: Mapping[str, Any] | None,
    outcome: Outcome | None,
    at: datetime,
) -> dict[str, Any]:
    """The outcome of ``job`` (its row's values) as of ``at``: the job, its study's
    attributes from the index, the model, each finding with whether it is positive and
    critical (and why), and where the results go. Read in the caller's transaction."""
    study = session.execute(
        select(
            Study.accession_number,
            Study.study_date,
            Study.study_time,
            Study.study_description,
            Study.referring_physician_name,
            Patient.patient_id,
            Patient.issuer_of_patient_id,
            Patient.patient_name,
            Patient.birth_date,
            Patient.sex,
        )
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Study.study_instance_uid == job["study_instance_uid"])
    ).first()
    series = [s for s in (job.get("inputs") or ()) if s] or [job.get("series_instance_uid")]
    modalities = sorted(
        set(
            session.scalars(
                select(Series.modality).where(Series.series_instance_uid.in_(series))
            ).all()
        )
        - {""}
    )
    critical = {c.index: list(c.reasons) for c in (outcome.critical if outcome else ())}
    findings = [
        {**dict(f), "positive": positive(f), "critical": i in critical,
         "critical_reasons": critical.get(i, [])}
        for i, f in enumerate(findings_of(result))
    ]  # fmt: skip
    values = dict(study._mapping) if study is not None else {}
    result = result or {}
    envelope = result.get("envelope")
    return {
        "at": at.astimezone(UTC).isoformat(),
        "job": {
            "id": job["id"],
            "route": job["route"],
            "model": job["model"],
            "state": job["state"],
            "error": job.get("error"),
            "attempts": job.get("attempts"),
            "study_instance_uid": job["study_instance_uid"],
            "series_instance_uid": job.get("series_instance_uid"),
            "inputs": list(job.get("inputs") or ()),
        },
        "study": {
            "accession_number": values.get("accession_number", ""),
            "study_date": values.get("study_date", ""),
            "study_time": values.get("study_time", ""),
            "study_description": values.get("study_description", ""),
            "referring_physician_name": values.get("referring_physician_name", ""),
            "patient_id": values.get("patient_id", ""),
            "issuer_of_patient_id": values.get("issuer_of_patient_id", ""),
            "patient_name": values.get("patient_name", ""),
            "patient_birth_date": values.get("birth_date", ""),
            "patient_sex": values.get("sex", ""),
            "modalities": modalities,
        },
        "result": {
            "model": result.get("model", job["model"]),
            "version": result.get("version", ""),
            "demo": bool(result.get("demo", False)),
            "envelope_inside": envelope.get("inside") if isinstance(envelope, Mapping) else None,
            "objects": [
                {k: o.get(k, "") for k in OBJECT_KEYS}
                for o in result.get("objects") or ()
                if isinstance(o, Mapping)
            ],
        },
        "findings": findings,
        "outcome": outcome.as_json() if outcome is not None else None,
    }


# -- writing rows, in the transaction of the outcome ----------------------------------------------

#: the deliverers of this process to wake when notifications are added
_wakers = Wakers()
listen, unlisten, _notify = _wakers.listen, _wakers.unlisten, _wakers.wake


def add_notifications(
    session: Session,
    job_id: int,
    notices: Sequence[Notice],
    context: Callable[[], dict[str, Any]],
    now: datetime,
) -> int:
    """In the caller's transaction: one pending row per notice, each with the outcome's
    ``context()`` (read once, only when there is a notice) and a delivery key of its own.
    The notifiers of this process are woken when the transaction commits."""
    if not notices:
        return 0
    values = context()
    rows = [
        {
            "job_id": job_id,
            "notification": notice.name,
            "kind": notice.kind,
            "event": notice.event,
            "delivery_key": new_key(),
            "context": {**values, "event": notice.event},
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "last_error": None,
            "created_at": now,
            "sent_at": None,
            "updated_at": now,
        }
        for notice in notices
    ]
    session.execute(notifications.insert(), rows)
    event.listen(session, "after_commit", _notify, once=True)
    logger.info(
        "job %s: %s",
        job_id,
        ", ".join(f"{n.event} to {n.name}" for n in notices),
        extra={"action": "notifications_queued", "job_id": job_id},
    )
    return len(rows)


class NotificationQueue(Outbox):
    """The notifications table. ``sessions`` is the node's session factory."""

    def claim(self, name: str, limit: int, lease_s: float) -> list[NotificationRecord]:
        """Take up to ``limit`` due pending rows of the notification ``name``, oldest due
        first, and hold them for ``lease_s``."""
        now = self.now()
        candidates = delivery.due(
            notifications, now, notifications.c.notification == name, limit=limit
        )
        with self._sessions.begin() as session:
            rows = delivery.claim(
                session,
                notifications,
                candidates,
                lease_s=lease_s,
                now=now,
                dialect=self._dialect,
            )
        return sorted((NotificationRecord.from_row(r) for r in rows), key=lambda r: r.id)

    def mark_sent(self, record: NotificationRecord, detail: str) -> bool:
        """The peer confirmed the message: ``sent``, with its audit event ("notified", by the
        node) in the same transaction. False when the row was no longer pending (another
        notifier marked it)."""
        from dicomnode.audit import NODE, add_event

        now = self.now()
        with self._sessions.begin() as session:
            changed = session.execute(
                update(notifications)
                .where(notifications.c.id == record.id, notifications.c.state == PENDING)
                .values(state=SENT, sent_at=now, last_error=None, updated_at=now)
                .returning(notifications.c.id)
            ).first()
            if changed is not None:
                add_event(
                    session,
                    NODE,
                    "notified",
                    job_id=record.job_id,
                    study_instance_uid=record.context.get("job", {}).get("study_instance_uid"),
                    detail=f"{record.event} to {record.notification} ({record.kind}): {detail}",
                    at=now,
                )
        return changed is not None

    def mark_failed(
        self,
        record: NotificationRecord,
        error: str,
        *,
        max_attempts: int,
        backoff: Callable[[int], float],
    ) -> str | None:
        """A failed attempt: due again after ``backoff(attempts)``, or ``dead`` once
        ``max_attempts`` are used (audited, "notify_failed"). Returns the new state (None: the
        row was no longer pending)."""
        from dicomnode.audit import NODE, add_event

        now = self.now()
        with self._sessions.begin() as session:
            states = delivery.count_failures(
                session,
                notifications,
                {record.id: error},
                max_attempts=max_attempts,
                backoff=backoff,
                now=now,
            )
            state = states.get(record.id)
            if state == DEAD:
                add_event(
                    session,
                    NODE,
                    "notify_failed",
                    job_id=record.job_id,
                    study_instance_uid=record.context.get("job", {}).get("study_instance_uid"),
                    detail=f"{record.event} to {record.notification} ({record.kind}) given up "
                    f"after {record.attempts + 1} attempts: {delivery.clip(error)[:300]}",
                    at=now,
                )
        return state

    # -- reads -------------------------------------------------------------------------------

    def for_job(self, job_id: int) -> list[NotificationRecord]:
        with self._sessions() as session:
            rows = session.execute(
                select(notifications)
                .where(notifications.c.job_id == job_id)
                .order_by(notifications.c.id)
            ).all()
        return [NotificationRecord.from_row(row) for row in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """How many rows each (notification, state) has."""
        with self._sessions() as session:
            rows = session.execute(
                select(notifications.c.notification, notifications.c.state, func.count()).group_by(
                    notifications.c.notification, notifications.c.state
                )
            ).all()
        return {(name, state): int(n) for name, state, n in rows}

    def pending_names(self) -> Iterable[str]:
        """The notifications with pending rows."""
        return sorted({name for (name, state) in self.counts() if state == PENDING})
