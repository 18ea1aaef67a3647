"""The spool: received files, placed atomically and durably.

Layout under the storage directory::

    incoming/<receiver_id>/       files being received by one receiver (never acknowledged yet)
    spool/<study>/<series>/<sop>.dcm

Several receivers (hosts, containers, ``serve --processes``) may share one storage directory;
each writes and cleans only its own ``incoming/<receiver_id>/``, so a receiver that restarts
never deletes a file another one is receiving. Names in it are unique without the process id
(containers all run as PID 1).

A file reaches ``spool/`` by a rename after fsync, and the rename is made durable by an fsync of
its directory, so an acknowledged instance survives a crash or a power cut, and a reader never
sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import secrets
import shutil
import struct
import time
from pathlib import Path

from dicomnode.config import default_receiver_id
from dicomnode.domain import InstanceHeader
from dicomnode.durable import fsync_dir, fsync_file
from dicomnode.errors import OutOfResources, StoreFailed, StoreRefused

logger = logging.getLogger(__name__)

DIR_MODE = 0o750
#: files directly in ``incoming/`` come from versions before receiver folders; one this old is
#: no longer being written by a receiver of such a version still running beside us
LEGACY_PARTIAL_AGE_S = 24 * 3600.0


class Spool:
    """Where instances live on disk; ``receiver_id`` names this receiver's ``incoming/`` folder."""

    def __init__(self, storage_dir: Path, receiver_id: str | None = None) -> None:
        self.root = storage_dir.resolve()
        self.receiver_id = receiver_id or default_receiver_id()
        self.incoming = self.root / "incoming" / self.receiver_id
        self.data = self.root / "spool"
        # Unique among this receiver's runs (a random run token) and within a run (a counter).
        self._run = secrets.token_hex(6)
        self._serial = itertools.count(1)

    def prepare(self) -> int:
        """Create the folders and drop the files this receiver's earlier run left in its
        ``incoming/<receiver_id>/`` (it died receiving them); return how many."""
        for folder in (self.root, self.incoming, self.data):
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        stale = 0
        for leftover in self.incoming.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                stale += 1
        cutoff = time.time() - LEGACY_PARTIAL_AGE_S
        for leftover in self.incoming.parent.iterdir():
            with contextlib.suppress(OSError):  # another receiver removed it first
                if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    stale += 1
        if stale:
            logger.info(
                "Removed %d partial files left by an earlier run of receiver %s",
                stale,
                self.receiver_id,
                extra={"action": "spool_cleanup"},
            )
        return stale

    def new_incoming(self) -> Path:
        """A fresh name in this receiver's ``incoming/`` folder, for one arriving instance."""
        return self.incoming / f"{self._run}-{next(self._serial)}.part"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    @staticmethod
    def relative_path(header: InstanceHeader) -> str:
        """Where an instance lives, relative to the storage directory (UIDs are validated)."""
        return (
            f"spool/{header.study_instance_uid}/{header.series_instance_uid}/"
            f"{header.sop_instance_uid}.dcm"
        )

    def path(self, relative: str) -> Path:
        return self.root / relative

    def commit(self, received: Path, relative: str) -> int:
        """Move a received, fsynced file into place durably; return its size in bytes."""
        folder = self.place(received, relative)
        self.sync_folders({folder})
        return (self.root / relative).stat().st_size

    def place(self, received: Path, relative: str) -> Path:
        """Move a received, fsynced file into place; return its folder, which
        :meth:`sync_folders` must fsync before the file counts as durable (once per folder for
        many files: group commit)."""
        target = self.root / relative
        try:
            self._make_parents(target.parent)
            try:
                os.replace(received, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_into_place(received, target)
        except OSError as exc:
            raise _spool_error(exc) from exc
        return target.parent

    def sync_folders(self, folders: set[Path]) -> None:
        """Make the renames into ``folders`` durable."""
        try:
            for folder in folders:
                fsync_dir(folder)
        except OSError as exc:
            raise _spool_error(exc) from exc

    def remove(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def remove_empty_folders(self, relative: str) -> None:
        """Remove a study's folder and its series folders once their files are gone."""
        folder = self.root / relative
        if not folder.is_dir():
            return
        for series in folder.iterdir():
            if series.is_dir():
                with contextlib.suppress(OSError):  # not empty: something arrived meanwhile
                    series.rmdir()
        with contextlib.suppress(OSError):
            folder.rmdir()

    def _make_parents(self, folder: Path) -> None:
        if folder.is_dir():
            return
        # Create each missing level and fsync its parent, so the new entries are durable too.
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for level in reversed(missing):
            try:
                level.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue
            fsync_dir(level.parent)

    def _copy_into_place(self, received: Path, target: Path) -> None:
        """Received on another filesystem: copy next to the target, fsync, then rename."""
        temporary = self.new_incoming()
        shutil.copyfile(received, temporary)
        fsync_file(temporary)
        os.replace(temporary, target)


def _spool_error(exc: OSError) -> StoreRefused:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfResources(f"disk full while storing: {exc.strerror}")
    return StoreFailed(f"could not write to the spool: {exc.strerror}")


def file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version: str,
    source_aet: str = "",
) -> bytes:
    """Preamble, "DICM" and the File Meta group (PS3.10 7.1) for a received dataset.

    Encoded by hand: it is a fixed handful of elements, written once per instance on the
    receive path, where building it with pydicom costs more than the rest of the header work.
    """
    elements = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0"))
        + _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0"))
        + _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0"))
        + _meta_element(0x0012, b"UI", _padded(implementation_class_uid, b"\0"))
        + _meta_element(0x0013, b"SH", _padded(implementation_version, b" "))
    )  # fmt: skip
    if source_aet:
        elements += _meta_element(0x0016, b"AE", _padded(source_aet, b" "))
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\0" * 128 + b"DICM" + group_length + elements


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw
