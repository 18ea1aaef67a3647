"""The C-STORE pipeline: disk guard, validation, duplicate policy, spool, index.

Only when the file is durably in the spool and its rows are committed does the caller answer
Success, so an acknowledged instance is never lost. The same instance arriving at two receivers
at once is a duplicate for the one that loses the race (per ``duplicate_policy``), never a
failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import DuplicatePolicy
from dicomnode.db import writer
from dicomnode.domain import InstanceHeader, Peer, StoredInstance
from dicomnode.errors import OutOfResources, StoreFailed
from dicomnode.receive.spool import Spool, fsync_file
from dicomnode.receive.validate import read_header

logger = logging.getLogger(__name__)


class InstanceStore:
    """Stores received instances; safe to call from many association threads at once."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        *,
        duplicate_policy: DuplicatePolicy,
        min_free_bytes: int,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.duplicate_policy = duplicate_policy
        self.min_free_bytes = min_free_bytes
        # One writer at a time keeps the duplicate decision, the rename and the index row together.
        self._lock = threading.Lock()
        self._index = writer.IndexWriter()

    def check_disk(self) -> None:
        free = self.spool.free_bytes()
        if free < self.min_free_bytes:
            raise OutOfResources(
                f"free disk space {free // 2**20} MB is below the floor of "
                f"{self.min_free_bytes // 2**20} MB"
            )

    def store(
        self,
        received: Path,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        peer: Peer,
        association_pk: int | None,
    ) -> StoredInstance:
        """Validate and store one received file; raises a StoreRefused subclass to refuse it."""
        self.check_disk()
        header = read_header(
            received, expected_sop_class=sop_class_uid, expected_sop_instance=sop_instance_uid
        )
        relative = self.spool.relative_path(header)
        fsync_file(received)  # outside the lock: the slow part runs in parallel
        size = received.stat().st_size
        with self._lock:
            try:
                try:
                    stored, previous_path = self._index_and_place(
                        received, header, relative, size, peer, association_pk
                    )
                except IntegrityError:
                    self._index.forget()
                    if not self._indexed(header.sop_instance_uid):
                        raise  # not a race on the instance: a refused row (a foreign key...)
                    # Another receiver (process or host) indexed the same instance between our
                    # lookup and our insert: run again, and the lookup finds it (a duplicate,
                    # or, to replace, its row). Our file was not placed: the row comes first.
                    logger.info(
                        "Instance indexed concurrently by another receiver; storing it again "
                        "as a duplicate",
                        extra={"action": "store_race"},
                    )
                    stored, previous_path = self._index_and_place(
                        received, header, relative, size, peer, association_pk
                    )
            except SQLAlchemyError as exc:
                self._index.forget()  # rolled back: cached keys may name rows that never were
                raise StoreFailed(f"could not index the instance: {type(exc).__name__}") from exc
            except BaseException:
                self._index.forget()
                raise
        if previous_path is not None and previous_path != relative:
            self.spool.remove(previous_path)  # a replacement moved to another study or series
        return stored

    def _index_and_place(
        self,
        received: Path,
        header: InstanceHeader,
        relative: str,
        size: int,
        peer: Peer,
        association_pk: int | None,
    ) -> tuple[StoredInstance, str | None]:
        """One transaction: the duplicate decision, the rows, then the file into place; the
        stored instance and the path of the file it replaced (if any).

        The rows are written before the file is moved: a concurrent writer of the same instance
        in another process then waits on our row (PostgreSQL: the unique key, or the row lock
        of a replacement; SQLite: the write lock) and fails or follows after we commit, so it
        never replaces our file under our row, and the file in place is the committed row's.
        """
        with self._index_transaction() as writes:
            existing = writes.lookup(header.sop_instance_uid)
            if existing is not None and self.duplicate_policy is DuplicatePolicy.KEEP_FIRST:
                duplicate = StoredInstance(
                    header, existing.path, existing.size_bytes, existing.received_at, duplicate=True
                )
                return duplicate, None
            # Read the clock holding the write locks, so instances indexed later have later
            # receive times (the series' and study's last_received_at follow).
            now = datetime.now(UTC)
            writes.record(
                header,
                path=relative,
                size_bytes=size,
                peer=peer,
                association_pk=association_pk,
                received_at=now,
                existing=existing,
            )
            self.spool.commit(received, relative)
        return StoredInstance(header, relative, size, now), (
            existing.path if existing is not None else None
        )

    def _indexed(self, sop_instance_uid: str) -> bool:
        with self._index_transaction() as writes:
            return writes.lookup(sop_instance_uid) is not None

    @contextmanager
    def _index_transaction(self) -> Iterator[writer.IndexWrites]:
        """One index transaction, committed durably on leaving (see dicomnode.db.session)."""
        bind = self.sessions.kw.get("bind")
        if isinstance(bind, Engine):
            with self._index.transaction(bind) as writes:
                yield writes
        else:  # a factory bound otherwise: through a Session
            with self.sessions.begin() as session:
                yield self._index.on(session.connection())


__all__ = ["InstanceStore", "OutOfResources"]
