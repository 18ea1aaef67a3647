"""The worker: claims jobs for its models, runs them, heartbeats while they run, records the end.

A worker is bound to one device and a set of models, which it loads once and keeps loaded
between jobs. It runs one job at a time in the thread that calls :meth:`Worker.run`; a second
thread renews the job's lease every ``heartbeat_s`` while it runs. When a heartbeat finds the
lease gone (the job was cancelled, or reaped after the worker stalled), the job's ``cancelled``
event is set so the model can stop early, and whatever it returns is dropped.

On stop (the event passed to :meth:`Worker.run` is set, e.g. by SIGTERM) the worker finishes the
job in hand and returns. A worker that dies instead (SIGKILL, power loss) leaves a lease that
expires; the periodic reaper then puts the job back in the queue for another worker.

A run writes its files into a private staging folder (:mod:`dicomnode.queue.staging`), which
the worker moves into ``results/<job id>/`` only in the transaction that records the run while
it holds the lease: a worker that lost its lease (paused past it) never touches a finished job's
files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dicomnode.domain import JobState
from dicomnode.errors import InputsRefused, ResultsError
from dicomnode.queue.repository import ClaimedJob, JobRepository
from dicomnode.queue.staging import Staging, clean_staging

logger = logging.getLogger(__name__)

#: How long a worker waits before asking again when the queue had nothing for it.
IDLE_POLL_S = 0.2
#: The longest wait after the database could not be reached.
MAX_ERROR_WAIT_S = 30.0


@dataclass(frozen=True)
class JobContext:
    """What a model's ``run`` gets: the job, where to run it, and a stop signal."""

    job: ClaimedJob
    device: str
    worker_id: str
    #: Set when the job was cancelled or its lease lost: stop early; the result is dropped.
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: The shared spool the job's input series are in (None in tests that need none).
    storage_dir: Path | None = None
    #: The run's private folder, laid out like ``storage_dir``: it writes the job's files
    #: into ``results/<job id>/`` under it, and records paths relative to it (the same paths
    #: once published). None: straight into ``storage_dir``.
    staging_root: Path | None = None

    @property
    def output_root(self) -> Path | None:
        """Where the run writes ``results/<job id>/``: its staging folder, else the spool."""
        return self.staging_root or self.storage_dir


@runtime_checkable
class JobModel(Protocol):
    """What a worker runs. The model runtime (``dicomnode.inference``) implements it."""

    #: The name routes use (``model = "..."``) and jobs carry.
    name: str

    def load(self, device: str) -> None:
        """Load weights onto ``device``; called once per worker, before the first job."""

    def run(self, context: JobContext) -> Mapping[str, Any]:
        """Run on the job's input series and return a JSON-serialisable result.

        Raise to fail the attempt: the exception's type and text become the job's error.
        """


def default_worker_id(device: str, pid: int | None = None) -> str:
    """``host:pid:device`` (this process's id, or ``pid``'s): unique among live workers, and
    says where to look."""
    return f"{socket.gethostname()}:{pid or os.getpid()}:{device}"


