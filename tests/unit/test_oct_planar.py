"""Ophthalmic images as Volumes: OCT B-scans in one multi-frame object or one object each, with or
without plane positions, and colour fundus photographs (RGB, and YBR_FULL_422 from JPEG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.errors import MismatchedFrames
from dicomnode.imaging import FrameRef, Geometry, Volume, is_planar, load_planar
from dicomnode.phantoms.retina import fundus_photo, oct_volume
from dicomnode.phantoms.simple import multiframe
from dicomnode.phantoms.writer import (
    OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE,
    OPHTHALMIC_TOMOGRAPHY_STORAGE,
    write_series,
)


@pytest.fixture(scope="module")
def oct_phantom():  # type: ignore[no-untyped-def]
    return oct_volume(3, seed=5101, frames=9, rows=64, columns=48)


@pytest.mark.parametrize("one_object", [True, False], ids=["multi-frame", "single-frame"])
def test_oct_with_plane_positions_is_placed_in_patient_space(
    oct_phantom, tmp_path: Path, one_object: bool
) -> None:  # type: ignore[no-untyped-def]
    paths = oct_phantom.write(tmp_path, multiframe=one_object)
    assert len(paths) == (1 if one_object else 9)
    volume = load_planar(paths)
    np.testing.assert_array_equal(volume.array, oct_phantom.array)
    assert volume.array.dtype == np.float32 and volume.samples == 1
    row_mm, column_mm = oct_phantom.pixel_mm
    assert volume.geometry.spacing == pytest.approx((column_mm, row_mm, oct_phantom.frame_mm))
    # rows run posterior, B-scans superior (the phantom's nominal eye frame)
    np.testing.assert_allclose(volume.geometry.direction, np.eye(3), atol=1e-9)
    assert [f.frame_number for f in volume.frames] == (
        list(range(1, 10)) if one_object else [1] * 9
    )
    assert len({f.sop_instance_uid for f in volume.frames}) == (1 if one_object else 9)
    assert volume.modality == "OPT"


@pytest.mark.parametrize("one_object", [True, False], ids=["multi-frame", "single-frame"])
def test_oct_without_plane_positions_gets_a_nominal_geometry(
    oct_phantom, tmp_path: Path, one_object: bool
) -> None:  # type: ignore[no-untyped-def]
    paths = oct_phantom.write(tmp_path, multiframe=one_object, positions=False)
    volume = load_planar(list(reversed(paths)))  # order comes from the Instance Numbers
    np.testing.assert_array_equal(volume.array, oct_phantom.array)
    row_mm, column_mm = oct_phantom.pixel_mm
    # Pixel Measures still give the spacing; the placement is nominal (identity at the origin)
    assert volume.geometry.spacing == pytest.approx((column_mm, row_mm, oct_phantom.frame_mm))
    np.testing.assert_allclose(volume.geometry.affine[:3, 3], 0.0)
    np.testing.assert_allclose(volume.geometry.direction, np.eye(3))


def test_one_b_scan_is_a_one_frame_volume(tmp_path: Path) -> None:
    phantom = oct_volume(2, seed=5102, frames=1, rows=64, columns=64)
    volume = load_planar(phantom.write(tmp_path))
    assert volume.array.shape == (1, 64, 64)
    np.testing.assert_array_equal(volume.array[0], phantom.array[0])


@pytest.mark.parametrize("jpeg", [False, True], ids=["RGB", "YBR_FULL_422-JPEG"])
def test_colour_fundus_photograph_keeps_its_rgb_axis(tmp_path: Path, jpeg: bool) -> None:
    phantom = fundus_photo(2, seed=5103, size=192)
    paths = phantom.write(tmp_path, jpeg=jpeg)
    from pydicom import dcmread

    assert dcmread(paths[0]).PhotometricInterpretation == ("YBR_FULL_422" if jpeg else "RGB")
    volume = load_planar(paths)
    assert volume.array.shape == (1, 192, 192, 3) and volume.samples == 3
    assert volume.geometry.shape == (1, 192, 192)
    error = np.abs(volume.array - phantom.array.astype(np.float32))
    if jpeg:  # lossy, but decoded to RGB (not left in YBR: that would be off by tens)
        assert error.mean() < 4.0
    else:
        assert error.max() == 0
    assert volume.frames[0].frame_number is None
    assert volume.geometry.spacing[:2] == pytest.approx(phantom.pixel_mm)


def test_colour_multiframe_and_several_photographs(tmp_path: Path) -> None:
    ds = multiframe(OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE, frames=3, rows=24, columns=20, colour=True)
    volume = load_planar(write_series([ds], tmp_path / "mf"))
    assert volume.array.shape == (3, 24, 20, 3)
    np.testing.assert_array_equal(volume.array[2], ds.pixel_array[2])
    assert [f.frame_number for f in volume.frames] == [1, 2, 3]
    left = fundus_photo(0, seed=5104, size=96).write(tmp_path / "eyes", series_uid="1.2.3.4")
    right = fundus_photo(1, seed=5105, size=96)
    both = load_planar(left + right.write(tmp_path / "eyes2", series_uid="1.2.3.4"))
    assert both.array.shape == (2, 96, 96, 3)


def test_frames_of_different_sizes_are_refused(tmp_path: Path) -> None:
    a = write_series(
        [multiframe(OPHTHALMIC_TOMOGRAPHY_STORAGE, rows=32, columns=32)], tmp_path / "a"
    )
    b = write_series([multiframe(OPHTHALMIC_TOMOGRAPHY_STORAGE, rows=16, columns=32, seed=1)],
                     tmp_path / "b")  # fmt: skip
    with pytest.raises(MismatchedFrames, match=r"16x32 .*; 00001.dcm is 32x32"):
        load_planar(a + b)


def test_ophthalmic_series_are_recognised() -> None:
    assert is_planar("OPT") and is_planar("op")
    assert is_planar("OT", {"1.2.840.10008.5.1.4.1.1.77.1.5.1"})
    assert not is_planar("CT", {"1.2.840.10008.5.1.4.1.1.2"})


def test_volume_takes_a_trailing_rgb_axis_only() -> None:
    frames = (FrameRef("1.2.3", "", None, ""),)
    geometry = Geometry(np.eye(4), (1, 4, 5))
    assert Volume(np.zeros((1, 4, 5, 3)), geometry, frames, "OP", "1").samples == 3
    with pytest.raises(ValueError, match="differs from the geometry"):
        Volume(np.zeros((1, 4, 5, 2)), geometry, frames, "OP", "1")


def test_oct_acquisition_settings_vary_the_rendering_and_keep_lesions_in_mm() -> None:
    """The phantom's device settings (domain randomisation, unseen-setting benchmarks): the
    defaults draw the same cube as before; a bigger B-scan keeps the lesions' size in mm."""
    from dicomnode.phantoms.retina import OCT_TRAINING_RANGES, RetinaPhantom, random_oct_settings

    small = oct_volume(3, seed=5103, frames=9)
    large = oct_volume(3, seed=5103, frames=9, rows=256, columns=256)
    assert large.array.shape == (9, 256, 256)

    def cyst_height_mm(phantom: RetinaPhantom) -> float:
        boxes = [les.box for les in phantom.truth.lesions if les.kind == "intraretinal_fluid"]
        return float(np.median([b[3] - b[2] for b in boxes])) * phantom.pixel_mm[0]

    assert cyst_height_mm(large) == pytest.approx(cyst_height_mm(small), rel=0.35)
    dark = oct_volume(3, seed=5103, frames=9, gain=0.5, gamma=1.6)
    assert dark.array.mean() < 0.8 * small.array.mean()
    noisy = oct_volume(3, seed=5103, frames=9, noise=0.08, speckle=1.1, blur=0)
    assert noisy.array.std() > small.array.std()
    settings = random_oct_settings(np.random.default_rng(0))
    for key, (low, high) in OCT_TRAINING_RANGES.items():
        assert low <= settings[key] <= high, key
    with pytest.raises(ValueError, match="speckle=0"):
        oct_volume(3, seed=5103, speckle=0)
