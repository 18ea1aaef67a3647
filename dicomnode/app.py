"""Wiring: builds the node's parts from settings. Entry points (CLI, tests) use this."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.api.context import ApiContext
from dicomnode.api.server import ApiServer
from dicomnode.children import DEFAULT_COMMAND
from dicomnode.config import Settings, WorkerSettings
from dicomnode.db import make_engine, make_session_factory, upgrade
from dicomnode.db.locks import TaskLocks
from dicomnode.db.migrate import current_revision, head_revision
from dicomnode.errors import DatabaseError
from dicomnode.fetch.analysis import Analysis
from dicomnode.fetch.priors import PriorsHold
from dicomnode.fetch.runner import RequestRunner
from dicomnode.inference.device import resolve_device
from dicomnode.inference.registry import ModelRegistry
from dicomnode.intake import Intake
from dicomnode.notify.notifier import Notifier
from dicomnode.pipeline import job_models
from dicomnode.pipeline.models import BuiltinModels
from dicomnode.queue.outcomes import ReleasePolicy
from dicomnode.queue.periodic import Periodic, schedule_queue_maintenance
from dicomnode.queue.processes import WorkerProcesses
from dicomnode.queue.repository import JobRepository
from dicomnode.queue.worker import Worker
from dicomnode.receive.processes import ReceiverProcesses
from dicomnode.receive.server import Receiver
from dicomnode.receive.spool import Spool
from dicomnode.receive.store import InstanceStore
from dicomnode.receive.stow import StowIngest
from dicomnode.receive.validate import Limits
from dicomnode.retention import purge_results, purge_studies
from dicomnode.routing import Router
from dicomnode.send.sender import Sender

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]


def open_database(settings: Settings, *, migrate: bool) -> Database:
    """Connect, and bring the schema up to date when asked (else insist it already is)."""
    settings.node.storage_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    engine = make_engine(settings.node.resolved_database_url)
    try:
        if migrate:
            upgrade(engine)
        elif current_revision(engine) != head_revision():
            raise DatabaseError("the database schema is not current: run `dicomnode db upgrade`")
    except DatabaseError:
        raise
    except Exception as exc:
        raise DatabaseError(
            f"database {engine.url.render_as_string(hide_password=True)} could not be opened: {exc}"
        ) from exc
    return Database(engine, make_session_factory(engine))


def restrict_new_files() -> None:
    """Spool files and the SQLite database hold patient data: no access for others."""
    os.umask(0o027)


SWEEP_JOB = "intake.sweep"
SWEEP_EVERY_S = 1.0
RETENTION_JOB = "spool.retention"
RETENTION_EVERY_S = 3600.0
REQUESTS_JOB = "fetch.requests"
REQUESTS_POLL_S = 1.0


@dataclass
class Node:
    """Everything ``dicomnode serve`` runs: receiver, intake sweep, queue upkeep, workers
    (``workers`` in threads of this process, ``worker_processes`` as its children)."""

    settings: Settings
    database: Database
    spool: Spool
    store: InstanceStore
    receiver: Receiver
    jobs: JobRepository
    intake: Intake
    periodic: Periodic
    workers: list[Worker]
    sender: Sender | None = None  # the send queue's deliveries (None: no destinations)
    #: the HTTP API, dashboard and /metrics (None: ``[api] enabled = false``)
    api: ApiServer | None = None
    #: the extra receiver processes on the DICOM port (None: ``[node] processes = 1``)
    receivers: ReceiverProcesses | None = None
    #: the workers run as child processes (None: none is, ``[[workers]] isolation``)
    worker_processes: WorkerProcesses | None = None
    #: the notification queue's deliveries (None: no ``[[notifications]]``)
    notifier: Notifier | None = None
    #: retrieves requested studies from the sources (None: no ``[[sources]]``)
    requests: RequestRunner | None = None

    def start(self, *, background: bool = True) -> None:
        """Listen; with ``background``, also sweep, reap leases and run the embedded workers."""
        self.spool.prepare()
        self.receiver.start()
        if self.receivers is not None:
            self.receivers.start(self.receiver.address[1])
        if self.api is not None:
            self.api.start()
        if background:
            self.periodic.start()
            for worker in self.workers:
                worker.start()
            if self.worker_processes is not None:
                self.worker_processes.start()
            if self.sender is not None:
                self.sender.start()
            if self.notifier is not None:
                self.notifier.start()
            if self.requests is not None:
                self.requests.start(REQUESTS_POLL_S)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let workers finish the job in hand, then stop the periodic work."""
        if self.api is not None:
            self.api.stop()
        if self.requests is not None:  # the retrieve in hand ends first (C-MOVE: on our receiver)
            self.requests.stop(timeout)
        self.receiver.stop()
        if self.receivers is not None:
            self.receivers.stop()
        for worker in self.workers:
            worker.stop(timeout)
        if self.worker_processes is not None:
            self.worker_processes.stop(timeout)
        if self.sender is not None:
            self.sender.stop(timeout)
        if self.notifier is not None:
            self.notifier.stop(timeout)
        self.periodic.shutdown()
        self.database.engine.dispose()

    def wake_intake(self) -> None:
        """An association ended: sweep now rather than at the next tick."""
        self.periodic.run_soon(SWEEP_JOB)

    def wake_requests(self) -> None:
        """A request was made: look at the requests now rather than at the next poll."""
        if self.requests is not None:
            self.requests.wake()


