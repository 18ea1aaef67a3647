"""Series of one study, planned in different orientations, resolutions and fields of view, land
on one patient-space grid voxel for voxel (dicomnode.imaging.grid)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dicomnode.imaging import Geometry, load_series, on_grid, patient_grid, resample_array
from dicomnode.imaging.grid import box_corners
from dicomnode.phantoms.brain import SeriesPlan
from dicomnode.phantoms.writer import MR_IMAGE_STORAGE, write_volume

#: one point in the head, and four series planned round it as a brain protocol is
POINT = np.array([13.2, -21.7, 48.4])
CENTRE = (0.0, 10.0, 40.0)
PLANS = (
    SeriesPlan("T1", "SAG T1 SE", "sagittal", (0.9, 0.9, 3.3), (230, 200, 150)),
    SeriesPlan("T2", "COR T2 TSE", "coronal", (0.7, 0.7, 4.0), (200, 180, 220)),
    SeriesPlan("FLAIR", "AX FLAIR", "axial", (1.0, 1.0, 3.0), (210, 240, 150), tilt_deg=14.0),
    SeriesPlan("T1c", "AX T1 MPRAGE POST GD", "axial", (1.1, 1.1, 1.0), (190, 220, 150)),
)


def _blob(geometry: Geometry, centre: np.ndarray, sigma_mm: float = 3.0) -> np.ndarray:
    """A Gaussian blob round a patient point, drawn on a grid (values 0..1000)."""
    slices, rows, columns = geometry.shape
    k, j, i = np.meshgrid(np.arange(slices), np.arange(rows), np.arange(columns), indexing="ij")
    points = geometry.voxel_to_patient(np.stack([i, j, k], -1).reshape(-1, 3))
    d2 = np.sum((points - centre) ** 2, axis=1).reshape(geometry.shape)
    return 1000.0 * np.exp(-d2 / (2 * sigma_mm**2))


def test_a_point_of_every_series_lands_on_the_same_grid_voxel(tmp_path: Path) -> None:
    volumes = {}
    for plan in PLANS:  # through DICOM files and the loader, as the node reads them
        small = replace(plan, fov_mm=tuple(0.4 * f for f in plan.fov_mm))  # each its own FOV
        geometry = small.geometry(POINT + np.array([4.0, -3.0, 2.0]))
        paths = write_volume(
            _blob(geometry, POINT), geometry, tmp_path / plan.contrast, modality="MR",
            series_description=plan.description, unsigned=True, rescale=(1.0, 0.0),
            sop_class_uid=MR_IMAGE_STORAGE, study_uid="1.2.826.0.1.3680043.2.1143.77",
        )  # fmt: skip
        volumes[plan.contrast] = load_series(paths)
    assert len({v.geometry.direction.round(3).tobytes() for v in volumes.values()}) == 4
    grid = patient_grid([v.geometry for v in volumes.values()], 1.0)
    assert grid.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert np.allclose(grid.direction, np.eye(3))
    arrays = on_grid(volumes, grid)
    expected = grid.array_index(POINT)
    for name, array in arrays.items():
        peak = np.unravel_index(int(np.argmax(array)), array.shape)
        assert np.abs(np.subtract(peak, expected)).max() <= 1, (name, peak, expected)
        # sub-voxel: the blob's centre of mass is the point, within half a millimetre
        weights = np.clip(array - 0.2 * array.max(), 0, None)
        k, j, i = np.nonzero(weights)
        w = weights[k, j, i]
        centre = grid.voxel_to_patient([np.average(i, weights=w), np.average(j, weights=w),
                                        np.average(k, weights=w)])  # fmt: skip
        assert np.linalg.norm(centre - POINT) < 0.5, (name, centre)


def test_the_union_covers_every_series_and_the_intersection_lies_in_each() -> None:
    geometries = [plan.geometry(CENTRE) for plan in PLANS]
    union = patient_grid(geometries, 1.5)
    inner = patient_grid(geometries, 1.5, extent="intersection")
    lo_u, hi_u = _box(union)
    lo_i, hi_i = _box(inner)
    for geometry in geometries:
        lo, hi = _box(geometry)
        assert np.all(lo >= lo_u - 1e-6) and np.all(hi <= hi_u + 1e-6)
        assert np.all(lo_i >= lo - 1.5) and np.all(hi_i <= hi + 1.5)  # up to one voxel
    assert np.prod(inner.shape) < np.prod(union.shape)


def test_sizes_round_up_to_a_multiple_and_a_given_box_is_kept() -> None:
    flair = PLANS[2].geometry(CENTRE)
    grid = patient_grid([flair], 2.0, extent=flair, multiple_of=8)
    assert all(n % 8 == 0 for n in grid.shape)
    assert np.allclose(grid.voxel_to_patient(np.array(grid.shape[::-1]) / 2 - 0.5),
                       np.mean(box_corners(flair), axis=0))  # fmt: skip


def test_a_label_map_goes_back_to_a_source_grid_by_nearest_neighbour() -> None:
    flair = PLANS[2].geometry(CENTRE)
    grid = patient_grid([flair], 2.0)
    labels = np.zeros(grid.shape, np.float32)
    k, j, i = grid.array_index(POINT)
    labels[k - 3 : k + 4, j - 3 : j + 4, i - 3 : i + 4] = 3
    back = resample_array(labels, grid, flair, order=0)
    assert back.shape == flair.shape
    assert set(np.unique(back).tolist()) == {0.0, 3.0}
    assert back[flair.array_index(POINT)] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spacing": 0.0}, "spacing must be positive"),
        ({"direction": np.ones((3, 3))}, "orthonormal"),
    ],
)
def test_bad_grids_are_refused_with_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        patient_grid([PLANS[0].geometry(CENTRE)], **kwargs)


def test_boxes_that_do_not_overlap_have_no_intersection() -> None:
    a = PLANS[3].geometry(CENTRE)
    b = PLANS[3].geometry((400.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="do not overlap"):
        patient_grid([a, b], 1.0, extent="intersection")
    with pytest.raises(ValueError, match="differs"):
        resample_array(np.zeros((2, 2, 2)), a, b)


def _box(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    corners = box_corners(geometry)
    return corners.min(axis=0), corners.max(axis=0)
