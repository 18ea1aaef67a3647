"""The CT as the networks see it, read from the source HU: the detector's grid (the Model Zoo's
RAS orientation, spacing and HU window) and the false-positive classifier's cubes.

Apart from the model class so that train.py prepares its data exactly as inference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The zoo's preprocessing (configs/inference.json)
ZOO_SPACING = (0.703125, 0.703125, 1.25)
ZOO_HU_WINDOW = (-1024.0, 300.0)
#: LPS (DICOM) <-> RAS (MONAI) on patient coordinates
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ModelImage:
    """The network's input grid: ``array`` [x, y, z] float32 0..1; ``affine`` maps its voxel
    indices (x, y, z, 1) to patient LPS mm (the zoo's RAS affine, in LPS)."""

    array: np.ndarray
    affine: np.ndarray

    def to_patient(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, float) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_voxel(self, lps: np.ndarray) -> np.ndarray:
        points = np.asarray(lps, float) - self.affine[:3, 3]
        return np.linalg.solve(self.affine[:3, :3], points.T).T


def ras_axes(affine: np.ndarray) -> tuple[list[int], list[bool]]:
    """For each of R, A, S: which voxel axis (0=i column, 1=j row, 2=k slice) runs closest to
    it, and whether that axis runs against it (nibabel's io_orientation, as MONAI uses)."""
    ras = LPS_TO_RAS @ affine[:3, :3]
    ras = ras / np.linalg.norm(ras, axis=0)
    order: list[int] = [-1, -1, -1]
    flips: list[bool] = [False, False, False]
    used: set[int] = set()
    weights = np.abs(ras)  # [world axis, voxel axis]
    for _ in range(3):
        masked = weights.copy()
        for o in range(3):
            if order[o] >= 0:
                masked[o, :] = -1
        for v in used:
            masked[:, v] = -1
        world, voxel = (int(n) for n in np.unravel_index(int(np.argmax(masked)), masked.shape))
        order[world] = voxel
        flips[world] = bool(ras[world, voxel] < 0)
        used.add(voxel)
    return order, flips


def _positions(n: int, step: float, reverse: bool) -> np.ndarray:
    """Sample positions 0, step, 2*step, ... voxels along an axis of ``n`` (counted from the
    axis' end, which also flips it, when ``reverse``)."""
    count = math.floor((n - 1) / step + 1e-6) + 1
    pos = np.arange(count, dtype=np.float64) * step
    return (n - 1) - pos if reverse else pos


def _whole_voxel_slice(pos: np.ndarray) -> slice | None:
    """``pos`` as a slice when it is an evenly stepped run of whole voxels (a view, no copy)."""
    step = pos[1] - pos[0] if len(pos) > 1 else 1.0
    if not np.all(pos == np.round(pos)) or step != round(step) or step == 0:
        return None
    if len(pos) > 1 and not np.all(np.diff(pos) == step):
        return None
    first, step = int(pos[0]), int(step)
    stop = first + step * len(pos)
    return slice(first, stop if stop >= 0 else None, step)


def _sample_axis(t: Any, axis: int, pos: np.ndarray) -> Any:
    """Linear interpolation of one axis at ``pos``."""
    import torch

    n = t.shape[axis]
    lo = np.clip(np.floor(pos), 0, n - 1).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * t.dim()
    shape[axis] = len(pos)
    w = torch.from_numpy((pos - lo).astype(np.float32)).view(shape)
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    return torch.lerp(t.index_select(axis, lo_t), t.index_select(axis, hi_t), w)


def _sample_plane(t: Any, axes: tuple[int, int], pos: tuple[np.ndarray, np.ndarray]) -> Any:
    """Bilinear interpolation of two axes at once: ``grid_sample`` over the planes along the
    third axis, each plane its own batch item of one channel, all sharing one small grid.
    (The planes as channels of one item give the same values 5 times slower: each output
    pixel then strides across every plane.)"""
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

    (a, b), (pa, pb) = axes, pos
    other = 3 - a - b
    planes = t.permute(other, a, b)[:, None]
    ga = torch.from_numpy(pa * (2.0 / max(t.shape[a] - 1, 1)) - 1.0).float()
    gb = torch.from_numpy(pb * (2.0 / max(t.shape[b] - 1, 1)) - 1.0).float()
    rows, columns = torch.meshgrid(ga, gb, indexing="ij")
    grid = torch.stack((columns, rows), dim=-1)[None]  # grid_sample's (x, y) = (b, a)
    grid = grid.expand(planes.shape[0], -1, -1, -1)
    out = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inverse = np.argsort([other, a, b])
    return out[:, 0].permute(*[int(v) for v in inverse])


def to_model_space(
    array_hu: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    hu_window: Sequence[float] = ZOO_HU_WINDOW,
) -> ModelImage:
    """A volume ``[k, j, i]`` in HU with its voxel->LPS affine, as the network sees it."""
    import torch

    order, flips = ras_axes(affine)
    shape_xyz = [array_hu.shape[2 - v] for v in order]
    # affine of the reoriented grid: index a_o -> voxel axis order[o] (flipped: n - 1 - a_o)
    to_voxel = np.zeros((4, 4))
    to_voxel[3, 3] = 1
    for o, v in enumerate(order):
        if flips[o]:
            to_voxel[v, o] = -1.0
            to_voxel[v, 3] = shape_xyz[o] - 1
        else:
            to_voxel[v, o] = 1.0
    oriented = affine @ to_voxel
    in_spacing = np.linalg.norm(oriented[:3, :3], axis=0)
    steps = [float(spacing[o]) / float(in_spacing[o]) for o in range(3)]
    # Sample in the array's own layout (voxel axis v is array axis 2 - v); a flipped axis is
    # sampled from its end. Whole-voxel steps (every second slice) are strided views, two
    # fractional axes one bilinear pass, a third a linear pass; then reorient the small result.
    # The window (scale, then clamp) applies to the resampled values.
    positions = {2 - order[o]: _positions(shape_xyz[o], steps[o], flips[o]) for o in range(3)}
    view = [slice(None)] * 3
    fractional = []
    for axis, pos in positions.items():
        whole = _whole_voxel_slice(pos)
        if whole is not None and whole.step > 0:
            view[axis] = whole
        else:
            fractional.append(axis)
    t = torch.from_numpy(np.asarray(array_hu, dtype=np.float32))[tuple(view)]
    # the two axes that shrink the most go first, in one bilinear pass
    fractional.sort(key=lambda axis: len(positions[axis]) / array_hu.shape[axis])
    fractional_sampled = bool(fractional)
    if len(fractional) >= 2:
        first, second = sorted(fractional[:2])
        t = _sample_plane(t, (first, second), (positions[first], positions[second]))
        fractional = fractional[2:]
    for axis in fractional:
        t = _sample_axis(t, axis, positions[axis])
    if not fractional_sampled:  # t may still be a view of the caller's array
        t = t.clone()
    lo, hi = float(hu_window[0]), float(hu_window[1])
    t.sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
    t = t.permute(*[2 - v for v in order])
    scale = np.eye(4)
    scale[:3, :3] = np.diag(steps)
    return ModelImage(np.ascontiguousarray(t.numpy(), dtype=np.float32), oriented @ scale)


# ---------------------------------------------------------------------------------------------
# Candidate crops for the false-positive reduction stage

CROP = 24  # voxels per side
CROP_MM = 1.25  # isotropic: a 30 mm cube


def crop_cubes(
    array_hu: Any,
    affine: np.ndarray,
    centres_lps: np.ndarray,
    size: int = CROP,
    mm: float = CROP_MM,
) -> Any:
    """``[N, 2, size, size, size]`` cubes of ``mm`` voxels around patient points, read from the
    source HU (trilinear, axes along L, P, S): a lung window and a soft-tissue window."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    centres = np.asarray(centres_lps, float).reshape(-1, 3)
    if len(centres) == 0:
        return torch.zeros((0, 2, size, size, size))
    source = (
        array_hu
        if isinstance(array_hu, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(array_hu, dtype=np.float32))
    )
    nk, nj, ni = source.shape
    offsets = (np.arange(size) - (size - 1) / 2) * mm
    # patient grid [z, y, x] of the cube, LPS
    gz, gy, gx = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    local = np.stack([gx, gy, gz], -1).reshape(-1, 3)
    inverse = np.linalg.inv(affine)
    crops = []
    for centre in centres:
        ijk = (local + centre) @ inverse[:3, :3].T + inverse[:3, 3]
        norm = np.stack(
            [2 * ijk[:, 0] / max(ni - 1, 1) - 1, 2 * ijk[:, 1] / max(nj - 1, 1) - 1,
             2 * ijk[:, 2] / max(nk - 1, 1) - 1], -1,
        )  # fmt: skip
        # only the slab of the source that the cube touches
        k0 = max(int(np.floor(ijk[:, 2].min())), 0)
        k1 = min(int(np.ceil(ijk[:, 2].max())) + 1, nk)
        if k1 <= k0:
            crops.append(torch.full((size, size, size), -1024.0))
            continue
        slab = source[k0:k1]
        if k1 - k0 == 1:
            slab = torch.cat([slab, slab])
        norm[:, 2] = 2 * (ijk[:, 2] - k0) / max(slab.shape[0] - 1, 1) - 1
        grid = torch.from_numpy(norm.astype(np.float32)).view(1, size, size, size, 3)
        out = F.grid_sample(
            slab[None, None].float(), grid, mode="bilinear", padding_mode="border",
            align_corners=True,
        )  # fmt: skip
        crops.append(out[0, 0])
    hu = torch.stack(crops)
    lung = ((hu + 1024.0) / 1324.0).clamp(0, 1)
    soft = ((hu + 160.0) / 400.0).clamp(0, 1)
    return torch.stack([lung, soft], 1)
