"""The audit trail: who did what to which job, and when (the ``audit_events`` table).

Actors are strings a reviewer can read back: ``aet:<calling AE>@<host>`` for a DICOM peer,
``token:<name>`` for an API client, ``cli:<OS user>`` for the command line, ``node`` for the
node's own decisions. Events never hold patient data: the detail is a count or a reason, the
study is named by its UID only, and the ``dicomnode.audit`` log line at INFO names neither.

Recording an event never fails the action it records (that already happened): a row that
cannot be written is logged at ERROR and :func:`record_event` returns False.
"""

from __future__ import annotations

import getpass
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import AuditEvent

logger = logging.getLogger("dicomnode.audit")

#: The node's own decisions (routing, superseding, retries by the queue).
NODE = "node"


@dataclass(frozen=True)
class AuditRecord:
    """One audit event as read back."""

    id: int
    at: datetime
    actor: str
    action: str
    job_id: int | None
    study_instance_uid: str | None
    detail: str | None


def aet_actor(calling_aet: str, host: str) -> str:
    """The actor of a DICOM peer: ``aet:CT1@10.0.0.5``."""
    return f"aet:{calling_aet.strip()}@{host}"


def token_actor(name: str) -> str:
    """The actor of an API client, by the name of its token."""
    return f"token:{name}"


def cli_actor() -> str:
    """The actor of a command typed at this host: the OS user running it."""
    try:
        user = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        user = "unknown"
    return f"cli:{user}"


def add_event(
    session: Session,
    actor: str,
    action: str,
    *,
    job_id: int | None = None,
    study_instance_uid: str | None = None,
    detail: str | None = None,
    at: datetime | None = None,
) -> None:
    """Add an event to the caller's transaction, so it commits (or not) with the action.

    The receiver uses this to write the association's end and its audit row in one commit.
    """
    session.add(
        AuditEvent(
            at=at or datetime.now(UTC),
            actor=actor[:128],
            action=action[:32],
            job_id=job_id,
            study_instance_uid=study_instance_uid,
            detail=detail,
        )
    )
    _log(actor, action, job_id, detail)


def record_event(
    sessions: sessionmaker[Session],
    actor: str,
    action: str,
    *,
    job_id: int | None = None,
    study_instance_uid: str | None = None,
    detail: str | None = None,
) -> bool:
    """Write one audit event in a transaction of its own; False (and an ERROR log) on failure."""
    try:
        with sessions.begin() as session:
            add_event(
                session,
                actor,
                action,
                job_id=job_id,
                study_instance_uid=study_instance_uid,
                detail=detail,
            )
    except Exception:
        logger.exception(
            "Could not record audit event %s by %s",
            action,
            actor,
            extra={"action": "audit_failed", "job_id": job_id},
        )
        return False
    return True


def list_events(
    session: Session,
    *,
    job_id: int | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditRecord], int]:
    """Events, newest first, with the total that match the filters (for pagination)."""
    where = []
    if job_id is not None:
        where.append(AuditEvent.job_id == job_id)
    if action is not None:
        where.append(AuditEvent.action == action)
    if actor is not None:
        where.append(AuditEvent.actor == actor)
    if since is not None:
        where.append(AuditEvent.at >= since)
    total = session.scalar(select(func.count()).select_from(AuditEvent).where(*where)) or 0
    rows = session.scalars(
        select(AuditEvent)
        .where(*where)
        .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [
        AuditRecord(
            id=row.id,
            at=row.at,
            actor=row.actor,
            action=row.action,
            job_id=row.job_id,
            study_instance_uid=row.study_instance_uid,
            detail=row.detail,
        )
        for row in rows
    ], int(total)


def _log(actor: str, action: str, job_id: int | None, detail: str | None) -> None:
    logger.info(
        "%s by %s%s%s",
        action,
        actor,
        f" job {job_id}" if job_id is not None else "",
        f": {detail}" if detail else "",
        extra={"action": action, "job_id": job_id},
    )
