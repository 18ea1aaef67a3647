"""Chest CT phantoms: the truth matches the voxels, on any grid, after writing and loading."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from dicomnode.imaging import load_series
from dicomnode.phantoms.chest import HU, Nodule, Truth, chest_ct, random_nodules
from dicomnode.phantoms.grids import phantom_geometry
from dicomnode.phantoms.writer import write_volume

SMALL = (48, 128, 128)
SPACING = (1.4, 1.4, 2.5)


def assert_nodules_visible(array: np.ndarray, geometry, truth: Truth, noise: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Each nodule's centre voxel (found from its patient mm) has the nodule's HU."""
    for nodule in truth.nodules:
        index = geometry.array_index(nodule.center_mm)
        patch = array[tuple(slice(max(n - 1, 0), n + 2) for n in index)]
        # A 3x3x3 mean beats the noise; the smallest nodules fill the centre voxel at least.
        expected = HU[nodule.kind]
        assert abs(float(array[index]) - expected) < 5 * noise + 1, nodule
        if nodule.diameter_mm >= 3 * max(geometry.spacing):
            assert abs(float(patch.mean()) - expected) < 2 * noise, nodule


def test_truth_matches_the_volume() -> None:
    phantom = chest_ct(SMALL, SPACING, nodules=6, seed=4)
    assert phantom.array.shape == SMALL and phantom.array.dtype == np.float32
    assert len(phantom.truth.nodules) == 6
    for n, nodule in enumerate(phantom.truth.nodules, start=1):
        index = phantom.geometry.array_index(nodule.center_mm)
        assert phantom.lung_mask[index], "nodule centre must be inside the lungs"
        assert phantom.nodule_labels[index] == nodule.label == n
        np.testing.assert_allclose(
            phantom.geometry.voxel_to_patient(nodule.center_voxel), nodule.center_mm, atol=1e-3
        )
        assert 3 <= nodule.diameter_mm <= 30
        assert nodule.volume_mm3 == pytest.approx(np.pi / 6 * nodule.diameter_mm**3, rel=1e-4)
        # The drawn label covers the sphere's volume (partial voxels at the edge both ways).
        drawn = np.count_nonzero(phantom.nodule_labels == n) * np.prod(SPACING)
        if nodule.diameter_mm >= 8:
            assert drawn == pytest.approx(nodule.volume_mm3, rel=0.25)
    assert_nodules_visible(phantom.array, phantom.geometry, phantom.truth)


