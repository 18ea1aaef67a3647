"""The workers of ``serve`` as child processes (``[[workers]] isolation = "process"``, the
default): a model run that eats the memory (a hostile series decoded to gigabytes, a model's
bug) gets its worker killed, by the kernel's out-of-memory killer or the container's limit,
never the serve's receiver, intake, sender or API.

Each ``[[workers]]`` entry is one child (:mod:`dicomnode.children`), running the serve's own
command as ``worker --serve-child``: the same database, spool and models. It reads its
assignment (the settings, which entry it is, its worker id) on stdin, says ``L`` once its
models are loaded and ``J`` after each run. A child that dies is restarted with backoff; the
job it was running is failed at once on its behalf with the cause (``killed by SIGKILL``: the
out-of-memory killer's signal), so the queue retries it after its backoff, or fails it for
good after ``queue.max_attempts``. Where that write fails (the database is down), the job's
lease runs out and the reaper does the same.

``max_memory_mb`` caps a child's data (RLIMIT_DATA): a run past it fails with a MemoryError
that the worker records as the job's error, and the process lives on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.children import DEFAULT_COMMAND, Supervisor, child_command, describe_exit
from dicomnode.config import Settings, WorkerSettings
from dicomnode.domain import JobState
from dicomnode.queue.listing import JobFilter
from dicomnode.queue.repository import JobRepository
from dicomnode.queue.worker import default_worker_id

logger = logging.getLogger(__name__)

#: the hidden ``worker`` flag that makes a process such a child
CHILD_FLAG = "--serve-child"
JOB_ENDED = b"J"
#: a stopping child finishes the job in hand for this long before it is killed
STOP_TIMEOUT_S = 30.0
#: the kernel's out-of-memory killer takes the process of the highest score in the cgroup that
#: ran out (systemd's MemoryMax=, a container's limit): a worker process raises its own, so the
#: one killed is the worker, never its serve (whose score stays 0)
OOM_SCORE_ADJ = 500


@dataclass(frozen=True)
class WorkerAssignment:
    """What a worker child reads on stdin: the serve's settings, which ``[[workers]]`` entry
    it runs, and its worker id (the serve's record of it, to release its job if it dies)."""

    settings: Settings
    index: int
    worker_id: str

    @property
    def entry(self) -> WorkerSettings:
        return self.settings.workers[self.index]

    def to_json(self) -> bytes:
        settings = json.loads(self.settings.model_dump_json())
        body = {"settings": settings, "index": self.index, "worker_id": self.worker_id}
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, line: bytes) -> WorkerAssignment:
        body = json.loads(line)
        settings = Settings.model_validate(body["settings"])
        return cls(settings, int(body["index"]), str(body["worker_id"]))


class WorkerProcess:
    """One ``[[workers]]`` entry run as a child, as ``/api/health`` sees an embedded worker."""

    def __init__(self, owner: WorkerProcesses, name: str, device: str, models: Sequence[str]):
        self._owner = owner
        self.name = name
        self.device = device
        self.models = tuple(models)
        self.worker_id = ""  # the running child's, once started
        self.jobs_run = 0  # by every child of this entry, restarts included

    @property
    def alive(self) -> bool:
        return self._owner.children.alive(self.name)

    @property
    def pid(self) -> int | None:
        return self._owner.children.pids.get(self.name)


class WorkerProcesses:
    """Starts, watches and stops the worker children of one serve."""

    def __init__(
        self,
        settings: Settings,
        jobs: JobRepository,
        entries: Mapping[int, Sequence[str]],
        *,
        command: Sequence[str] = DEFAULT_COMMAND,
    ) -> None:
        """``entries``: the index of each ``[[workers]]`` entry to run as a child -> the
        names of its models."""
        self.settings = settings
        self.jobs = jobs
        self._indexes = {f"worker-{i}": i for i in entries}
        self.workers = {
            name: WorkerProcess(self, name, settings.workers[i].device, entries[i])
            for name, i in self._indexes.items()
        }
        self.children = Supervisor(
            "worker",
            list(self._indexes),
            child_command(command, "worker", CHILD_FLAG),
            assignment=self._assignment,
            on_event=self._event,
            on_exit=self._died,
        )

    def start(self) -> None:
        """Start the children; they load their models on their own time."""
        self.children.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Each child finishes the job in hand; one still running after ``timeout`` is killed
        (its job runs again once its lease expires)."""
        self.children.stop(timeout)

    def _assignment(self, name: str, pid: int) -> bytes:
        worker = self.workers[name]
        worker.worker_id = default_worker_id(worker.device, pid)
        return WorkerAssignment(self.settings, self._indexes[name], worker.worker_id).to_json()

    def _event(self, name: str, events: bytes) -> None:
        self.workers[name].jobs_run += events.count(JOB_ENDED)

    def _died(self, name: str, pid: int, code: int) -> None:
        """Fail the job the dead child held, now, with the cause: the queue retries it after
        its backoff (a job that kills its worker each time fails for good at max_attempts)."""
        worker_id = self.workers[name].worker_id
        running = self.jobs.list(JobFilter(state=JobState.RUNNING.value), limit=1000)
        for job in running:
            if job.lease_owner != worker_id:
                continue
            how = describe_exit(code)
            if code == -9:
                how += ", as the out-of-memory killer does"
            error = f"worker process {worker_id} died while running this job ({how})"
            state = self.jobs.fail(job.id, worker_id, error)
            logger.warning(
                "job %s: its worker process died (%s); job %s",
                job.id,
                describe_exit(code),
                state.value if state is not None else "left to its lease",
                extra={"action": "job_worker_died", "job_id": job.id, "worker_id": worker_id},
            )


def offer_to_oom_killer(path: Path = Path("/proc/self/oom_score_adj")) -> None:
    """Raise this process's out-of-memory score to OOM_SCORE_ADJ (never lower it: any process
    may raise its own; Linux only, elsewhere nothing)."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text()) < OOM_SCORE_ADJ:
            path.write_text(f"{OOM_SCORE_ADJ}\n")


def limit_memory(entry: WorkerSettings, worker_id: str = "") -> None:
    """Apply ``max_memory_mb`` to this process as RLIMIT_DATA: allocations past it fail with
    a MemoryError (numpy) or a RuntimeError (torch), which the worker records as the job's
    error. Not RLIMIT_AS: the runtime reserves far more address space than it uses (torch on
    the CPU some 0.9 GB at import, CUDA tens of GB), so that limit would break it. GPU workers
    are left alone (their memory is the GPU's; CUDA's host mappings are untested under it):
    limit them with the container's or the unit's memory limit."""
    if entry.max_memory_mb <= 0:
        return
    if entry.device.strip().lower() != "cpu":
        logger.warning(
            "worker %s: max_memory_mb applies to CPU workers only; %s is not limited",
            worker_id,
            entry.device,
            extra={"action": "worker_memory_limit", "worker_id": worker_id},
        )
        return
    limit = entry.max_memory_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    logger.info(
        "worker %s: its data may not grow past %d MB",
        worker_id,
        limit // 2**20,
        extra={"action": "worker_memory_limit", "worker_id": worker_id},
    )
