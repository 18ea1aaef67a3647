"""Making file-system changes survive a power loss: a file's data, and a folder's entries (the
renames that put files in place). Shared by the spool and the workers' result folders."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (any descriptor of the inode will do on POSIX)."""
    _fsync(path, os.O_RDONLY)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries, so a rename or a new file in it is durable."""
    _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
