"""resample keeps every point where it is in the patient, onto new spacings and other grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.imaging import FrameRef, Geometry, Volume, load_series, resample, respaced
from dicomnode.phantoms.grids import phantom_geometry
from dicomnode.phantoms.writer import write_volume

POINT = np.array([3.7, 18.2, -148.9])  # patient mm, near the grid centre (0, 20, -150)


def blob_volume(geometry: Geometry, modality: str = "CT") -> Volume:
    """A smooth bright ball (Gaussian, sigma 3 mm) at POINT on air."""
    k, j, i = np.indices(geometry.shape)
    xyz = geometry.voxel_to_patient(np.stack([i, j, k], axis=-1))
    r2 = ((xyz - POINT) ** 2).sum(axis=-1)
    array = (-1000 + 1500 * np.exp(-r2 / (2 * 3.0**2))).astype(np.float32)
    frames = tuple(
        FrameRef(f"1.2.3.{n}", "1.2.840.10008.5.1.4.1.1.2", None, f"{n}.dcm")
        for n in range(geometry.shape[0])
    )
    return Volume(array, geometry, frames, modality, "1.2.3")


def centroid_mm(volume: Volume) -> np.ndarray:
    """Patient position of the ball: intensity-weighted centre of voxels above the background."""
    weights = np.clip(volume.array + 1000, 0, None).astype(np.float64)
    k, j, i = np.indices(volume.array.shape)
    ijk = np.stack([(w * weights).sum() / weights.sum() for w in (i, j, k)])
    return volume.geometry.voxel_to_patient(ijk)


@pytest.mark.parametrize("orientation", ["axial", "feet_first", "oblique"])
def test_new_spacing_keeps_the_point(orientation: str) -> None:
    source = blob_volume(phantom_geometry((30, 48, 40), (0.9, 0.8, 2.0), orientation))  # type: ignore[arg-type]
    out = resample(source, (0.703, 0.703, 1.25))
    assert out.geometry.spacing == pytest.approx((0.703, 0.703, 1.25))
    np.testing.assert_allclose(out.geometry.direction, source.geometry.direction, atol=1e-12)
    # The same box: 40 x 0.9 mm = 36 mm -> 51 voxels of 0.703 mm; 30 x 2 mm -> 48 slices.
    assert out.array.shape == (48, 55, 51)
    assert out.array.dtype == np.float32
    np.testing.assert_allclose(centroid_mm(out), centroid_mm(source), atol=0.1)
    index = np.unravel_index(np.argmax(out.array), out.array.shape)
    assert np.linalg.norm(out.geometry.voxel_to_patient(index[::-1]) - POINT) < 1.0
    assert len(out.frames) == out.array.shape[0]
    assert out.modality == "CT" and out.series_instance_uid == "1.2.3"


def test_frames_follow_the_nearest_source_slice() -> None:
    source = blob_volume(phantom_geometry((10, 16, 16), (1.0, 1.0, 2.0)))
    out = resample(source, (1.0, 1.0, 1.0))
    assert out.array.shape[0] == 20
    assert [f.path for f in out.frames[:4]] == ["0.dcm", "0.dcm", "1.dcm", "1.dcm"]


def test_onto_a_reference_grid_and_back() -> None:
    source = blob_volume(phantom_geometry((30, 48, 40), (0.9, 0.8, 2.0), "axial"))
    reference = phantom_geometry((40, 50, 50), (1.0, 1.0, 1.0), "oblique")
    onto = resample(source, reference.spacing, reference=reference)
    assert onto.geometry == reference
    np.testing.assert_allclose(centroid_mm(onto), POINT, atol=0.15)
    back = resample(onto, source.geometry.spacing, reference=source.geometry)
    assert back.geometry == source.geometry
    np.testing.assert_allclose(centroid_mm(back), centroid_mm(source), atol=0.2)


def test_reference_box_at_another_spacing() -> None:
    source = blob_volume(phantom_geometry((30, 48, 40), (0.9, 0.8, 2.0)))
    reference = phantom_geometry((20, 25, 25), (2.0, 2.0, 2.0), "oblique")
    out = resample(source, (1.0, 1.0, 1.0), reference=reference)
    assert out.array.shape == (40, 50, 50)
    np.testing.assert_allclose(out.geometry.direction, reference.direction, atol=1e-12)
    np.testing.assert_allclose(centroid_mm(out), POINT, atol=0.15)


def test_outside_the_source_is_filled() -> None:
    source = blob_volume(phantom_geometry((10, 16, 16), (1.0, 1.0, 1.0)), modality="MR")
    far = Geometry.from_parts((500.0, 500.0, 500.0), np.eye(3), (1.0, 1.0, 1.0), (2, 2, 2))
    assert np.all(resample(source, (1.0, 1.0, 1.0), reference=far).array == 0.0)
    ct = blob_volume(source.geometry)
    assert np.all(resample(ct, (1.0, 1.0, 1.0), reference=far).array == -1024.0)
    assert np.all(resample(ct, (1.0, 1.0, 1.0), reference=far, fill=7.0).array == 7.0)


def test_same_spacing_is_identity_and_nearest_keeps_labels() -> None:
    geometry = phantom_geometry((8, 12, 10), (1.0, 1.0, 2.0), "oblique")
    source = blob_volume(geometry)
    np.testing.assert_allclose(resample(source, geometry.spacing).array, source.array, atol=1e-3)
    labels = Volume(
        np.random.default_rng(0).integers(0, 4, geometry.shape).astype(np.float32),
        geometry,
        source.frames,
        "SEG",
        "1.2.3",
    )
    out = resample(labels, (0.5, 0.5, 1.0), order=0)
    assert set(np.unique(out.array)) <= {0.0, 1.0, 2.0, 3.0}
    cubic = resample(source, (0.5, 0.5, 1.0), order=3)
    np.testing.assert_allclose(centroid_mm(cubic), centroid_mm(source), atol=0.1)
    with pytest.raises(ValueError, match="order must be one of"):
        resample(source, (1.0, 1.0, 1.0), order=2)
    with pytest.raises(ValueError, match="three positive"):
        respaced(geometry, (1.0, 0.0, 1.0))


def test_tilted_stack_becomes_orthogonal(tmp_path: Path) -> None:
    """A gantry-tilted series (sheared grid) resamples onto the image plane's normal."""
    geometry = phantom_geometry((30, 48, 40), (0.9, 0.8, 2.0))
    affine = geometry.affine.copy()
    affine[1, 2] = np.tan(np.radians(20)) * 2.0
    tilted = Geometry(affine, geometry.shape)
    written = blob_volume(tilted)
    volume = load_series(write_volume(written.array, tilted, tmp_path, slice_order="shuffled"))
    assert volume.geometry.isclose(tilted)
    out = resample(volume, (0.8, 0.8, 1.0))
    np.testing.assert_allclose(out.geometry.direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(centroid_mm(out), centroid_mm(written), atol=0.2)
