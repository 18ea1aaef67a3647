"""The queue's test model, which tests add to the node's models (it is never in production's):
``echo`` runs without the inference runtime, so queue, worker and serve tests stay fast.

``echo`` returns how many input series its job has. Its route name may carry directives after a
``?``, as in a URL query, which tests use to steer it:

- ``sleep=S``: take S seconds (ends early when the job is cancelled or its lease is lost);
- ``fail=N``: raise on the first N attempts (``fail=always``: on every one);
- ``refuse=1``: reject its input (:class:`~dicomnode.errors.InputsRejected`, a permanent error);
- ``write=1``: write ``results/<job id>/echo.json`` (its attempt and worker) as a model's
  result files are written, after the sleep, whether or not the lease was lost meanwhile;
- ``allocate=MB``: take MB megabytes of memory (every page touched) for the rest of the run, as
  a hostile series decoded to gigabytes does;
- ``kill=N``: SIGKILL its own process on the first N attempts (``kill=always``: on every one),
  as the out-of-memory killer does to a process past its limit. Only in a worker process (the
  worker in its main thread): a worker in a thread of another process (the tests' in-process
  nodes) raises instead.

Example route: ``"slow?sleep=2&fail=1"``. With ``$DICOMNODE_TEST_RUN_LOG`` naming a file, each run
appends ``start <job id> <attempt> <worker id>`` when it begins and ``end ...`` when it returns,
each line in one O_APPEND write, so several processes can share the file.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from dicomnode.errors import InputsRejected
from dicomnode.queue.worker import JobContext, JobModel

RUN_LOG_ENV = "DICOMNODE_TEST_RUN_LOG"


class ModelFailure(RuntimeError):
    """The echo model was told to fail."""


def directives(route: str) -> dict[str, str]:
    """The ``key=value`` pairs after the ``?`` in a route name."""
    _, _, query = route.partition("?")
    return dict(parse_qsl(query))


class EchoModel:
    """Counts its job's input series; sleeps or fails when its route says so."""

    name = "echo"

    def __init__(self) -> None:
        self.device: str | None = None
        self.loads = 0
        self.runs = 0
        self.run_log: str | None = None

    def load(self, device: str) -> None:
        self.device = device
        self.loads += 1
        self.run_log = os.environ.get(RUN_LOG_ENV) or None

    def run(self, context: JobContext) -> Mapping[str, Any]:
        if self.device is None:
            raise RuntimeError("echo model used before load()")
        job = context.job
        self.runs += 1
        self._record("start", context)
        steer = directives(job.route)
        sleep = float(steer.get("sleep", 0))
        if sleep > 0:
            deadline = time.monotonic() + sleep
            while (left := deadline - time.monotonic()) > 0 and not context.cancelled.wait(left):
                pass
        ballast = _allocate(int(steer.get("allocate", 0)))
        kill = steer.get("kill", "0")
        if kill == "always" or job.attempts <= int(kill):
            if threading.current_thread() is not threading.main_thread():
                raise ModelFailure("told to kill its process, but it runs in a thread")
            self._record("kill", context)
            os.kill(os.getpid(), signal.SIGKILL)
        del ballast
        if steer.get("refuse") == "1":
            raise InputsRejected(f"echo refuses its {len(job.inputs)} input series")
        fail = steer.get("fail", "0")
        if fail == "always" or job.attempts <= int(fail):
            raise ModelFailure(f"told to fail (attempt {job.attempts})")
        if steer.get("write") == "1":
            self._write(context)
        self._record("end", context)
        return {
            "model": self.name,
            "series_count": len(job.inputs),
            "attempt": job.attempts,
            "device": self.device,
            "worker_id": context.worker_id,
        }

    def _write(self, context: JobContext) -> None:
        if context.output_root is None:
            raise RuntimeError("echo model told to write, but the job has no storage directory")
        folder = context.output_root / "results" / str(context.job.id)
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"attempt": context.job.attempts, "worker_id": context.worker_id})
        (folder / "echo.json").write_text(text)

    def _record(self, event: str, context: JobContext) -> None:
        if self.run_log is None:
            return
        line = f"{event} {context.job.id} {context.job.attempts} {context.worker_id}\n"
        fd = os.open(self.run_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _allocate(megabytes: int) -> bytearray:
    """``megabytes`` of memory, each page written (resident, not merely reserved)."""
    ballast = bytearray(megabytes * 2**20)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    return ballast


#: name -> factory of the test models, for ``job_models(..., builtins=MODELS)``
MODELS: dict[str, Callable[[], JobModel]] = {"echo": EchoModel}


def load_models(names: Iterable[str] | None = None) -> dict[str, JobModel]:
    """New instances of the named test models (None or empty: every one); UnknownModel (a
    ConfigError) names the ones there are."""
    from dicomnode.inference.registry import ModelRegistry
    from dicomnode.pipeline import job_models

    return job_models(ModelRegistry(), names, builtins=MODELS)
