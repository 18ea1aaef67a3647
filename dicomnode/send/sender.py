"""The sender: delivers the send queue to the configured destinations.

Each destination has a thread of its own, so a destination that is down or slow never holds up
another. The thread claims a batch of the destination's due rows, sends them in one association
(C-STORE) or one request (STOW-RS), and marks each row sent, or failed: due again after an
exponential backoff, or ``dead`` once the destination's ``max_attempts`` are used. When the
destination cannot be reached at all, its thread also waits out the backoff before it tries the
next rows. A further thread settles jobs: a ``sending`` job with nothing pending becomes ``done``
(every row sent) or ``failed`` (with an error naming each destination that gave up, and why).

A destination's thread wakes when a job in this process commits new sends (a worker embedded in
``serve``), else polls every ``poll_s``. Each job whose objects all reached a destination gets one
audit event ("sent", by the node). Several ``serve`` processes may share one database: claims are
atomic and leased (see :mod:`dicomnode.queue.sends`); rows a process held when it died are due
again when their lease (the longer of MIN_CLAIM_LEASE_S and four timeouts) ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from dicomnode import audit
from dicomnode.errors import ConfigError, SendError
from dicomnode.queue import sends as send_queue
from dicomnode.queue.delivery import backoff_s, run_channel, utc_now
from dicomnode.queue.sends import DEAD, PENDING, SendQueue, SendRecord

if TYPE_CHECKING:
    import ssl

    from dicomnode.config import DestinationSettings
    from dicomnode.queue.repository import JobRepository
    from dicomnode.send.scu import Destination

logger = logging.getLogger(__name__)

#: How long a claimed row is held before another sender may take it: longer than any send.
MIN_CLAIM_LEASE_S = 300.0
#: How often the settle thread looks for jobs whose sends are over.
SETTLE_EVERY_S = 1.0
#: How often pending sends to a destination not configured here are logged.
UNSERVED_WARNING_S = 300.0


@dataclass
class _Channel:
    """One destination's thread and, after a failed connection, when it may try again."""

    settings: DestinationSettings
    blocked_until: float = 0.0  # time.monotonic()
    thread: threading.Thread | None = None
    wake: threading.Event = field(default_factory=threading.Event)


class Sender:
    """Delivers the send queue of every configured destination until stopped."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        jobs: JobRepository,
        destinations: Sequence[DestinationSettings],
        storage_dir: Path,
        *,
        calling_aet: str = "DICOMNODE",
        poll_s: float = 0.5,
        settle_s: float = SETTLE_EVERY_S,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.sessions = sessions
        self.queue = SendQueue(sessions, clock=clock)
        self.jobs = jobs
        self.storage_dir = Path(storage_dir)
        self.calling_aet = calling_aet
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.channels = {d.name: _Channel(d) for d in destinations}
        self._ssl: dict[str, ssl.SSLContext | None] = {}
        self._stop = threading.Event()
        self._settler: threading.Thread | None = None
        self._next_unserved_check = 0.0

    # -- one step, used by the threads (and by tests that step by hand) ------------------------

    def send_once(self, name: str) -> int:
        """Claim and deliver one batch of ``name``'s due rows; returns how many rows it took."""
        channel = self.channels.get(name)
        if channel is None:
            raise ConfigError(f"no destination {name!r} is configured")
        settings = channel.settings
        lease = max(MIN_CLAIM_LEASE_S, 4 * settings.timeout_s)
        rows = self.queue.claim(name, settings.batch, lease)
        if not rows:
            return 0
        sent: list[int] = []
        failed: dict[int, str] = {}
        unreachable = ""
        for target, group in self._targets(settings, rows).items():
            started = time.perf_counter()
            try:
                errors = self._deliver(settings, target, group)
            except SendError as exc:  # not reachable, or the whole request refused
                unreachable = str(exc)
                errors = [unreachable] * len(group)
            except Exception as exc:  # TLS, the network, the peer: counted, retried, not lost
                logger.debug("%s: delivery raised", name, exc_info=True)
                unreachable = f"{type(exc).__name__}: {exc}"
                errors = [unreachable] * len(group)
            for row, error in zip(group, errors, strict=True):
                if error is None:
                    sent.append(row.id)
                else:
                    failed[row.id] = error
            logger.info(
                "%s: %d of %d objects delivered to %s in %.2f s",
                name,
                len(group) - sum(e is not None for e in errors),
                len(group),
                target,
                time.perf_counter() - started,
                extra={"action": "send_batch", "job_id": group[0].job_id},
            )
        self.queue.mark_sent(sent)
        states = self.queue.mark_failed(
            failed,
            max_attempts=settings.max_attempts,
            backoff=lambda attempts: backoff_s(settings, attempts),
        )
        for row in rows:
            if row.id in failed:
                self._log_failure(settings, row, failed[row.id], states.get(row.id))
        if unreachable:
            wait = backoff_s(settings, min(r.attempts for r in rows) + 1)
            channel.blocked_until = time.monotonic() + wait
        self.settle({row.job_id for row in rows})
        return len(rows)

    def _targets(
        self, settings: DestinationSettings, rows: list[SendRecord]
    ) -> dict[Destination | str, list[SendRecord]]:
        """Rows grouped by where they go: the destination's one address (STOW-RS: its URL), or
        for return_to_sender the AE and host that sent each job's input ("?" when unknown)."""
        from dicomnode.send.scu import Destination

        if settings.kind == "stow":
            return {str(settings.url): rows}
        if settings.kind == "dimse":
            assert settings.ae_title and settings.host and settings.port
            return {Destination(settings.ae_title, settings.host, settings.port): rows}
        assert settings.port is not None
        groups: dict[Destination | str, list[SendRecord]] = {}
        origins: dict[int, Destination | str] = {}
        for row in rows:
            if row.job_id not in origins:
                origin = self.queue.origin(row.job_id)
                origins[row.job_id] = Destination(*origin, settings.port) if origin else "?"
            groups.setdefault(origins[row.job_id], []).append(row)
        return groups

    def _deliver(
        self, settings: DestinationSettings, target: Destination | str, rows: list[SendRecord]
    ) -> list[str | None]:
        """Send the rows' files; per row, None when the destination took it, else why not."""
        paths = [self.storage_dir / row.path for row in rows]
        if settings.kind == "stow":
            from dicomnode.send.stow import store_files

            return store_files(
                str(target),
                paths,
                headers=settings.headers,
                token=settings.token,
                timeout=settings.timeout_s,
            )
        if isinstance(target, str):
            return ["the index records no calling AE and host for the job's input"] * len(rows)
        from dicomnode.send.scu import send_files

        results = send_files(
            paths,
            target,
            calling_aet=settings.calling_aet or self.calling_aet,
            ssl_context=self._ssl_context(settings),
            timeout=settings.timeout_s,
        )
        return [None if r.ok else _describe(r.status, r.error) for r in results]

    def _ssl_context(self, settings: DestinationSettings) -> ssl.SSLContext | None:
        if not settings.tls.enabled:
            return None
        if settings.name not in self._ssl:
            from dicomnode.receive.tls import peer_context

            self._ssl[settings.name] = peer_context(settings.tls)
        return self._ssl[settings.name]

    def _log_failure(
        self, settings: DestinationSettings, row: SendRecord, error: str, state: str | None
    ) -> None:
        extra = {"action": "send_dead" if state == DEAD else "send_failed", "job_id": row.job_id}
        if state == DEAD:
            logger.error(
                "%s: %s %s given up after %d attempts: %s",
                settings.name, row.kind, row.sop_instance_uid, settings.max_attempts, error,
                extra=extra,
            )  # fmt: skip
        else:
            logger.warning(
                "%s: %s %s not delivered (attempt %d), retried in %.0f s: %s",
                settings.name, row.kind, row.sop_instance_uid, row.attempts + 1,
                backoff_s(settings, row.attempts + 1), error,
                extra=extra,
            )  # fmt: skip

    def settle(self, job_ids: set[int] | None = None) -> dict[int, str]:
        """Sending jobs with nothing pending: ``done`` when every row was sent, else ``failed``
        naming the destinations that gave up. Returns job id -> new state."""
        if job_ids is None:
            self.queue.drop_cancelled()
            self._warn_unserved()
        settled: dict[int, str] = {}
        for job_id, dead in self.queue.settled_jobs(job_ids).items():
            if not dead:
                if self.jobs.mark_sent(job_id):
                    settled[job_id] = "done"
                continue
            reasons: dict[str, str] = {}
            for row in dead:
                reasons.setdefault(
                    row.destination,
                    f"destination {row.destination!r} gave up on {row.kind} "
                    f"{row.sop_instance_uid} after {row.attempts} attempts: {row.last_error}",
                )
            error = "results not sent: " + "; ".join(reasons.values())
            if self.jobs.mark_failed(job_id, error):
                settled[job_id] = "failed"
                job = self.jobs.get(job_id)
                audit.record_event(
                    self.sessions,
                    audit.NODE,
                    "send_failed",
                    job_id=job_id,
                    study_instance_uid=job.study_instance_uid if job else None,
                    detail=f"gave up on {', '.join(reasons)}",
                )
        return settled

    def _warn_unserved(self) -> None:
        """Pending sends to a destination this node has no [[destinations]] entry for wait
        until one is configured: say so, at most every UNSERVED_WARNING_S."""
        if time.monotonic() < self._next_unserved_check:
            return
        self._next_unserved_check = time.monotonic() + UNSERVED_WARNING_S
        waiting = {
            destination: n
            for (destination, state), n in self.queue.counts().items()
            if state == PENDING and destination not in self.channels
        }
        for destination, n in sorted(waiting.items()):
            logger.warning(
                "%d sends wait for destination %r, which is not configured here: add it to "
                "[[destinations]] (or cancel their jobs)",
                n,
                destination,
                extra={"action": "send_unserved"},
            )

    # -- threads -------------------------------------------------------------------------------

    def start(self) -> None:
        """One daemon thread per destination, and one that settles jobs."""
        self._stop.clear()
        for name, channel in self.channels.items():
            send_queue.listen(channel.wake)
            channel.thread = threading.Thread(
                target=self._run_destination, args=(name,), name=f"send-{name}", daemon=True
            )
            channel.thread.start()
        self._settler = threading.Thread(target=self._run_settle, name="send-settle", daemon=True)
        self._settler.start()
        logger.info(
            "sender started: %s",
            ", ".join(self.channels) or "no destinations",
            extra={"action": "sender_started"},
        )

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the batches in hand (their rows are marked before the threads end)."""
        self._stop.set()
        for channel in self.channels.values():
            send_queue.unlisten(channel.wake)
            channel.wake.set()
        for channel in self.channels.values():
            if channel.thread is not None:
                channel.thread.join(timeout)
        if self._settler is not None:
            self._settler.join(timeout)

    def _run_destination(self, name: str) -> None:
        run_channel(
            name, self.channels[name], self.send_once,
            stop=self._stop, poll_s=self.poll_s,
            what="send queue", action="sender_error", log=logger,
        )  # fmt: skip

    def _run_settle(self) -> None:
        self._loop(self.settle, self.settle_s, "send_settle_error")

    def _loop(self, step: Callable[[], object], every_s: float, action: str) -> None:
        while not self._stop.wait(every_s):
            try:
                step()
            except Exception:
                logger.exception("sender: %s failed", action, extra={"action": action})


def _describe(status: int | None, error: str) -> str:
    if status is None:
        return error or "not sent"
    return f"status 0x{status:04X}" + (f": {error}" if error else "")
