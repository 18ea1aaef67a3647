"""Extra receiver processes on one DICOM port: ``serve --processes N`` (``[node] processes``).

One Python process receives at ~3-4 ms of CPU per instance, so one receiver is one core. With
N > 1 the serve starts N-1 children that run the receiver alone (no intake, workers, API or
sender) on the same port: every listening socket sets SO_REUSEPORT and the kernel (Linux)
spreads new connections over them. They share the index database and the spool; child ``k`` is
receiver ``<receiver_id>-<k>``, with its own ``incoming/`` folder and associations.

The parent talks to each child over its standard streams:

- stdin: the settings as one JSON line, then nothing. At EOF (the parent stopped, or died even
  by SIGKILL) the child stops; a receiver never outlives its serve.
- stdout: one byte per event: ``L`` once listening, ``R`` when an association that stored
  instances ended (the parent's intake then sweeps at once, as for its own associations).

stderr is the parent's, so the children log where the serve logs. A child that dies is logged
and restarted, after 1 s doubling to 30 s while it keeps dying young: the other processes keep
the port served meanwhile, and its restart closes the associations it died holding as lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from dicomnode.config import ENV_PREFIX, Settings
from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)

#: the hidden ``serve`` flag that makes a process such a child
CHILD_FLAG = "--receiver-child"
LISTENING, RELEASED = b"L", b"R"
START_TIMEOUT_S = 60.0
RESTART_DELAY_S, MAX_RESTART_DELAY_S = 1.0, 30.0
#: a child that ran this long before dying was not dying young: restart it after the first delay
STABLE_S = 60.0


class ReceiverProcessFailed(DicomNodeError):
    """An extra receiver process of ``serve --processes`` did not start."""


def child_settings(settings: Settings, k: int, port: int) -> Settings:
    """Child ``k``'s settings: the parent's, on the port the parent bound, as receiver
    ``<receiver_id>-<k>``."""
    node = settings.node.model_copy(
        update={"port": port, "receiver_id": settings.node.process_receiver_id(k)}
    )
    return settings.model_copy(update={"node": node})


class ReceiverProcesses:
    """Starts, watches and stops the extra receiver processes of one serve."""

    def __init__(self, settings: Settings, on_released: Callable[[], None]) -> None:
        self.settings = settings
        self.count = settings.node.processes - 1
        self.on_released = on_released
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._ready = {k: threading.Event() for k in range(1, self.count + 1)}
        self._threads: list[threading.Thread] = []
        self._port = 0

    @property
    def pids(self) -> dict[int, int]:
        """Child ``k`` -> its process id, for those running now."""
        with self._lock:
            return {k: p.pid for k, p in self._processes.items() if p.poll() is None}

    def start(self, port: int, timeout: float = START_TIMEOUT_S) -> None:
        """Start the children on ``port`` (the parent's bound port) and wait until each
        listens; raise ReceiverProcessFailed (stopping those started) if one does not."""
        self._port = port
        for k in range(1, self.count + 1):
            thread = threading.Thread(target=self._keep, args=(k,), name=f"receiver-{k}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + timeout
        for k, ready in self._ready.items():
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise ReceiverProcessFailed(
                    f"receiver process {self.settings.node.process_receiver_id(k)!r} did not "
                    f"listen on port {port} within {timeout:g} s (see its log lines above)"
                )
        logger.info(
            "%d more receiver processes listening on port %d",
            self.count,
            port,
            extra={"action": "receiver_processes"},
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Close the children's stdin (they stop, finishing what they hold), then wait; those
        still running after ``timeout`` are killed."""
        with self._lock:
            self._stopping.set()
            running = list(self._processes.values())
        for process in running:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join(timeout)

    def _keep(self, k: int) -> None:
        """Run child ``k``; restart it whenever it dies, until stopped."""
        delay = RESTART_DELAY_S
        receiver_id = self.settings.node.process_receiver_id(k)
        while True:
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                process = self._spawn(k)
                self._processes[k] = process
            self._follow(k, process)
            code = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_S:
                delay = RESTART_DELAY_S
            logger.error(
                "Receiver process %s (pid %d) exited with status %d; restarting it in %g s",
                receiver_id,
                process.pid,
                code,
                delay,
                extra={"action": "receiver_process_died"},
            )
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_DELAY_S)

    def _spawn(self, k: int) -> subprocess.Popen[bytes]:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        # The settings travel on stdin, whole: the environment would apply again over them.
        env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "--log-level", level, "serve", CHILD_FLAG],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches the serve, which stops them
        )
        assert process.stdin is not None
        try:
            settings = child_settings(self.settings, k, self._port)
            process.stdin.write(settings.model_dump_json().encode() + b"\n")
            process.stdin.flush()
        except OSError:
            pass  # it died at once: its exit is seen and logged by the caller
        return process

    def _follow(self, k: int, process: subprocess.Popen[bytes]) -> None:
        """Read the child's events until it exits."""
        assert process.stdout is not None
        with process.stdout:
            while events := os.read(process.stdout.fileno(), 256):
                if LISTENING in events:
                    self._ready[k].set()
                if RELEASED in events:
                    self.on_released()


def run_child(
    start: Callable[[Settings, Callable[[], None]], Callable[[], None]],
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
) -> int:
    """The child's side: read the settings, ``start(settings, released)`` the receiver (it
    returns the stop function), say it listens, and stop at EOF on stdin (or SIGTERM, which
    the caller turns into closing stdin's wait)."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    settings = Settings.model_validate_json(stdin.readline())
    lock = threading.Lock()

    def say(event: bytes) -> None:
        with lock, contextlib.suppress(OSError, ValueError):  # the parent is gone: EOF stops us
            stdout.write(event)
            stdout.flush()

    stop = start(settings, lambda: say(RELEASED))
    say(LISTENING)
    try:
        while stdin.read(4096):
            pass  # nothing more is sent; EOF means the serve has gone
    finally:
        stop()
    return 0
