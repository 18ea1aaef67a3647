"""The C-STORE pipeline: disk guard, inflation, validation, duplicate policy, spool, index.

Only when the file is durably in the spool and its rows are committed does the caller answer
Success, so an acknowledged instance is never lost. The same instance arriving at two receivers
at once is a duplicate for the one that loses the race (per ``duplicate_policy``), never a
failure.

Group commit: one writer at a time per process writes the index, and the instances that arrive
while it works wait for it, then go together in the next transaction: one COMMIT (SQLite: one
WAL fsync) and one fsync per spool folder for all of them, each instance still answered only
once its own file and rows are durable. Under one sender a batch is one instance, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom.uid import UID
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import DuplicatePolicy
from dicomnode.db import writer
from dicomnode.domain import InstanceHeader, Peer, StoredInstance
from dicomnode.durable import fsync_file
from dicomnode.errors import OutOfResources, StoreFailed
from dicomnode.receive.inflate import inflate_in_place
from dicomnode.receive.spool import Spool
from dicomnode.receive.validate import Limits, read_header

logger = logging.getLogger(__name__)

#: at most this many instances in one transaction (the rest wait for the next one)
MAX_BATCH = 64


@dataclass
class _Pending:
    """An instance waiting for the writer: what to index, and, once written, the outcome."""

    received: Path
    header: InstanceHeader
    relative: str
    size: int
    peer: Peer
    association_pk: int | None
    placed: bool = False  # moved into the spool (by a batch that then rolled back, perhaps)
    done: bool = False
    result: StoredInstance | None = None
    previous_path: str | None = None  # the file a replacement superseded, to remove
    error: BaseException | None = None


class InstanceStore:
    """Stores received instances; safe to call from many association threads at once."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        *,
        duplicate_policy: DuplicatePolicy,
        min_free_bytes: int,
        limits: Limits | None = None,
        max_inflated_bytes: int = 512 << 20,
    ) -> None:
        self.spool = spool
        self.limits = limits or Limits()
        self.max_inflated_bytes = max_inflated_bytes
        self.sessions = sessions
        self.duplicate_policy = duplicate_policy
        self.min_free_bytes = min_free_bytes
        # One writer at a time keeps the duplicate decision, the rename and the index row together.
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._index = writer.IndexWriter()
        #: transactions and instances written (the batches' mean size shows group commit at work)
        self.transactions = self.written = 0

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
        transfer_syntax: str,
        peer: Peer,
        association_pk: int | None,
        expected_study: str | None = None,
    ) -> StoredInstance:
        """Validate and store one received file, sent in the presentation context's
        ``transfer_syntax`` (with ``expected_study``: it must be of that study); raises a
        StoreRefused subclass to refuse it."""
        self.check_disk()
        if UID(transfer_syntax).is_deflated:
            inflate_in_place(received, limit=self.max_inflated_bytes, check_disk=self.check_disk)
        header = read_header(
            received,
            expected_sop_class=sop_class_uid,
            expected_sop_instance=sop_instance_uid,
            expected_study=expected_study,
            limits=self.limits,
        )
        relative = self.spool.relative_path(header)
        fsync_file(received)  # outside the lock: the slow part runs in parallel
        item = _Pending(received, header, relative, received.stat().st_size, peer, association_pk)
        with self._queue_lock:
            self._queue.append(item)
        with self._lock:
            # The writer before us may have taken our instance into its batch; if not, we are
            # the writer, for everything that queued meanwhile.
            while not item.done:
                with self._queue_lock:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self._write(batch)
        if item.error is not None:
            raise item.error
        assert item.result is not None
        if item.previous_path is not None and item.previous_path != relative:
            self.spool.remove(item.previous_path)  # a replacement moved to another study/series
        return item.result

    def _write(self, batch: list[_Pending]) -> None:
        """Write a batch in one transaction; if that fails, each instance alone (so one bad
        instance, or one lost race, is refused or a duplicate alone). Every instance of the
        batch is done on return: its waiting thread answers it."""
        try:
            if len(batch) > 1:
                try:
                    self._transaction(batch)
                    return
                except Exception:
                    self._index.forget()  # rolled back: cached keys may name rows never written
            for item in batch:
                self._write_alone(item)
        finally:
            for item in batch:
                if not item.done:  # the writer itself was interrupted
                    item.error, item.done = StoreFailed("the index writer was interrupted"), True

    def _write_alone(self, item: _Pending) -> None:
        try:
            try:
                self._transaction([item])
            except IntegrityError:
                self._index.forget()
                if not self._indexed(item.header.sop_instance_uid):
                    raise  # not a race on the instance: a refused row (a foreign key...)
                # Another receiver (process or host) indexed the same instance between our
                # lookup and our insert: run again, and the lookup finds it (a duplicate, or,
                # to replace, its row). Our file was not placed: the row comes first.
                logger.info(
                    "Instance indexed concurrently by another receiver; storing it again as "
                    "a duplicate",
                    extra={"action": "store_race"},
                )
                self._transaction([item])
        except Exception as exc:
            self._index.forget()
            item.error, item.done = _refusal(exc), True

    def _transaction(self, batch: list[_Pending]) -> None:
        """One transaction for ``batch``: per instance the duplicate decision, the rows, then
        the file into place; then one fsync per folder, then the COMMIT. Sets each instance's
        result once committed.

        The rows are written before the file is moved: a concurrent writer of the same instance
        in another process then waits on our row (PostgreSQL: the unique key, or the row lock
        of a replacement; SQLite: the write lock) and fails or follows after we commit, so it
        never replaces our file under our row, and the file in place is the committed row's.
        """
        outcomes: list[tuple[_Pending, StoredInstance, str | None]] = []
        folders: set[Path] = set()
        with self._index_transaction() as writes:
            for item in batch:
                header = item.header
                existing = writes.lookup(header.sop_instance_uid)  # sees this batch's rows too
                if existing is not None and self.duplicate_policy is DuplicatePolicy.KEEP_FIRST:
                    duplicate = StoredInstance(header, existing.path, existing.size_bytes,
                                               existing.received_at, duplicate=True)  # fmt: skip
                    outcomes.append((item, duplicate, None))
                    continue
                # Read the clock holding the write locks, so instances indexed later have later
                # receive times (the series' and study's last_received_at follow).
                now = datetime.now(UTC)
                writes.record(
                    header,
                    path=item.relative,
                    size_bytes=item.size,
                    peer=item.peer,
                    association_pk=item.association_pk,
                    received_at=now,
                    existing=existing,
                )
                if item.placed:  # by a batch that rolled back: the file is there already
                    folders.add(self.spool.path(item.relative).parent)
                else:
                    folders.add(self.spool.place(item.received, item.relative))
                    item.placed = True
                stored = StoredInstance(header, item.relative, item.size, now)
                outcomes.append((item, stored, existing.path if existing is not None else None))
            self.spool.sync_folders(folders)
        self.transactions += 1
        self.written += len(batch)
        for item, stored, previous in outcomes:
            item.result, item.previous_path, item.done = stored, previous, True

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


def _refusal(exc: BaseException) -> BaseException:
    """What the association answers: an index error refuses the instance (0xA701)."""
    if isinstance(exc, SQLAlchemyError):
        failed = StoreFailed(f"could not index the instance: {type(exc).__name__}")
        failed.__cause__ = exc
        return failed
    return exc


__all__ = ["InstanceStore", "OutOfResources"]
