"""The C-STORE pipeline: disk guard, validation, duplicate policy, spool, index.

Only when the file is durably in the spool and its rows are committed does the caller answer
Success, so an acknowledged instance is never lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import DuplicatePolicy
from dicomnode.db import writer
from dicomnode.domain import Peer, StoredInstance
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
        with self._lock:
            try:
                with self._index_transaction() as writes:
                    existing = writes.lookup(header.sop_instance_uid)
                    if existing is not None and self.duplicate_policy is DuplicatePolicy.KEEP_FIRST:
                        return StoredInstance(
                            header,
                            existing.path,
                            existing.size_bytes,
                            existing.received_at,
                            duplicate=True,
                        )
                    # Read the clock holding the write locks, so instances indexed later have
                    # later receive times (the series' and study's last_received_at follow).
                    now = datetime.now(UTC)
                    previous_path = existing.path if existing is not None else None
                    size = self.spool.commit(received, relative)
                    writes.record(
                        header,
                        path=relative,
                        size_bytes=size,
                        peer=peer,
                        association_pk=association_pk,
                        received_at=now,
                        existing=existing,
                    )
            except SQLAlchemyError as exc:
                self._index.forget()  # rolled back: cached keys may name rows that never were
                raise StoreFailed(f"could not index the instance: {type(exc).__name__}") from exc
            except BaseException:
                self._index.forget()
                raise
        if previous_path is not None and previous_path != relative:
            self.spool.remove(previous_path)  # a replacement moved to another study or series
        return StoredInstance(header, relative, size, now)

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
