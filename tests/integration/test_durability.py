"""What was acknowledged stays: restarts and crashes, duplicates, the disk floor."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.process import cli, serve
from tests.helpers import instance_count, port_of, stored_instance


def _studies(env: dict[str, str]) -> list[dict[str, object]]:
    result = cli("studies", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_everything_acknowledged_survives_sigkill_and_restart(tmp_path: Path) -> None:
    files = write_series(
        ct_slices(SeriesSpec(slices=30, rows=128, columns=128, seed=21)), tmp_path / "ct"
    )
    storage = tmp_path / "node"
    with serve(storage) as node:
        result = peers.storescu(node.port, files)
        assert result.returncode == 0, result.stderr
        node.kill()  # a crash: no shutdown code runs
        before = _studies(node.env)
    assert [s["instance_count"] for s in before] == [30]
    stored = sorted(storage.glob("spool/*/*/*.dcm"))
    assert len(stored) == 30
    for path in stored:  # every file whole and readable
        assert dcmread(path).PixelData

    with serve(storage, port=node.port) as restarted:
        assert _studies(restarted.env) == before
        again = peers.storescu(restarted.port, files)  # a sender retrying after the crash
        assert again.returncode == 0, again.stderr
        assert [s["instance_count"] for s in _studies(restarted.env)] == [30]


def test_files_and_database_are_not_world_readable(tmp_path: Path) -> None:
    files = write_series(ct_slices(SeriesSpec(slices=2, seed=22)), tmp_path / "ct")
    storage = tmp_path / "node"
    with serve(storage) as node:
        assert peers.storescu(node.port, files).returncode == 0
    for path in [storage / "dicomnode.db", *storage.glob("spool/**/*")]:
        assert not os.stat(path).st_mode & stat.S_IRWXO, path


@pytest.mark.parametrize(
    "policy,expected_name", [("keep_first", "First^Copy"), ("replace", "Second^Copy")]
)
def test_duplicate_policy(
    start_node: Callable[..., Node], tmp_path: Path, policy: str, expected_name: str
) -> None:
    node = start_node(node={"duplicate_policy": policy})
    paths = []
    for name in ("First^Copy", "Second^Copy"):
        ds = next(ct_slices(SeriesSpec(slices=1, seed=23, patient_name=name)))
        (path,) = write_series([ds], tmp_path / name)
        paths.append(path)
    for path in paths:
        result = peers.storescu(port_of(node), [path])
        assert result.returncode == 0, result.stderr
    row = stored_instance(node, dcmread(paths[0]).SOPInstanceUID)
    assert instance_count(node) == 1
    assert dcmread(node.spool.path(row.path)).PatientName == expected_name
    assert row.series.study.patient.patient_name == expected_name
    assert not list(node.spool.incoming.iterdir())


def test_replacement_in_another_series_moves_the_file(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(node={"duplicate_policy": "replace"})
    first = next(ct_slices(SeriesSpec(slices=1, seed=24)))
    moved = next(ct_slices(SeriesSpec(slices=1, seed=24, series_uid="1.2.826.0.1.3680043.99.1")))
    moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    for number, ds in enumerate((first, moved)):
        (path,) = write_series([ds], tmp_path / str(number))
        assert peers.storescu(port_of(node), [path]).returncode == 0
    assert [p.parent.name for p in node.spool.data.rglob("*.dcm")] == ["1.2.826.0.1.3680043.99.1"]
    assert (
        stored_instance(node, first.SOPInstanceUID).series.series_instance_uid
        == "1.2.826.0.1.3680043.99.1"
    )


def test_disk_floor_refuses_with_out_of_resources_and_recovers(
    start_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(node={"min_free_disk_mb": 10**9})  # a floor no disk reaches
    files = write_series(ct_slices(SeriesSpec(slices=3, seed=25)), tmp_path / "ct")
    result = peers.storescu(port_of(node), files, extra=["-v"])
    assert result.returncode != 0
    assert "OutOfResources" in result.stderr, result.stderr
    assert instance_count(node) == 0
    assert not list(node.spool.data.rglob("*.dcm")) and not list(node.spool.incoming.iterdir())
    assert any("below the floor" in r.getMessage() for r in caplog.records)

    object.__setattr__(node.store, "min_free_bytes", 0)  # space returns
    assert peers.storescu(port_of(node), files).returncode == 0
    assert instance_count(node) == 3
