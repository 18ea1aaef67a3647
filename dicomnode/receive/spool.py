"""The spool: received files, placed atomically and durably.

Layout under the storage directory::

    incoming/                     files being received (never acknowledged yet)
    spool/<study>/<series>/<sop>.dcm

A file reaches ``spool/`` by a rename after fsync, and the rename is made durable by an fsync of
its directory, so an acknowledged instance survives a crash or a power cut, and a reader never
sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import struct
from pathlib import Path

from dicomnode.domain import InstanceHeader
from dicomnode.errors import OutOfResources, StoreFailed

logger = logging.getLogger(__name__)

DIR_MODE = 0o750


class Spool:
    """Where instances live on disk."""

    def __init__(self, storage_dir: Path) -> None:
        self.root = storage_dir.resolve()
        self.incoming = self.root / "incoming"
        self.data = self.root / "spool"

    def prepare(self) -> int:
        """Create the folders and drop files left in ``incoming/`` by a crash; return how many."""
        for folder in (self.root, self.incoming, self.data):
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        stale = 0
        for leftover in self.incoming.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                stale += 1
        if stale:
            logger.info(
                "Removed %d partial files left by an earlier run",
                stale,
                extra={"action": "spool_cleanup"},
            )
        return stale

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
        target = self.root / relative
        try:
            self._make_parents(target.parent)
            try:
                os.replace(received, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_into_place(received, target)
            _fsync_dir(target.parent)
            return target.stat().st_size
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResources(f"disk full while storing: {exc.strerror}") from exc
            raise StoreFailed(f"could not write to the spool: {exc.strerror}") from exc

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
            _fsync_dir(level.parent)

    def _copy_into_place(self, received: Path, target: Path) -> None:
        """Received on another filesystem: copy next to the target, fsync, then rename."""
        temporary = self.incoming / (target.name + ".part")
        shutil.copyfile(received, temporary)
        fsync_file(temporary)
        os.replace(temporary, target)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (any descriptor of the inode will do on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
