"""Periodic work on APScheduler's BackgroundScheduler: lease reaping, retention, and what other
parts register (the completion sweep) through :meth:`Periodic.add_job`.

Every job runs in the scheduler's thread pool, never two runs of the same job at once, and missed
runs coalesce into one. Lease reaping is safe to run in several processes at the same time
(``serve`` and every ``dicomnode worker`` reap leases): its statements are atomic. The purge, like
the intake sweep and the retention, runs in one process at a time (:mod:`dicomnode.db.locks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.config import QueueSettings
from dicomnode.db.locks import TaskLocks
from dicomnode.queue.repository import JobRepository

logger = logging.getLogger(__name__)

REAP_JOB = "queue.reap_leases"
PURGE_JOB = "queue.purge"


class Periodic:
    """A background scheduler of named interval jobs."""

    def __init__(self, *, workers: int = 4) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor

        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    def add_job(
        self,
        func: Callable[[], Any],
        seconds: float,
        name: str,
        *,
        run_now: bool = False,
    ) -> None:
        """Run ``func`` every ``seconds`` (first after one interval, or at once with
        ``run_now``). A job with the same name is replaced. Exceptions are logged, not raised."""
        if seconds <= 0:
            raise ValueError(f"periodic job {name!r} needs a positive interval")
        options: dict[str, Any] = {}
        if run_now:
            options["next_run_time"] = datetime.now(UTC)
        self._scheduler.add_job(
            _guarded(func, name),
            "interval",
            seconds=seconds,
            id=name,
            name=name,
            replace_existing=True,
            **options,
        )

    def run_soon(self, name: str) -> None:
        """Run the named job now (once more, in its usual thread), if the scheduler runs."""
        if self._scheduler.running and self._scheduler.get_job(name) is not None:
            self._scheduler.modify_job(name, next_run_time=datetime.now(UTC))

    def task(self, name: str) -> Callable[[], None]:
        """The function the named job runs (exceptions logged, as when scheduled), to run it by
        hand; KeyError names a job that is not registered."""
        job = self._scheduler.get_job(name)
        if job is None:
            raise KeyError(f"no periodic job {name!r}; there are {self.job_names()}")
        return job.func

    def job_names(self) -> list[str]:
        return sorted(job.id for job in self._scheduler.get_jobs())

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        self._scheduler.start()
        logger.info(
            "periodic jobs started: %s",
            ", ".join(self.job_names()) or "none",
            extra={"action": "periodic_started"},
        )

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling; with ``wait``, let running jobs end first."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)


def _guarded(func: Callable[[], Any], name: str) -> Callable[[], None]:
    def run() -> None:
        try:
            func()
        except Exception:
            logger.exception(
                "periodic job %s failed", name, extra={"action": "periodic_failed", "task": name}
            )

    run.__name__ = f"periodic_{name}"
    return run


def reap_interval(lease_s: float) -> float:
    """Reap often enough that an expired lease waits at most a quarter lease, 1 to 5 s."""
    return min(5.0, max(1.0, lease_s / 4))


def schedule_queue_maintenance(
    periodic: Periodic,
    repository: JobRepository,
    settings: QueueSettings | None = None,
    *,
    purge: bool = True,
    reap_every_s: float | None = None,
    purge_every_s: float = 3600.0,
    locks: TaskLocks | None = None,
) -> None:
    """Register lease reaping (every few seconds) and, with ``purge``, the retention purge
    of finished jobs older than ``retention_days`` (hourly); with ``locks``, a purge another
    process is running is skipped."""
    settings = settings or repository.settings
    periodic.add_job(
        repository.reap_expired_leases,
        reap_every_s or reap_interval(settings.lease_s),
        REAP_JOB,
        run_now=True,
    )
    if purge:
        retention = timedelta(days=settings.retention_days)

        def purge_jobs() -> None:
            repository.purge(repository.now() - retention)

        periodic.add_job(
            locks.exclusively(PURGE_JOB, purge_jobs) if locks is not None else purge_jobs,
            purge_every_s,
            PURGE_JOB,
            run_now=True,
        )
