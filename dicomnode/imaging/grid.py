"""Several series of one Frame of Reference on one grid in patient space, and results back.

A multi-sequence model (brain MRI: T1, T1c, T2, FLAIR) needs its inputs voxel for voxel, though
each series was planned on its own: sagittal or axial, thin or thick slices, its own field of
view. :func:`patient_grid` makes one grid along the patient's axes (L, P, S: the layout of
BraTS-style data) at a chosen spacing over the series' boxes; :func:`on_grid` resamples each
series onto it (SimpleITK through :func:`dicomnode.imaging.resample`); :func:`resample_array`
carries a result (a label map, probabilities) from that grid back to a source series' grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from dicomnode.imaging.geometry import Geometry
from dicomnode.imaging.resample import _sitk_resample, resample
from dicomnode.imaging.volume import Volume

Extent = Literal["union", "intersection"]


def box_corners(geometry: Geometry) -> np.ndarray:
    """The 8 outer corners (voxel edges, not centres) of a grid in patient mm ``(8, 3)``."""
    slices, rows, columns = geometry.shape
    edges = [(-0.5, n - 0.5) for n in (columns, rows, slices)]
    ijk = np.array([[i, j, k] for i in edges[0] for j in edges[1] for k in edges[2]])
    return geometry.voxel_to_patient(ijk)


def patient_grid(
    geometries: Sequence[Geometry],
    spacing: float | Sequence[float] = 1.0,
    *,
    extent: Extent | Geometry = "union",
    direction: np.ndarray | None = None,
    multiple_of: int = 1,
) -> Geometry:
    """One grid of ``spacing`` mm with axes ``direction`` (default L, P, S) over the boxes of
    ``geometries``: their union (no voxel of any series is lost), their intersection (where
    every series has data), or the box of one given grid. ``multiple_of`` rounds each size up
    (networks that halve the grid n times want multiples of 2**n), growing the box evenly."""
    if not geometries:
        raise ValueError("patient_grid needs at least one geometry")
    step = np.broadcast_to(np.asarray(spacing, float), (3,)).copy()
    if np.any(step <= 0):
        raise ValueError(f"spacing must be positive mm, not {spacing}")
    axes = np.eye(3) if direction is None else np.asarray(direction, float)
    if axes.shape != (3, 3) or not np.allclose(axes.T @ axes, np.eye(3), atol=1e-6):
        raise ValueError("direction must be a 3x3 orthonormal matrix (columns: the grid's axes)")
    boxes = (
        [box_corners(extent)]
        if isinstance(extent, Geometry)
        else [box_corners(g) for g in geometries]
    )
    along = [corners @ axes for corners in boxes]  # coordinates along the new axes
    if extent == "intersection":
        lo = np.max([a.min(axis=0) for a in along], axis=0)
        hi = np.min([a.max(axis=0) for a in along], axis=0)
        if np.any(hi <= lo):
            raise ValueError("the series' boxes do not overlap: they share no voxel")
    else:
        lo = np.min([a.min(axis=0) for a in along], axis=0)
        hi = np.max([a.max(axis=0) for a in along], axis=0)
    counts = np.maximum(1, np.ceil((hi - lo) / step - 1e-6)).astype(int)
    if multiple_of > 1:
        counts = -(-counts // multiple_of) * multiple_of
    centre = (lo + hi) / 2
    first = centre - (counts - 1) / 2 * step  # centre of voxel 0, along the new axes
    shape = (int(counts[2]), int(counts[1]), int(counts[0]))
    spacing_ = (float(step[0]), float(step[1]), float(step[2]))
    return Geometry.from_parts(axes @ first, axes, spacing_, shape)


def on_grid(
    volumes: Mapping[str, Volume], grid: Geometry, *, order: int = 1, fill: float = 0.0
) -> dict[str, np.ndarray]:
    """Each volume resampled onto ``grid`` (float32 ``[k, j, i]``); ``fill`` outside its box
    (NaN tells where a series has no data)."""
    return {
        name: resample(volume, grid.spacing, order=order, reference=grid, fill=fill).array
        for name, volume in volumes.items()
    }


def resample_array(
    array: np.ndarray, source: Geometry, target: Geometry, *, order: int = 0, fill: float = 0.0
) -> np.ndarray:
    """An array ``[k, j, i]`` on ``source`` resampled onto ``target`` (float32): ``order`` 0
    (nearest, label maps) or 1 (linear, probabilities)."""
    if np.asarray(array).shape != source.shape:
        raise ValueError(f"array shape {np.asarray(array).shape} differs from {source.shape}")
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0, 1 or 3, not {order}")
    return _sitk_resample(np.asarray(array), source, target, order, fill)