def test_tissues_have_their_hu() -> None:
    phantom = chest_ct(SMALL, SPACING, seed=1, noise_hu=0.0, vessels=False)
    lungs = phantom.array[phantom.lung_mask]
    assert np.all(lungs == HU["lung"])
    assert phantom.array[0, 0, 0] == HU["air"]
    centre = tuple(n // 2 for n in SMALL)
    assert phantom.array[centre] == HU["soft"]  # mediastinum between the lungs
    assert 0.1 < phantom.lung_mask.mean() < 0.5
    with_vessels = chest_ct(SMALL, SPACING, seed=1, noise_hu=0.0)
    vessel = with_vessels.array[phantom.lung_mask] > -300
    assert 0.002 < vessel.mean() < 0.2  # vessels are there, but the lungs stay mostly air


def test_given_nodules_by_patient_mm_and_voxel() -> None:
    geometry = phantom_geometry(SMALL, SPACING)
    probe = chest_ct(SMALL, SPACING, seed=2)
    candidates = random_nodules(np.random.default_rng(0), probe.lung_mask, geometry, 2, (8, 12))
    first = candidates[0].center_mm_patient
    second_voxel = tuple(geometry.patient_to_voxel(candidates[1].center_mm_patient))
    phantom = chest_ct(
        SMALL,
        SPACING,
        nodules=[
            Nodule(10.0, "ground_glass", center_mm_patient=first),
            Nodule(9.0, "solid", center_voxel=second_voxel),  # type: ignore[arg-type]
        ],
        seed=2,
    )
    a, b = phantom.truth.nodules
    assert a.kind == "ground_glass" and a.center_mm == pytest.approx(first, abs=1e-3)
    assert b.kind == "solid" and b.center_voxel == pytest.approx(second_voxel, abs=1e-3)
    assert_nodules_visible(phantom.array, phantom.geometry, phantom.truth)


@pytest.mark.parametrize(
    ("orientation", "slice_order", "enhanced"),
    [
        ("axial", "ascending", False),
        ("feet_first", "descending", False),
        ("oblique", "shuffled", False),
        ("axial", "shuffled", True),
    ],
)
def test_written_series_loads_with_the_truth(
    tmp_path: Path, orientation: str, slice_order: str, enhanced: bool
) -> None:
    phantom = chest_ct(SMALL, SPACING, orientation, nodules=4, seed=7)  # type: ignore[arg-type]
    paths = phantom.write(tmp_path, slice_order=slice_order, enhanced=enhanced)
    truth = Truth.load(tmp_path)
    assert (tmp_path / "truth.json").is_file()
    assert truth.nodules == phantom.truth.nodules
    ds = pydicom.dcmread(paths[0])
    assert truth.series_instance_uid == ds.SeriesInstanceUID
    assert truth.study_instance_uid == ds.StudyInstanceUID
    assert ds.PatientPosition == ("FFS" if orientation == "feet_first" else "HFS")
    volume = load_series(paths)
    assert volume.geometry.isclose(phantom.geometry)
    np.testing.assert_allclose(volume.array, np.rint(phantom.array), atol=0.5)
    assert_nodules_visible(volume.array, volume.geometry, truth)


def test_random_nodules_fit_inside_the_lungs_apart() -> None:
    phantom = chest_ct(SMALL, SPACING, seed=3)
    rng = np.random.default_rng(5)
    nodules = random_nodules(rng, phantom.lung_mask, phantom.geometry, 5, (4, 10), margin_mm=2)
    assert len(nodules) == 5
    centres = np.array([n.center_mm_patient for n in nodules])
    for a in range(5):
        index = phantom.geometry.array_index(centres[a])
        assert phantom.lung_mask[index]
        for b in range(a + 1, 5):
            gap = np.linalg.norm(centres[a] - centres[b])
            assert gap >= (nodules[a].diameter_mm + nodules[b].diameter_mm) / 2 + 2
    tiny = np.zeros(SMALL, bool)
    tiny[20:30, 60:70, 60:70] = True  # 14 mm across: a 20 mm nodule cannot fit
    with pytest.raises(ValueError, match=r"no room for a 20\.0 mm nodule"):
        random_nodules(rng, tiny, phantom.geometry, 1, (20, 20))
    with pytest.raises(ValueError, match="lung mask is empty"):
        random_nodules(rng, np.zeros(SMALL, bool), phantom.geometry, 1)


def test_same_seed_same_phantom() -> None:
    a = chest_ct(SMALL, SPACING, nodules=3, seed=11)
    b = chest_ct(SMALL, SPACING, nodules=3, seed=11)
    c = chest_ct(SMALL, SPACING, nodules=3, seed=12)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.truth == b.truth and a.truth != c.truth


def test_invalid_nodules() -> None:
    with pytest.raises(ValueError, match="3 to 30 mm"):
        Nodule(2.0, center_voxel=(1, 1, 1))
    with pytest.raises(ValueError, match="exactly one"):
        Nodule(5.0)
    with pytest.raises(ValueError, match="solid or ground_glass"):
        Nodule(5.0, "calcified", center_voxel=(1, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the grid"):
        chest_ct(SMALL, SPACING, nodules=[Nodule(5.0, center_mm_patient=(900.0, 0.0, 0.0))])


def test_write_volume_options(tmp_path: Path) -> None:
    geometry = phantom_geometry((3, 8, 8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="slice_order"):
        write_volume(np.zeros((3, 8, 8)), geometry, tmp_path, slice_order="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differs from geometry"):
        write_volume(np.zeros((3, 8, 9)), geometry, tmp_path)
    paths = write_volume(np.zeros((3, 8, 8)), geometry, tmp_path, series_description="Scout")
    ds = pydicom.dcmread(paths[0])
    assert ds.SeriesDescription == "Scout" and ds.RescaleIntercept == -1024
    assert [pydicom.dcmread(p).InstanceNumber for p in paths] == [1, 2, 3]


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    phantom = chest_ct((100, 256, 256), (0.7, 0.7, 1.25), nodules=5, seed=0)
    elapsed = time.perf_counter() - start
    assert len(phantom.truth.nodules) == 5
    assert elapsed < 5.0, f"a 256x256x100 phantom took {elapsed:.1f} s"


@pytest.mark.parametrize("enhanced", [False, True])
def test_written_objects_pass_dciodvfy(tmp_path: Path, enhanced: bool) -> None:
    from dicomnode.testing.validators import require_tool

    dciodvfy = require_tool("dciodvfy")
    phantom = chest_ct((4, 64, 64), (2.8, 2.8, 2.5), "oblique", seed=1)
    paths = phantom.write(tmp_path, enhanced=enhanced, transfer_syntax=RLELossless)
    report = subprocess.run([dciodvfy, str(paths[0])], capture_output=True, text=True)
    output = report.stdout + report.stderr
    assert ("EnhancedCTImage" if enhanced else "CTImage") in output
    assert "Error" not in output, output
