"""The notifier: delivers the notification queue to the ``[[notifications]]`` targets.

Each target has a thread of its own, so a RIS that hangs never holds up a webhook. The thread
claims the target's next due message (:class:`~dicomnode.queue.notifications.NotificationQueue`,
under a lease longer than two timeouts), builds it from the row's context with the target's
protocol and delivers it: ``sent`` (audited, "notified") when the peer took it, else a failed
attempt, due again after the backoff or ``dead`` after ``max_attempts`` (audited,
"notify_failed"), as sends are. A peer that could not be reached (or did not answer) also makes
the thread wait out the backoff before its next message. The thread wakes when a job in this
process commits new notifications, else polls every ``poll_s``.

A message is built anew for each attempt from the same context and delivery id, so it is the
same message; a crash after the peer took it but before ``sent`` committed sends it once more
when the lease ends, under the same delivery id for the peer to recognise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import NotificationRefused, NotifyError
from dicomnode.queue import notifications as notification_queue
from dicomnode.queue.delivery import DEAD, backoff_s, run_channel, utc_now
from dicomnode.queue.notifications import NotificationQueue, NotificationRecord

if TYPE_CHECKING:
    import ssl

    from dicomnode.config import NotificationSettings

logger = logging.getLogger(__name__)

#: a claimed message is held this much longer than two timeouts (its build and its exchange)
LEASE_MARGIN_S = 10.0
#: the longest wait after the database could not be reached


@dataclass
class _Channel:
    settings: NotificationSettings
    blocked_until: float = 0.0  # time.monotonic()
    thread: threading.Thread | None = None
    wake: threading.Event = field(default_factory=threading.Event)


def deliver(
    settings: NotificationSettings,
    record: NotificationRecord,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """Build and deliver one message with the target's protocol; what the peer answered
    (NotifyError when it did not take it)."""
    context = record.context
    if settings.kind == "hl7":
        from dicomnode.notify import hl7

        return hl7.deliver(settings, context, record.delivery_key, ssl_context)
    if settings.kind == "fhir":
        from dicomnode.notify import fhir

        return fhir.deliver(settings, context, record.delivery_key)
    from dicomnode.notify import webhook

    return webhook.deliver(settings, context, record.delivery_key)


def warm(kind: str) -> None:
    """Import a protocol's libraries before its first message (hl7apy's structures, httpx,
    fhir.resources' models: a tenth of a second and more), so that message is not the slower."""
    if kind == "hl7":
        from hl7apy.core import Message

        Message("ORU_R01", version="2.5")
    else:
        import httpx  # noqa: F401
    if kind == "fhir":
        from fhir.resources.R4B.bundle import Bundle  # noqa: F401


class Notifier:
    """Delivers the notification queue of every configured target until stopped."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        targets: Sequence[NotificationSettings],
        *,
        poll_s: float = 0.5,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.queue = NotificationQueue(sessions, clock=clock)
        self.poll_s = poll_s
        self.channels = {t.name: _Channel(t) for t in targets}
        self._ssl: dict[str, ssl.SSLContext | None] = {}
        self._stop = threading.Event()

    def deliver_once(self, name: str) -> int:
        """Claim and deliver ``name``'s next due message; how many it took (0 or 1)."""
        channel = self.channels[name]
        settings = channel.settings
        claimed = self.queue.claim(name, 1, 2 * settings.timeout_s + LEASE_MARGIN_S)
        for record in claimed:
            started = time.perf_counter()
            try:
                answer = deliver(settings, record, self._ssl_context(settings))
            except NotifyError as exc:
                self._failed(
                    channel, record, str(exc), reached=isinstance(exc, NotificationRefused)
                )
                continue
            except Exception as exc:  # a bug or a library's surprise: counted, never lost
                logger.debug("%s: delivery raised", name, exc_info=True)
                self._failed(channel, record, f"{type(exc).__name__}: {exc}", reached=False)
                continue
            self.queue.mark_sent(record, answer)
            logger.info(
                "%s: %s of job %s delivered in %.3f s (%s, attempt %d)",
                name,
                record.event,
                record.job_id,
                time.perf_counter() - started,
                answer,
                record.attempts + 1,
                extra={"action": "notification_sent", "job_id": record.job_id},
            )
        return len(claimed)

    def _failed(
        self, channel: _Channel, record: NotificationRecord, error: str, *, reached: bool
    ) -> None:
        settings = channel.settings
        state = self.queue.mark_failed(
            record,
            error,
            max_attempts=settings.max_attempts,
            backoff=lambda attempts: backoff_s(settings, attempts),
        )
        extra = {"action": "notification_dead" if state == DEAD else "notification_failed",
                 "job_id": record.job_id}  # fmt: skip
        wait = backoff_s(settings, record.attempts + 1)
        if state == DEAD:
            logger.error(
                "%s: %s of job %s given up after %d attempts: %s",
                settings.name, record.event, record.job_id, record.attempts + 1, error,
                extra=extra,
            )  # fmt: skip
        else:
            logger.warning(
                "%s: %s of job %s not delivered (attempt %d), retried in %.0f s: %s",
                settings.name, record.event, record.job_id, record.attempts + 1, wait, error,
                extra=extra,
            )  # fmt: skip
        if not reached:  # the peer is down or silent: its other messages wait as well
            channel.blocked_until = time.monotonic() + wait

    def _ssl_context(self, settings: NotificationSettings) -> ssl.SSLContext | None:
        if settings.kind != "hl7" or not settings.tls.enabled:
            return None
        if settings.name not in self._ssl:
            from dicomnode.receive.tls import client_context

            tls = settings.tls
            self._ssl[settings.name] = client_context(
                ca=str(tls.ca) if tls.ca else None,
                cert=str(tls.cert) if tls.cert else None,
                key=str(tls.key) if tls.key else None,
            )
        return self._ssl[settings.name]

    # -- threads -------------------------------------------------------------------------------

    def start(self) -> None:
        """One daemon thread per target."""
        self._stop.clear()
        for name, channel in self.channels.items():
            notification_queue.listen(channel.wake)
            channel.thread = threading.Thread(
                target=self._run, args=(name,), name=f"notify-{name}", daemon=True
            )
            channel.thread.start()
        unserved = [n for n in self.queue.pending_names() if n not in self.channels]
        if unserved:
            logger.warning(
                "notifications wait for %s, which no [[notifications]] entry names here",
                ", ".join(unserved),
                extra={"action": "notification_unserved"},
            )
        logger.info(
            "notifier started: %s",
            ", ".join(self.channels) or "no notifications",
            extra={"action": "notifier_started"},
        )

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the message in hand (marked before its thread ends)."""
        self._stop.set()
        for channel in self.channels.values():
            notification_queue.unlisten(channel.wake)
            channel.wake.set()
        for channel in self.channels.values():
            if channel.thread is not None:
                channel.thread.join(timeout)

    def _run(self, name: str) -> None:
        channel = self.channels[name]
        warm(channel.settings.kind)
        run_channel(
            name, channel, self.deliver_once,
            stop=self._stop, poll_s=self.poll_s,
            what="notification queue", action="notifier_error", log=logger,
        )  # fmt: skip
