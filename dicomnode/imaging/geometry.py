"""Where each voxel of a volume sits in the patient (DICOM LPS millimetres)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


def _readonly(array: ArrayLike) -> np.ndarray:
    out = np.array(array, dtype=np.float64)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in patient space.

    ``affine`` maps a voxel index ``(i, j, k, 1)`` to patient LPS millimetres ``(x, y, z, 1)``, with
    ``i`` the column, ``j`` the row and ``k`` the slice; the array it describes is indexed
    ``[k, j, i]`` and has ``shape == (slices, rows, columns)``. The slice axis may be sheared (a CT
    gantry tilt), so the affine is exact for every stack the loader accepts.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        affine = _readonly(self.affine)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, not {affine.shape}")
        if not np.allclose(affine[3], (0, 0, 0, 1)):
            raise ValueError(f"affine's last row must be 0 0 0 1, not {affine[3].tolist()}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("affine is singular: its voxel axes do not span patient space")
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be three positive sizes (slices, rows, columns): {shape}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_parts(
        cls,
        origin: ArrayLike,
        direction: ArrayLike,
        spacing: tuple[float, float, float],
        shape: tuple[int, int, int],
    ) -> Geometry:
        """Build from the centre of voxel (0, 0, 0), unit axis columns (i, j, k) and spacing."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, float)
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)
        return cls(affine, shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Step in mm along the (column, row, slice) axes."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """In-plane step in mm, row then column (DICOM Pixel Spacing's order)."""
        column, row, _ = self.spacing
        return (row, column)

    @property
    def direction(self) -> np.ndarray:
        """3x3 whose columns are the unit vectors of i, j and k in patient space."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """Patient position of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    def voxel_to_patient(self, ijk: ArrayLike) -> np.ndarray:
        """Voxel indices ``(..., 3)`` as (i, j, k) to patient LPS mm ``(..., 3)``."""
        points = np.asarray(ijk, dtype=np.float64)
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_voxel(self, xyz: ArrayLike) -> np.ndarray:
        """Patient LPS mm ``(..., 3)`` to fractional voxel indices (i, j, k) ``(..., 3)``."""
        points = np.asarray(xyz, dtype=np.float64)
        return np.linalg.solve(self.affine[:3, :3], (points - self.affine[:3, 3]).T).T

    def array_index(self, xyz: ArrayLike) -> tuple[int, int, int]:
        """The ``[k, j, i]`` array index of the voxel holding one patient point.

        Raises ValueError for a point outside the grid, so a finding never maps to a wrong voxel.
        """
        i, j, k = np.rint(self.patient_to_voxel(xyz)).astype(int).tolist()
        if not (0 <= k < self.shape[0] and 0 <= j < self.shape[1] and 0 <= i < self.shape[2]):
            raise ValueError(
                f"point {np.asarray(xyz).tolist()} mm is outside the grid {self.shape}"
            )
        return (k, j, i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.shape == other.shape and np.array_equal(self.affine, other.affine)

    def __hash__(self) -> int:
        return hash((self.shape, self.affine.tobytes()))

    def isclose(self, other: Geometry, *, atol_mm: float = 1e-3) -> bool:
        """The same grid up to rounding (positions written as decimal strings)."""
        if self.shape != other.shape:
            return False
        corners = np.array(
            [[0, 0, 0], [self.shape[2] - 1, self.shape[1] - 1, self.shape[0] - 1]], dtype=float
        )
        return bool(
            np.allclose(
                self.voxel_to_patient(corners), other.voxel_to_patient(corners), atol=atol_mm
            )
            and np.allclose(self.affine[:3, :3], other.affine[:3, :3], atol=atol_mm)
        )
