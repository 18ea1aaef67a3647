"""Geometry: voxel indices <-> patient millimetres, without files."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.imaging import Geometry
from dicomnode.phantoms.grids import phantom_geometry


def test_parts_round_trip() -> None:
    direction = np.diag([-1.0, 1.0, -1.0])
    geometry = Geometry.from_parts((10.0, -20.0, 30.0), direction, (0.5, 0.7, 2.0), (4, 5, 6))
    assert geometry.spacing == pytest.approx((0.5, 0.7, 2.0))
    np.testing.assert_allclose(geometry.direction, direction)
    np.testing.assert_allclose(geometry.origin, (10.0, -20.0, 30.0))
    # i (column) runs along the first axis, k (slice) along the third.
    np.testing.assert_allclose(geometry.voxel_to_patient([2, 0, 0]), (9.0, -20.0, 30.0))
    np.testing.assert_allclose(geometry.voxel_to_patient([0, 0, 3]), (10.0, -20.0, 24.0))


@pytest.mark.parametrize("orientation", ["axial", "feet_first", "oblique"])
def test_points_round_trip(orientation: str) -> None:
    geometry = phantom_geometry((20, 30, 40), (0.8, 0.9, 2.5), orientation)  # type: ignore[arg-type]
    ijk = np.random.default_rng(0).uniform(0, 19, (7, 3))
    xyz = geometry.voxel_to_patient(ijk)
    assert xyz.shape == (7, 3)
    np.testing.assert_allclose(geometry.patient_to_voxel(xyz), ijk, atol=1e-9)
    # Distances in mm follow the spacing along each axis.
    step = geometry.voxel_to_patient([0, 0, 1]) - geometry.voxel_to_patient([0, 0, 0])
    assert np.linalg.norm(step) == pytest.approx(2.5)


def test_array_index_is_k_j_i_and_refuses_outside() -> None:
    geometry = phantom_geometry((5, 6, 7), (1.0, 1.0, 1.0))
    point = geometry.voxel_to_patient([6, 1, 4])
    assert geometry.array_index(point) == (4, 1, 6)
    with pytest.raises(ValueError, match="outside the grid"):
        geometry.array_index(geometry.voxel_to_patient([7.6, 0, 0]))


def test_equality_hash_and_readonly() -> None:
    a = phantom_geometry((5, 6, 7), (1.0, 1.0, 2.0))
    b = phantom_geometry((5, 6, 7), (1.0, 1.0, 2.0))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != phantom_geometry((5, 6, 8), (1.0, 1.0, 2.0))
    nudged = a.affine.copy()
    nudged[:3] += 1e-6
    assert a.isclose(Geometry(nudged, a.shape)) and a != Geometry(nudged, a.shape)
    with pytest.raises(ValueError):
        a.affine[0, 0] = 2.0
    with pytest.raises(AttributeError):
        a.shape = (1, 1, 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("affine", "shape", "message"),
    [
        (np.eye(3), (1, 1, 1), "4x4"),
        (np.diag([1.0, 1.0, 0.0, 1.0]), (1, 1, 1), "singular"),
        (np.eye(4), (0, 1, 1), "positive"),
    ],
)
def test_invalid_geometry(affine: np.ndarray, shape: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Geometry(affine, shape)