def _spool_and_store(settings: Settings, database: Database) -> tuple[Spool, InstanceStore]:
    """This receiver's spool and the store that files and indexes what it receives."""
    spool = Spool(settings.node.storage_dir, settings.node.receiver_id)
    store = InstanceStore(
        spool,
        database.sessions,
        duplicate_policy=settings.node.duplicate_policy,
        min_free_bytes=settings.node.min_free_disk_mb * 2**20,
        limits=Limits(
            lenient_uids=settings.node.lenient_uids,
            max_pixel_bytes=settings.node.max_pixel_data_mb * 2**20,
        ),
        max_inflated_bytes=settings.node.max_inflated_mb * 2**20,
    )
    return spool, store


def build_node(
    settings: Settings,
    *,
    builtin_models: BuiltinModels | None = None,
    worker_processes: bool | None = None,
    command: Sequence[str] = DEFAULT_COMMAND,
) -> Node:
    """Open the database (migrating if configured) and wire every part; nothing runs yet.
    ``builtin_models`` run beside the model packages (the tests' ``echo``).

    A ``[[workers]]`` entry with ``isolation = "process"`` runs as a child process of
    ``command`` (this CLI: ``python -m dicomnode.cli``) when ``worker_processes`` allows it:
    by default only without ``builtin_models``, objects of this process that a child cannot
    have; a caller whose ``command`` registers the same ones (the testing CLI) passes True.
    The other entries, and all with ``worker_processes=False``, run in threads of this
    process."""
    database = open_database(settings, migrate=settings.node.auto_migrate)
    spool, store = _spool_and_store(settings, database)
    jobs = job_repository(settings, database.sessions)
    # a route's priors: its jobs wait while the request runner fetches them
    hold = PriorsHold(settings, database.sessions) if settings.sources else None
    intake = Intake(database.sessions, spool.root, Router.from_settings(settings), jobs, hold=hold)
    periodic = Periodic()
    # several serves on one database: each of these runs in one of them at a time, the others
    # skip their turn (lease reaping is atomic, every process does it)
    locks = TaskLocks(database.engine)
    schedule_queue_maintenance(periodic, jobs, locks=locks)
    periodic.add_job(
        locks.exclusively(SWEEP_JOB, intake.sweep), SWEEP_EVERY_S, SWEEP_JOB, run_now=True
    )
    if settings.node.retention_days > 0:
        keep = timedelta(days=settings.node.retention_days)
        periodic.add_job(
            locks.exclusively(
                RETENTION_JOB,
                lambda: (
                    purge_studies(database.sessions, spool, datetime.now(UTC) - keep),
                    purge_results(database.sessions, spool.root, datetime.now(UTC) - keep),
                ),
            ),
            RETENTION_EVERY_S,
            RETENTION_JOB,
        )
    requests = None
    if settings.sources:
        analysis = Analysis(settings, database.sessions, jobs, spool.root, hold=hold)
        requests = RequestRunner(settings, database.sessions, jobs, store, analysis=analysis)
        requests.task = locks.exclusively(REQUESTS_JOB, requests.run_once)
    registry = ModelRegistry.from_settings(settings)
    if worker_processes is None:
        worker_processes = not builtin_models
    workers: list[Worker] = []
    children: dict[int, list[str]] = {}
    for index, entry in enumerate(settings.workers):
        # built here in either case: an unknown model or a missing GPU fails the serve's start
        worker = build_worker(settings, entry, jobs, builtin_models=builtin_models,
                              registry=registry)  # fmt: skip
        if worker_processes and entry.isolation == "process":
            children[index] = sorted(worker.models)
        else:
            workers.append(worker)
    processes = None
    if children:
        processes = WorkerProcesses(settings, jobs, children, command=command)
    receiver = Receiver(settings, store, database.sessions)
    sender = Sender(
        database.sessions,
        jobs,
        settings.destinations,
        spool.root,
        calling_aet=settings.node.ae_title,
    )
    api = None
    wake: list[Node] = []  # the node, once built: the API wakes its request runner
    if settings.api.enabled:  # refuses a non-loopback host without a token
        embedded = (*workers, *(processes.workers.values() if processes else ()))
        context = ApiContext(
            settings,
            database.sessions,
            jobs,
            embedded,
            tuple(builtin_models or ()),
            stow=StowIngest(receiver),
            on_request=lambda: wake[0].wake_requests() if wake else None,
        )
        api = ApiServer(context)
    node = Node(
        settings, database, spool, store, receiver, jobs, intake, periodic, workers, sender, api
    )
    wake.append(node)
    node.worker_processes = processes
    if settings.notifications:
        node.notifier = Notifier(database.sessions, settings.notifications)
    node.requests = requests
    receiver.on_association_closed = node.wake_intake
    if settings.node.processes > 1:
        node.receivers = ReceiverProcesses(settings, node.wake_intake, command=command)
    return node


