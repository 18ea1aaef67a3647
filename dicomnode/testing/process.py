"""``dicomnode serve`` as a child process, for restart and crash tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.testing.peers import LOOPBACK, free_port, wait_for_port


def node_env(storage: Path, port: int, **settings: str) -> dict[str, str]:
    """Environment for a node on loopback: ``settings`` are NODE keys, e.g. min_free_disk_mb."""
    env = {
        **os.environ,
        "DICOMNODE_NODE__HOST": LOOPBACK,
        "DICOMNODE_NODE__PORT": str(port),
        "DICOMNODE_NODE__STORAGE_DIR": str(storage),
        "DICOMNODE_NODE__MIN_FREE_DISK_MB": "1",
        "DICOMNODE_API__PORT": "0",  # the HTTP API on any free port, never a fixed one
    }
    env.pop("DICOMNODE_CONFIG", None)
    env.update({f"DICOMNODE_NODE__{key.upper()}": value for key, value in settings.items()})
    return env


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a ``dicomnode`` command in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.testing.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class ServeProcess:
    """A running ``dicomnode serve``; ``kill()`` is SIGKILL, as a crash."""

    def __init__(
        self,
        storage: Path,
        port: int | None = None,
        *,
        config: Path | None = None,
        **settings: str,
    ) -> None:
        self.storage = storage
        self.port = port or free_port()
        self.env = node_env(storage, self.port, **settings)
        if config is not None:
            self.env["DICOMNODE_CONFIG"] = str(config)
        self.log = storage.parent / f"{storage.name}-serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        self.storage.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.testing.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        wait_for_port(self.port, timeout=60)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)
        self.process = None


@contextmanager
def serve(
    storage: Path, port: int | None = None, *, config: Path | None = None, **settings: str
) -> Iterator[ServeProcess]:
    process = ServeProcess(storage, port, config=config, **settings).start()
    try:
        yield process
    finally:
        process.stop()


def child_pids(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (Linux: listed by the thread that started each)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def running(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
