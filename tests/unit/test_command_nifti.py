"""A command model's NIfTI label map: read onto the series' grid (axes permuted or reversed),
refused with the mismatch named when it is another grid, its labels named by labels.json or the
model's ``labels`` setting."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomnode.errors import CommandOutputInvalid
from dicomnode.imaging import Geometry
from dicomnode.inference.findings import label_map_findings
from dicomnode.pipeline.nifti import (
    grid_json,
    map_labels,
    read_label_map,
    read_labels,
)

#: an oblique-free grid: 0.8 x 0.9 mm pixels, 2.5 mm slices, 5 x 4 x 3 voxels (i, j, k)
GEOMETRY = Geometry.from_parts(
    origin=(-20.0, 30.0, 100.0), direction=np.eye(3), spacing=(0.8, 0.9, 2.5), shape=(3, 4, 5)
)
UID = "1.2.3.4"


def node_map() -> np.ndarray:
    """A label map ``[k, j, i]`` with no symmetry, so a wrong flip shows."""
    labels = np.zeros(GEOMETRY.shape, dtype=np.uint8)
    labels[0, 0, 0] = 1
    labels[1, 2:4, 1:5] = 2
    labels[2, 3, 4] = 1
    return labels


def save(tmp_path: Path, data: np.ndarray, affine: np.ndarray, name: str = "m.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_a_map_on_the_series_grid_in_any_axis_order_is_the_node_map(tmp_path: Path) -> None:
    grid = grid_json(GEOMETRY)
    assert grid["shape"] == [5, 4, 3]
    affine = np.array(grid["affine_ras"])
    xyz = node_map().transpose(2, 1, 0)
    uid, got = read_label_map(save(tmp_path, xyz, affine), {UID: GEOMETRY}, "m")
    assert uid == UID and np.array_equal(got, node_map())
    # columns reversed and rows/slices swapped: the same voxels in another order
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, 4
    swap = np.eye(4)[[0, 2, 1, 3]]
    other = np.flip(xyz, 0).transpose(0, 2, 1)
    path = save(tmp_path, other.astype(np.float32), affine @ flip @ swap, "o.nii")
    _, got = read_label_map(path, {UID: GEOMETRY}, "m")
    assert np.array_equal(got, node_map())
    # as nibabel's canonical (RAS+) orientation reorders it
    canonical = nib.as_closest_canonical(nib.Nifti1Image(xyz, affine))
    nib.save(canonical, str(tmp_path / "c.nii.gz"))
    _, got = read_label_map(tmp_path / "c.nii.gz", {UID: GEOMETRY}, "m")
    assert np.array_equal(got, node_map())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("shift", r"its voxels lie up to 2\.000 mm from the series' \(tolerance 0\.08 mm\)"),
        ("shape", r"its shape \[5, 4, 2\] is not the series' \[5, 4, 3\]"),
        ("spacing", r"its voxels lie up to 1\.000 mm"),
        ("oblique", r"its voxels lie up to"),
        ("float", r"holds values that are not whole numbers"),
        ("4d", r"has shape \(5, 4, 3, 2\); a label map is 3-D"),
    ],
)
def test_another_grid_is_refused_with_the_mismatch_named(
    tmp_path: Path, change: str, reason: str
) -> None:
    affine = np.array(grid_json(GEOMETRY)["affine_ras"])
    data: np.ndarray = node_map().transpose(2, 1, 0)
    if change == "shift":
        affine[2, 3] += 2.0
    elif change == "shape":
        data = data[:, :, :2]
    elif change == "spacing":
        affine[2, 2] = 3.0
    elif change == "oblique":
        c, s = np.cos(0.2), np.sin(0.2)
        affine = affine @ np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    elif change == "float":
        data = data.astype(np.float32) + 0.5
    elif change == "4d":
        data = np.stack([data, data], axis=-1)
    with pytest.raises(CommandOutputInvalid, match=reason) as caught:
        read_label_map(save(tmp_path, data, affine), {UID: GEOMETRY}, "out/m.nii.gz")
    if change in ("shift", "shape", "spacing", "oblique"):
        message = str(caught.value)
        assert f"not on the grid of series {UID}" in message
        assert "series: 5x4x3 voxels of 0.8x0.9x2.5 mm, voxel (0,0,0) at RAS [20.000" in message
        assert "does not resample" in message


def test_not_a_nifti_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.nii.gz"
    path.write_bytes(b"not a NIfTI" * 40)
    with pytest.raises(CommandOutputInvalid, match=r"out/m is not a NIfTI label map nibabel"):
        read_label_map(path, {UID: GEOMETRY}, "out/m")


def test_labels_come_from_labels_json_over_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    code = {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}
    path.write_text(json.dumps({"2": {"name": "lesion", "code": code}, "3": "spleen"}))
    named = read_labels(path, {1: "liver", 2: "unused"}, "m")
    labels = map_labels([0, 1, 2], named, "m")
    assert [(x.value, x.name, x.code.value, x.code.scheme) for x in labels] == [
        (1, "liver", "10200004", "SCT"),  # coded by name (SNOMED CT)
        (2, "lesion", "108369006", "SCT"),
        (3, "spleen", "78961009", "SCT"),
    ]
    with pytest.raises(CommandOutputInvalid, match=r"holds label value\(s\) \[7\], named neither"):
        map_labels([0, 1, 7], named, "m")
    path.write_text(json.dumps({"0": "background"}))
    with pytest.raises(CommandOutputInvalid, match=r"key '0' is no label value"):
        read_labels(path, {}, "m")
    path.write_text(json.dumps({"1": {"name": "x", "code": {"value": "1"}}}))
    with pytest.raises(CommandOutputInvalid, match=r"label 1 \('x'\) has a code the node cannot"):
        map_labels([1], read_labels(path, {}, "m"), "m")
    # findings: one per label with voxels, its volume from the grid's voxel size
    findings, voxels = label_map_findings(node_map(), GEOMETRY, labels)
    assert voxels == {"liver": 2, "lesion": 8, "spleen": 0}
    assert [(f.label, f.volume_mm3) for f in findings] == [
        ("liver", round(2 * 0.8 * 0.9 * 2.5, 3)),
        ("lesion", round(8 * 0.8 * 0.9 * 2.5, 3)),
    ]
