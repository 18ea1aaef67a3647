"""Extra receiver processes on one DICOM port: ``serve --processes N`` (``[node] processes``).

One Python process receives at ~3-4 ms of CPU per instance, so one receiver is one core. With
N > 1 the serve starts N-1 children that run the receiver alone (no intake, workers, API or
sender) on the same port: every listening socket sets SO_REUSEPORT and the kernel (Linux)
spreads new connections over them. They share the index database and the spool; child ``k`` is
receiver ``<receiver_id>-<k>``, with its own ``incoming/`` folder and associations.

They are children of the serve as :mod:`dicomnode.children` runs them: the settings as one JSON
line on stdin; at EOF (the serve stopped, or died even by SIGKILL) the child stops; on stdout
``L`` once listening and ``R`` when an association that stored instances ended (the serve's
intake then sweeps at once, as for its own associations). One that dies is restarted with
backoff: the other processes keep the port served meanwhile, and its restart closes the
associations it died holding as lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import IO

from dicomnode.children import (
    DEFAULT_COMMAND,
    READY,
    START_TIMEOUT_S,
    Parent,
    Supervisor,
    child_command,
)
from dicomnode.config import Settings
from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)

#: the hidden ``serve`` flag that makes a process such a child
CHILD_FLAG = "--receiver-child"
LISTENING, RELEASED = READY, b"R"


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

    def __init__(
        self,
        settings: Settings,
        on_released: Callable[[], None],
        *,
        command: Sequence[str] = DEFAULT_COMMAND,
    ) -> None:
        self.settings = settings
        self.count = settings.node.processes - 1
        self.on_released = on_released
        self.command = tuple(command)
        self._port = 0
        self._numbers = {settings.node.process_receiver_id(k): k for k in range(1, self.count + 1)}
        self._children = Supervisor(
            "receiver",
            list(self._numbers),
            child_command(self.command, "serve", CHILD_FLAG),
            assignment=self._assignment,
            on_event=self._event,
        )

    @property
    def pids(self) -> dict[int, int]:
        """Child ``k`` -> its process id, for those running now."""
        return {self._numbers[name]: pid for name, pid in self._children.pids.items()}

    def start(self, port: int, timeout: float = START_TIMEOUT_S) -> None:
        """Start the children on ``port`` (the parent's bound port) and wait until each
        listens; raise ReceiverProcessFailed (stopping those started) if one does not."""
        self._port = port
        self._children.start()
        late = self._children.wait_ready(timeout)
        if late:
            self.stop()
            raise ReceiverProcessFailed(
                f"receiver process {late[0]!r} did not listen on port {port} within "
                f"{timeout:g} s (see its log lines above)"
            )
        logger.info(
            "%d more receiver processes listening on port %d",
            self.count,
            port,
            extra={"action": "receiver_processes"},
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the children to stop (they finish what they hold), then wait; those still
        running after ``timeout`` are killed."""
        self._children.stop(timeout)

    def _assignment(self, name: str, pid: int) -> bytes:
        settings = child_settings(self.settings, self._numbers[name], self._port)
        return settings.model_dump_json().encode()

    def _event(self, name: str, events: bytes) -> None:
        if RELEASED in events:
            self.on_released()


def run_child(
    start: Callable[[Settings, Callable[[], None]], Callable[[], None]],
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
) -> int:
    """The child's side: read the settings, ``start(settings, released)`` the receiver (it
    returns the stop function), say it listens, and stop when the serve asks or goes (or at
    SIGTERM, which the caller turns into leaving the wait)."""
    parent = Parent(stdin, stdout)
    settings = Settings.model_validate_json(parent.assignment())
    stop = start(settings, lambda: parent.say(RELEASED))
    parent.say(LISTENING)
    try:
        parent.wait()  # asked to stop, or the serve has gone: stop either way
    finally:
        stop()
    return 0
