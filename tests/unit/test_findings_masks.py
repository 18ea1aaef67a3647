"""Masks are written as the box of their labelled voxels, and read back whole and equal."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from dicomnode.domain import Findings
from dicomnode.inference.findings import read_mask, write_masks


def _written(tmp_path: Path, mask: np.ndarray) -> tuple[dict[str, object], np.ndarray]:
    findings = Findings("m", "1", demo=True, masks={"labels": mask})
    entry = write_masks(findings, tmp_path, 7)["labels"]
    return entry, read_mask(tmp_path / str(entry["path"]))


@pytest.mark.parametrize(
    "where",
    [
        (slice(3, 5), slice(10, 12), slice(20, 31)),  # inside
        (slice(0, 1), slice(0, 1), slice(0, 1)),  # the first voxel
        (slice(39, 40), slice(63, 64), slice(47, 48)),  # the last voxel
        (slice(None), slice(None), slice(None)),  # everywhere
    ],
)
def test_labels_come_back_equal_wherever_they_lie(tmp_path: Path, where: tuple[slice, ...]) -> None:
    mask = np.zeros((40, 64, 48), np.uint8)
    mask[where] = 2
    mask[20, 30, 40] = 5
    entry, back = _written(tmp_path, mask)
    assert back.dtype == mask.dtype and np.array_equal(back, mask)
    assert entry["shape"] == [40, 64, 48] and entry["labels"] == [2, 5]


def test_an_empty_mask_and_other_types(tmp_path: Path) -> None:
    empty = np.zeros((5, 6, 7), np.uint16)
    entry, back = _written(tmp_path, empty)
    assert np.array_equal(back, empty) and back.dtype == np.uint16 and entry["labels"] == []
    flat = np.zeros((30, 40), bool)
    flat[3:9, 20:22] = True
    entry, back = _written(tmp_path / "2d", flat)
    assert np.array_equal(back, flat.astype(np.uint8)) and entry["labels"] == [1]


def test_only_the_labelled_box_is_stored(tmp_path: Path) -> None:
    mask = np.zeros((300, 512, 512), np.uint8)
    mask[100:104, 200:210, 300:305] = 1
    entry, _ = _written(tmp_path, mask)
    with zipfile.ZipFile(tmp_path / str(entry["path"])) as archive:
        assert sum(i.file_size for i in archive.infolist()) < 4096


def test_a_mask_written_whole_is_still_read(tmp_path: Path) -> None:
    mask = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.savez_compressed(tmp_path / "old.npz", mask=mask)
    assert np.array_equal(read_mask(tmp_path / "old.npz"), mask)


def test_a_float_mask_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="float32"):
        _written(tmp_path, np.zeros((2, 2, 2), np.float32))