def job_repository(settings: Settings, sessions: sessionmaker[Session]) -> JobRepository:
    """The job queue with the routes' rules on findings and the notifications: every process
    that finishes or fails jobs (serve, its worker children, ``dicomnode worker``) uses this,
    so each writes the same sends and notifications."""
    return JobRepository(sessions, settings.queue, policy=ReleasePolicy.from_settings(settings))


def build_worker(
    settings: Settings,
    entry: WorkerSettings,
    jobs: JobRepository,
    *,
    builtin_models: BuiltinModels | None = None,
    registry: ModelRegistry | None = None,
    worker_id: str | None = None,
) -> Worker:
    """The worker of one ``[[workers]]`` entry (its models not loaded yet): in a thread of
    ``serve`` or in its worker process. UnknownModel, or DeviceUnavailable for a missing GPU."""
    return Worker(
        jobs,
        job_models(
            registry or ModelRegistry.from_settings(settings),
            entry.models,
            sessions=jobs.sessions,
            routes=settings.routes,
            results=settings.results,
            builtins=builtin_models,
            commands=settings.models.commands,
        ),
        device=str(resolve_device(entry.device)),  # a missing GPU fails at start
        worker_id=worker_id,
        lease_s=settings.queue.lease_s,
        heartbeat_s=settings.queue.heartbeat_s,
        storage_dir=settings.node.storage_dir.resolve(),  # the spool's root
    )


@dataclass(frozen=True)
class ReceiverNode:
    """What an extra receiver process of ``serve --processes`` runs: the receiver alone, on the
    serve's database and spool (its intake, workers and sender run in the serve)."""

    database: Database
    spool: Spool
    receiver: Receiver

    def start(self) -> None:
        self.spool.prepare()
        self.receiver.start()

    def stop(self) -> None:
        self.receiver.stop()
        self.database.engine.dispose()


def build_receiver_node(settings: Settings) -> ReceiverNode:
    """The receiver of one extra process; the serve has migrated the database already."""
    database = open_database(settings, migrate=False)
    spool, store = _spool_and_store(settings, database)
    return ReceiverNode(database, spool, Receiver(settings, store, database.sessions))
