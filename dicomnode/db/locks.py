"""Named tasks that run in one process at a time across every process on the database.

Several ``dicomnode serve`` processes share one database and one spool; each schedules the
intake sweep, the spool retention and the queue purge. Run at once they collide (two sweeps
insert the same series' intake row) or do the work twice. :meth:`TaskLocks.hold` takes a lock
by name without waiting, and a process that does not get it skips its turn: the holder does the
work, and the next tick of the others picks up whatever is left.

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection kept for
  the task's duration. The server releases it when that connection ends, so a killed holder
  frees it as soon as its socket closes.
- SQLite: ``flock`` on a lock file beside the database file (one per name), released by the
  kernel when the holder's process ends. An in-memory database has one process: a lock in it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, text

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
#: in-memory SQLite (one process): name -> lock
_LOCAL: dict[str, threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()


def advisory_key(name: str) -> int:
    """The PostgreSQL advisory lock key of ``name``: a signed 64-bit int, the same in every
    process and release (the first 8 bytes of a SHA-256 of the name)."""
    digest = hashlib.sha256(f"dicomnode:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class TaskLocks:
    """Exclusive, non-blocking locks by name, for the processes that share ``engine``'s
    database."""

    engine: Engine

    @contextmanager
    def hold(self, name: str) -> Iterator[bool]:
        """True while this caller holds ``name`` (released on leaving, also on an exception);
        False, at once, while another process or thread holds it."""
        if not _NAME.match(name):
            raise ValueError(f"task lock name {name!r}: use 1 to 100 letters, digits, '._-'")
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            held = self._postgres(name)
        elif dialect == "sqlite":
            held = self._sqlite(name)
        else:
            raise ValueError(f"task locks need PostgreSQL or SQLite, not {dialect!r}")
        with held as got:
            yield got

    def exclusively(self, name: str, task: Callable[[], object]) -> Callable[[], None]:
        """``task`` as a function that runs it only when it gets ``name``, else skips (the
        periodic jobs of several processes)."""

        def run() -> None:
            with self.hold(name) as held:
                if held:
                    task()
                    return
            logger.debug(
                "%s skipped: another process runs it", name, extra={"action": "task_skipped"}
            )

        run.__name__ = f"exclusive_{name}"
        return run

    @contextmanager
    def _postgres(self, name: str) -> Iterator[bool]:
        key = advisory_key(name)
        connection = self.engine.connect()
        try:
            got = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
            connection.commit()  # the lock is the session's: no transaction left open meanwhile
            if not got:
                yield False
                return
            try:
                yield True
            finally:
                _unlock(connection, key, name)
        finally:
            connection.close()

    @contextmanager
    def _sqlite(self, name: str) -> Iterator[bool]:
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            with _LOCAL_GUARD:
                lock = _LOCAL.setdefault(name, threading.Lock())
            if not lock.acquire(blocking=False):
                yield False
                return
            try:
                yield True
            finally:
                lock.release()
            return
        path = lock_file(Path(database), name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True  # closing the descriptor below releases the lock
        finally:
            os.close(fd)


def lock_file(database: Path, name: str) -> Path:
    """The lock file of ``name`` beside a SQLite database file: ``<database>.<name>.lock``."""
    return database.with_name(f"{database.name}.{name}.lock")


def _unlock(connection: Connection, key: int, name: str) -> None:
    """Release the advisory lock; a connection that cannot is dropped, never pooled holding it
    (the server frees the lock when the connection ends)."""
    try:
        connection.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        connection.commit()
    except Exception:
        logger.warning(
            "task lock %s could not be released; dropping its connection",
            name,
            exc_info=True,
            extra={"action": "task_lock_release_failed"},
        )
        connection.invalidate()
