"""Child processes that ``serve`` keeps running beside itself: its extra receivers
(``--processes``) and its workers (``[[workers]]``, :mod:`dicomnode.queue.processes`).

A child runs the serve's own command line (``python -m dicomnode.cli``, or the tests'
``python -m dicomnode.testing.cli`` with its test models) with a hidden flag, and talks to the
serve over its standard streams:

- stdin: one line (the child's assignment: its settings as JSON), then nothing until the serve
  stops, when it writes ``stop`` and closes the pipe. EOF without ``stop`` means the serve died
  (even by SIGKILL): a child never outlives its serve.
- stdout: one byte per event: ``L`` once ready (listening, models loaded); the others are the
  child kind's own.

stderr is the serve's, so the children log where the serve logs. A child that dies (a crash,
the out-of-memory killer) is logged and restarted after 1 s, doubling to 30 s while it keeps
dying young; the serve itself, and the other children, run on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from dicomnode.config import CONFIG_ENV, ENV_PREFIX, Settings

logger = logging.getLogger(__name__)

READY = b"L"
STOP = b"stop"
START_TIMEOUT_S = 60.0
RESTART_DELAY_S, MAX_RESTART_DELAY_S = 1.0, 30.0
#: a child that ran this long before dying was not dying young: restart it after the first delay
STABLE_S = 60.0
#: what runs ``dicomnode`` when the caller names nothing else
DEFAULT_COMMAND = (sys.executable, "-m", "dicomnode.cli")


def child_command(command: Sequence[str], *args: str) -> list[str]:
    """``command`` (a ``dicomnode`` command line) at this process's log level, with ``args``."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return [*command, "--log-level", level, *args]


def settings_free_environ() -> dict[str, str]:
    """This process's environment less what the settings read (``DICOMNODE_NODE__...``, the
    config file): the settings travel on stdin, whole, and the environment would apply again
    over them. Other variables (``DICOMNODE_TEST_RUN_LOG``, CUDA's) pass on."""
    fields = set(Settings.model_fields)

    def read_by_settings(key: str) -> bool:
        if key == CONFIG_ENV:
            return True
        if not key.startswith(ENV_PREFIX):
            return False
        return key[len(ENV_PREFIX) :].split("__")[0].lower() in fields

    return {key: value for key, value in os.environ.items() if not read_by_settings(key)}


def describe_exit(code: int) -> str:
    """``killed by SIGKILL`` or ``exit status 2``, from a Popen return code."""
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Supervisor:
    """Starts one child per name, restarts each when it dies, and stops them all.

    ``assignment(name, pid)`` is the first line a child reads; ``on_event(name, events)`` gets
    what it writes to stdout (ready events included); ``on_exit(name, pid, code)`` runs after a
    child died while the serve was not stopping, before its restart."""

    def __init__(
        self,
        kind: str,
        names: Sequence[str],
        argv: Sequence[str],
        *,
        assignment: Callable[[str, int], bytes],
        env: Mapping[str, str] | None = None,
        on_event: Callable[[str, bytes], None] | None = None,
        on_exit: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.kind = kind
        self.names = tuple(names)
        self.argv = list(argv)
        self.assignment = assignment
        self.env = dict(env) if env is not None else settings_free_environ()
        self.on_event = on_event
        self.on_exit = on_exit
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._ready = {name: threading.Event() for name in self.names}
        self._threads: list[threading.Thread] = []

    @property
    def pids(self) -> dict[str, int]:
        """Child name -> its process id, for those running now."""
        with self._lock:
            return {n: p.pid for n, p in self._processes.items() if p.poll() is None}

    def alive(self, name: str) -> bool:
        with self._lock:
            process = self._processes.get(name)
        return process is not None and process.poll() is None

    def start(self) -> None:
        """Start every child (each in its own watching thread); returns at once."""
        for name in self.names:
            thread = threading.Thread(target=self._keep, args=(name,), name=f"{self.kind}-{name}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> list[str]:
        """Wait until each child said it is ready; the names of those that did not in time."""
        deadline = time.monotonic() + timeout
        return [
            name
            for name, ready in self._ready.items()
            if not ready.wait(max(0.0, deadline - time.monotonic()))
        ]

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every child to stop (``stop``, then EOF: each finishes what it holds), then
        wait; those still running after ``timeout`` are killed."""
        with self._lock:
            self._stopping.set()
            running = list(self._processes.values())
        for process in running:
            if process.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    process.stdin.write(STOP + b"\n")
                    process.stdin.flush()
                with contextlib.suppress(OSError):
                    process.stdin.close()
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s process (pid %d) still running %g s after it was asked to stop; killed",
                    self.kind.capitalize(),
                    process.pid,
                    timeout,
                    extra={"action": f"{self.kind}_process_killed"},
                )
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join(timeout)

    def _keep(self, name: str) -> None:
        """Run child ``name``; restart it whenever it dies, until stopped."""
        delay = RESTART_DELAY_S
        while True:
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                process = self._spawn(name)
                self._processes[name] = process
            self._follow(name, process)
            code = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_S:
                delay = RESTART_DELAY_S
            logger.error(
                "%s process %s (pid %d) exited with status %d; restarting it in %g s (%s)",
                self.kind.capitalize(),
                name,
                process.pid,
                code,
                delay,
                describe_exit(code),
                extra={"action": f"{self.kind}_process_died"},
            )
            if self.on_exit is not None:
                try:
                    self.on_exit(name, process.pid, code)
                except Exception:  # the restart matters more than the bookkeeping
                    logger.exception(
                        "%s process %s: cleaning up after its death failed",
                        self.kind.capitalize(),
                        name,
                        extra={"action": f"{self.kind}_process_cleanup_failed"},
                    )
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_DELAY_S)

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C reaches the serve, which stops them
        )
        assert process.stdin is not None
        try:
            process.stdin.write(self.assignment(name, process.pid).rstrip(b"\n") + b"\n")
            process.stdin.flush()
        except OSError:
            pass  # it died at once: its exit is seen and logged by the caller
        return process

    def _follow(self, name: str, process: subprocess.Popen[bytes]) -> None:
        """Read the child's events until it exits."""
        assert process.stdout is not None
        with process.stdout:
            while events := os.read(process.stdout.fileno(), 256):
                if READY in events:
                    self._ready[name].set()
                if self.on_event is not None:
                    self.on_event(name, events)


class Parent:
    """A child's side of the pipes to its serve."""

    def __init__(self, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> None:
        self.stdin = stdin or sys.stdin.buffer
        if stdout is None:
            # the events get the pipe to themselves: whatever else writes to stdout (a model's
            # print) goes to stderr, the serve's log, and is never read as an event
            sys.stdout.flush()
            stdout = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        self.stdout = stdout
        self._lock = threading.Lock()

    def assignment(self) -> bytes:
        """The first line: what this child is to do."""
        return self.stdin.readline()

    def say(self, event: bytes) -> None:
        """Tell the serve of an event (nothing when it has gone: its EOF stops us)."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.stdout.write(event)
            self.stdout.flush()

    def wait(self) -> bool:
        """Block until the serve asks this child to stop (True) or goes (EOF unasked: False)."""
        while line := self.stdin.readline():
            if line.strip() == STOP:
                return True
        return False

    def watch(self, stop: threading.Event, *, on_gone: Callable[[], None]) -> threading.Thread:
        """In a daemon thread: set ``stop`` when the serve asks; call ``on_gone`` when it went
        without asking."""

        def watching() -> None:
            if self.wait():
                stop.set()
            else:
                on_gone()

        thread = threading.Thread(target=watching, name="serve-watch", daemon=True)
        thread.start()
        return thread
