"""A private PostgreSQL server for tests: its own data folder, on a free loopback port."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.testing.peers import LOOPBACK, free_port, wait_for_port
from dicomnode.testing.waiting import wait_until


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (Debian layout), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    return Path(found[-1]).parent if found else None


def _as_postgres(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root; run them as the postgres account."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _wait_until_accepting(bin_dir: Path, port: int, timeout: float) -> None:
    """pg_isready answers at once, "rejecting connections", while the server still starts."""

    def accepting() -> bool:
        ready = subprocess.run(
            _as_postgres([str(bin_dir / "pg_isready"), "-h", LOOPBACK, "-p", str(port)]),
            capture_output=True,
        )
        return ready.returncode == 0

    wait_until(
        accepting, timeout=timeout, interval=0.1, what=f"PostgreSQL on port {port} accepting"
    )


class PostgresServer:
    """A private server in a temporary folder; it can be stopped and started again on the same
    port and data (a database outage)."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
        self.data = self.folder / "data"
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"
        self.process: subprocess.Popen[bytes] | None = None
        subprocess.run(
            _as_postgres(
                [str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                 "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )  # fmt: skip

    def start(self) -> PostgresServer:
        self.process = subprocess.Popen(
            _as_postgres(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={LOOPBACK}",
                    "-c",
                    f"unix_socket_directories={self.folder}",
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=60)
        _wait_until_accepting(self.bin_dir, self.port, timeout=60)
        return self

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open connections are cut, as in a database restart."""
        if self.process is not None:
            # through pg_ctl: runuser passes SIGTERM on to the server, but not SIGINT
            subprocess.run(
                _as_postgres(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast"]
                ),
                capture_output=True,
                timeout=60,
                check=False,
            )
            self.process.wait(timeout=60)
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL (psycopg 3) to a fresh database; the server is removed after."""
    server = PostgresServer()
    try:
        yield server.start().url
    finally:
        server.remove()