class Worker:
    """Runs jobs for ``models`` (name -> model) on ``device`` until stopped."""

    def __init__(
        self,
        repository: JobRepository,
        models: Mapping[str, JobModel],
        *,
        device: str = "cpu",
        worker_id: str | None = None,
        lease_s: float | None = None,
        heartbeat_s: float | None = None,
        poll_s: float = IDLE_POLL_S,
        storage_dir: Path | None = None,
    ) -> None:
        if not models:
            raise ValueError("a worker needs at least one model")
        self.repository = repository
        self.models = dict(models)
        self.device = device
        self.worker_id = worker_id or default_worker_id(device)
        self.lease_s = lease_s if lease_s is not None else repository.settings.lease_s
        heartbeat = heartbeat_s if heartbeat_s is not None else repository.settings.heartbeat_s
        # At least three heartbeats per lease, so one slow database round trip costs nothing.
        self.heartbeat_s = min(heartbeat, self.lease_s / 3)
        self.poll_s = poll_s
        self.storage_dir = storage_dir
        self.jobs_run = 0
        #: called after each run ended (the worker process of ``serve`` tells its parent)
        self.on_job_end: Callable[[], None] | None = None
        self._loaded = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def load_models(self) -> None:
        """Load every model onto the device, once."""
        if self._loaded:
            return
        for name, model in self.models.items():
            model.load(self.device)
            logger.info(
                "model %s loaded on %s",
                name,
                self.device,
                extra={"action": "model_loaded", "worker_id": self.worker_id},
            )
        self._loaded = True

    def run(self, stop: threading.Event | None = None) -> None:
        """Claim and run jobs until ``stop`` is set; the job in hand is finished first."""
        stop = stop or self._stop
        self.load_models()
        if self.storage_dir is not None:
            try:
                clean_staging(self.storage_dir, self.repository.sessions)
            except Exception:  # the next start tries again; runs never depend on it
                logger.warning(
                    "worker %s: staging folders could not be cleaned",
                    self.worker_id,
                    exc_info=True,
                    extra={"action": "staging_clean_failed", "worker_id": self.worker_id},
                )
        logger.info(
            "worker %s started: models %s on %s",
            self.worker_id,
            ",".join(sorted(self.models)),
            self.device,
            extra={"action": "worker_started", "worker_id": self.worker_id},
        )
        errors = 0
        while not stop.is_set():
            try:
                ran = self.run_once()
                errors = 0
            except Exception:
                errors += 1
                wait = min(MAX_ERROR_WAIT_S, self.poll_s * 2**errors)
                logger.exception(
                    "worker %s: queue unavailable, trying again in %.1f s",
                    self.worker_id,
                    wait,
                    extra={"action": "worker_error", "worker_id": self.worker_id},
                )
                stop.wait(wait)
                continue
            if not ran:
                stop.wait(self.poll_s)
        logger.info(
            "worker %s stopped after %d jobs",
            self.worker_id,
            self.jobs_run,
            extra={"action": "worker_stopped", "worker_id": self.worker_id},
        )

    def run_once(self) -> bool:
        """Claim one job and run it to its end; False when none was runnable."""
        job = self.repository.claim(self.worker_id, self.models.keys(), self.lease_s)
        if job is None:
            return False
        self.execute(job)
        return True

    def execute(self, job: ClaimedJob) -> JobState | None:
        """Run a job this worker claimed; returns its new state (None: the lease was lost)."""
        staging = None
        if self.storage_dir is not None:
            staging = Staging.for_run(self.storage_dir, job.id, job.attempts)
        context = JobContext(
            job,
            self.device,
            self.worker_id,
            storage_dir=self.storage_dir,
            staging_root=staging.root if staging is not None else None,
        )
        done = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat,
            args=(job.id, context.cancelled, done),
            name=f"heartbeat-{job.id}",
            daemon=True,
        )
        beat.start()
        try:
            model = self.models.get(job.model)
            if model is None:  # claim() filters by model, so only a renamed model lands here
                return self._record(
                    lambda: self.repository.fail(
                        job.id, self.worker_id, f"model {job.model!r} is not on this worker"
                    ),
                    job.id,
                )
            refused: InputsRefused | None = None
            try:
                result = dict(model.run(context))
            except InputsRefused as exc:  # skipped at once, its "not analysed" report sent
                if context.cancelled.is_set():
                    return None
                refused, result = exc, dict(exc.result)
            except Exception as exc:
                logger.debug("job %s raised", job.id, exc_info=True)
                if context.cancelled.is_set():
                    return None
                error = _describe(exc)
                retry = not getattr(exc, "permanent", False)
                return self._record(
                    lambda: self.repository.fail(job.id, self.worker_id, error, retry=retry),
                    job.id,
                )
            if context.cancelled.is_set():
                logger.info(
                    "job %s: run ended after its lease was lost; result dropped",
                    job.id,
                    extra={"action": "job_result_dropped", "job_id": job.id},
                )
                return None
            try:
                json.dumps(result)
            except (TypeError, ValueError) as exc:
                error = f"result could not be stored: {_describe(exc)}"
                return self._record(
                    lambda: self.repository.fail(job.id, self.worker_id, error), job.id
                )
            publish = staging.publish if staging is not None else None
            try:
                if refused is not None:
                    reason = refused.message
                    return self._record(
                        lambda: self.repository.refuse(
                            job.id, self.worker_id, reason, result, publish=publish
                        ),
                        job.id,
                    )
                return self._record(
                    lambda: self.repository.finish(job.id, self.worker_id, result, publish=publish),
                    job.id,
                )
            except ResultsError as exc:  # the files could not be moved into place
                error = _describe(exc)
                return self._record(
                    lambda: self.repository.fail(job.id, self.worker_id, error), job.id
                )
        finally:
            done.set()
            beat.join()
            if staging is not None:  # published (then empty), or not this worker's to publish
                staging.discard()
            self.jobs_run += 1
            if self.on_job_end is not None:
                self.on_job_end()

    def _record(self, write: Callable[[], JobState | None], job_id: int) -> JobState | None:
        """Write a run's end, trying again while the database is unreachable (restarting) for
        up to one lease: a finished run is worth keeping, and once the lease is gone the write
        changes nothing anyway (another worker runs the job again)."""
        from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

        deadline = time.monotonic() + self.lease_s
        wait = self.poll_s
        while True:
            try:
                return write()
            except DBAPIError as exc:
                unreachable = isinstance(exc, OperationalError | InterfaceError)
                if not (unreachable or exc.connection_invalidated):
                    raise
                if time.monotonic() + wait > deadline:
                    raise
                logger.warning(
                    "job %s: database unavailable, recording its end again in %.1f s",
                    job_id,
                    wait,
                    extra={"action": "job_record_retry", "job_id": job_id},
                )
                time.sleep(wait)
                wait = min(wait * 2, 5.0)

    def _heartbeat(self, job_id: int, cancelled: threading.Event, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_s):
            try:
                held = self.repository.heartbeat(job_id, self.worker_id, self.lease_s)
            except Exception:
                # The lease outlives a few missed beats; if it runs out, the next beat says so.
                logger.warning(
                    "job %s: heartbeat failed",
                    job_id,
                    exc_info=True,
                    extra={"action": "job_heartbeat_failed", "job_id": job_id},
                )
                continue
            if not held:
                cancelled.set()
                return

    # -- in a background thread (the worker embedded in ``serve``) -------------------------------

    def start(self) -> threading.Thread:
        """Run in a daemon thread; :meth:`stop` ends it."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("worker already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"worker-{self.device}", daemon=True)
        self._thread.start()
        return self._thread

    @property
    def alive(self) -> bool:
        """Its thread runs (the worker embedded in ``serve``)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop after its current job, and wait up to ``timeout``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
