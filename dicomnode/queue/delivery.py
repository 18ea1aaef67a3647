"""What the node's durable outboxes share: the send queue (``sends``) and the notification
queue (``notifications``). A row is ``pending`` until its peer confirmed it (``sent``) or its
attempts ran out (``dead``, the dead letter).

A sender claims a target's due rows under a lease written into ``next_attempt_at``: a claimed
row is not due again until the lease ends, so a sender that dies mid-delivery leaves rows that
another sender (or its own restart) takes up later. On PostgreSQL the claim is one
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)``; on SQLite it runs inside the
``BEGIN IMMEDIATE`` transaction every write takes. A failed attempt makes the row due again
after an exponential backoff, or dead once the target's ``max_attempts`` are used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Row, Select, Table, select, update
from sqlalchemy.orm import Session, sessionmaker

PENDING, SENT, DEAD = "pending", "sent", "dead"
#: Longest error text kept on a row.
MAX_ERROR_CHARS = 2000


def utc_now() -> datetime:
    return datetime.now(UTC)


class Outbox:
    """An outbox table's access: the node's session factory, the clock (injected by tests)
    and the database dialect the claim is written for."""

    def __init__(
        self, sessions: sessionmaker[Session], *, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        bind = sessions.kw.get("bind")
        self._dialect = bind.dialect.name if bind is not None else ""

    def now(self) -> datetime:
        return self._clock().astimezone(UTC)


#: the longest wait before trying an outbox again after it failed (its database unreachable)
MAX_ERROR_WAIT_S = 30.0


class Channel(Protocol):
    """One target's delivery thread state: when it may try again after a failed connection,
    and the event that new rows for it set."""

    blocked_until: float  # time.monotonic()
    wake: threading.Event


def run_channel(
    name: str,
    channel: Channel,
    deliver_once: Callable[[str], Any],
    *,
    stop: threading.Event,
    poll_s: float,
    what: str,
    action: str,
    log: logging.Logger,
) -> None:
    """Deliver ``name``'s due rows until ``stop``: each round once (``deliver_once``, truthy
    when it took rows), then waits for new rows or the next poll; waits out a blocked target;
    backs off (doubling, up to :data:`MAX_ERROR_WAIT_S`) while the outbox itself fails."""
    errors = 0
    while not stop.is_set():
        wait = channel.blocked_until - time.monotonic()
        if wait > 0:
            channel.wake.clear()
            stop.wait(min(wait, 5.0))
            continue
        channel.wake.clear()  # rows committed from here on wake the wait below
        try:
            took = deliver_once(name)
            errors = 0
        except Exception:
            errors += 1
            wait = min(MAX_ERROR_WAIT_S, poll_s * 2**errors)
            log.exception(
                "%s: %s unavailable, trying again in %.1f s",
                name,
                what,
                wait,
                extra={"action": action},
            )
            stop.wait(wait)
            continue
        if not took:
            channel.wake.wait(poll_s)  # new rows in this process, or the next poll


class Wakers:
    """The events of one outbox's deliverers in this process, set when new rows commit: a job's
    end wakes its sender or notifier at once instead of at its next poll."""

    def __init__(self) -> None:
        self._events: set[threading.Event] = set()
        self._lock = threading.Lock()

    def listen(self, event: threading.Event) -> None:
        """Set ``event`` whenever rows are added in this process."""
        with self._lock:
            self._events.add(event)

    def unlisten(self, event: threading.Event) -> None:
        with self._lock:
            self._events.discard(event)

    def wake(self, _session: Session | None = None) -> None:
        """Set every listening event (also as an ``after_commit`` hook)."""
        with self._lock:
            for event in self._events:
                event.set()


class RetryPolicy(Protocol):
    """A target's retry settings (a destination's, a notification's)."""

    @property
    def max_attempts(self) -> int: ...

    @property
    def backoff_s(self) -> float: ...

    @property
    def max_backoff_s(self) -> float: ...


def backoff_s(policy: RetryPolicy, attempts: int) -> float:
    """The wait after the ``attempts``-th failed attempt: backoff_s, doubling, capped."""
    return min(policy.max_backoff_s, policy.backoff_s * 2 ** min(max(attempts - 1, 0), 30))


def due(table: Table, now: datetime, *conditions: ColumnElement[bool], limit: int) -> Select[Any]:
    """The ids of ``table``'s pending rows due at ``now`` that meet ``conditions``, oldest due
    first (the candidates of :func:`claim`)."""
    return (
        select(table.c.id)
        .where(table.c.state == PENDING, table.c.next_attempt_at <= now, *conditions)
        .order_by(table.c.next_attempt_at, table.c.id)
        .limit(limit)
    )


def claim(
    session: Session,
    table: Table,
    candidates: Select[Any],
    *,
    lease_s: float,
    now: datetime,
    dialect: str,
) -> Sequence[Row[Any]]:
    """In the caller's transaction: hold the ``candidates`` (see :func:`due`) for ``lease_s``
    and return their rows; rows another claimer holds are skipped (PostgreSQL) or were
    serialised before (SQLite)."""
    if dialect == "postgresql":
        candidates = candidates.with_for_update(of=table, skip_locked=True)
    statement = (
        update(table)
        .where(table.c.id.in_(candidates.scalar_subquery()), table.c.state == PENDING)
        .values(next_attempt_at=now + timedelta(seconds=lease_s), updated_at=now)
        .returning(*table.c)
    )
    return session.execute(statement).all()


def count_failures(
    session: Session,
    table: Table,
    failures: Mapping[int, str],
    *,
    max_attempts: int,
    backoff: Callable[[int], float],
    now: datetime,
) -> dict[int, str]:
    """In the caller's transaction: a failed attempt on each pending row (id -> error), due
    again after ``backoff(attempts)`` seconds, or ``dead`` once ``max_attempts`` are used.
    Returns id -> new state."""
    states: dict[int, str] = {}
    rows = session.execute(
        select(table.c.id, table.c.attempts).where(
            table.c.id.in_(list(failures)), table.c.state == PENDING
        )
    ).all()
    for row_id, attempts in rows:
        attempts += 1
        dead = attempts >= max_attempts
        session.execute(
            update(table)
            .where(table.c.id == row_id)
            .values(
                state=DEAD if dead else PENDING,
                attempts=attempts,
                last_error=clip(failures[row_id]),
                next_attempt_at=None if dead else now + timedelta(seconds=backoff(attempts)),
                updated_at=now,
            )
        )
        states[row_id] = DEAD if dead else PENDING
    return states


def clip(error: str) -> str:
    """An error short enough to keep on a row."""
    if len(error) <= MAX_ERROR_CHARS:
        return error
    return error[: MAX_ERROR_CHARS - 16] + " ... (truncated)"
