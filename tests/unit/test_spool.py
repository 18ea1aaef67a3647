"""Receivers sharing one spool: each owns its in-transit files (issue 15)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dicomnode.receive.spool import LEGACY_PARTIAL_AGE_S, Spool


def test_a_restarting_receiver_keeps_the_files_another_one_is_receiving(tmp_path: Path) -> None:
    # Two receivers on one storage folder (NFS, two containers both PID 1): B restarts while A
    # is receiving. Before receiver folders, B's prepare() emptied the shared incoming/.
    a, b = Spool(tmp_path, "recv-a"), Spool(tmp_path, "recv-b")
    a.prepare()
    b.prepare()
    arriving = a.new_incoming()
    arriving.write_bytes(b"half a dataset")
    assert Spool(tmp_path, "recv-b").prepare() == 0
    assert arriving.exists()
    assert arriving.parent == tmp_path.resolve() / "incoming" / "recv-a"


def test_a_receiver_removes_what_its_own_earlier_run_left(tmp_path: Path) -> None:
    first = Spool(tmp_path, "recv-a")
    first.prepare()
    left = [first.new_incoming() for _ in range(2)]
    for path in left:
        path.write_bytes(b"partial")
    other = Spool(tmp_path, "recv-b")
    other.prepare()
    theirs = other.new_incoming()
    theirs.write_bytes(b"partial")
    assert Spool(tmp_path, "recv-a").prepare() == 2
    assert not any(path.exists() for path in left)
    assert theirs.exists()


def test_names_are_unique_across_runs_of_one_receiver_without_the_pid(tmp_path: Path) -> None:
    runs = [Spool(tmp_path, "recv-a") for _ in range(3)]
    names = [spool.new_incoming().name for spool in runs for _ in range(100)]
    assert len(set(names)) == len(names)
    assert not any(str(os.getpid()) in name.split("-")[0] for name in names)


def test_partial_files_of_versions_before_receiver_folders_go_once_old(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "recv-a")
    spool.prepare()
    old, recent = tmp_path / "incoming" / "1-7f00-1.part", tmp_path / "incoming" / "1-7f00-2.part"
    old.write_bytes(b"x")
    recent.write_bytes(b"x")  # perhaps an old-version receiver beside us, still writing it
    long_ago = time.time() - LEGACY_PARTIAL_AGE_S - 60
    os.utime(old, (long_ago, long_ago))
    assert Spool(tmp_path, "recv-a").prepare() == 1
    assert not old.exists() and recent.exists()
