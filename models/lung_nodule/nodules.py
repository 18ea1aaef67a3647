"""Nodules once detected: a candidate and its probability, the boxes left twice on one nodule
dropped, and a nodule's measurement (segmentation, volume, diameter, texture) on the source grid.

Apart from the model class: plain arrays and affines, no network, tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicomnode.inference.regions import bounding_box


@dataclass
class Candidate:
    """One detection, before the probability threshold."""

    centre_mm: np.ndarray  # LPS
    size_mm: np.ndarray  # box extent along the model grid's axes (R, A, S), mm
    detector_score: float
    classifier_score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def probability(self) -> float:
        if self.classifier_score is None:
            return self.detector_score
        return math.sqrt(self.detector_score * self.classifier_score)


def distinct(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Best first, without candidates that overlap a better one deeply (centres closer than
    0.6 of their radii's sum): a second box on one nodule, offset or of another size, can
    overlap it too little for the detector's non-maximum suppression; two real nodules that
    touch are a radii's sum apart."""
    kept: list[Candidate] = []
    for candidate in candidates:
        inside = any(
            np.linalg.norm(candidate.centre_mm - other.centre_mm)
            < 0.6 * (float(np.max(other.size_mm)) + float(np.max(candidate.size_mm))) / 2
            for other in kept
        )
        if not inside:
            kept.append(candidate)
    return kept


# ---------------------------------------------------------------------------------------------
# Measurement: a nodule's voxels on the source grid


def _image(mask: np.ndarray) -> Any:
    import SimpleITK as sitk  # noqa: N813

    return sitk.GetImageFromArray(mask.astype(np.uint8))


def _array(image: Any) -> np.ndarray:
    import SimpleITK as sitk  # noqa: N813

    return sitk.GetArrayFromImage(image).astype(bool)


def _morph(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Binary erosion or dilation by a ball of ``radius`` voxels."""
    import SimpleITK as sitk  # noqa: N813

    f = sitk.BinaryErodeImageFilter() if erode else sitk.BinaryDilateImageFilter()
    f.SetKernelType(sitk.sitkBall)
    f.SetKernelRadius(int(radius))
    f.SetForegroundValue(1)
    if erode:
        f.SetBoundaryToForeground(False)
    return _array(f.Execute(_image(mask)))


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Voxels of ``allowed`` connected (26-neighbourhood) to ``seed``."""
    import SimpleITK as sitk  # noqa: N813

    start = seed & allowed
    if not start.any():
        return start
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(_image(allowed), True))
    ids = np.unique(labels[start])
    return np.isin(labels, ids[ids > 0])


def _open_by_reconstruction(region: np.ndarray, seed: np.ndarray, steps: int) -> np.ndarray:
    """``region`` opened by a ball of ``steps`` voxels, then grown back within itself from
    ``seed``: what a thin vessel joined to the nodule leaves out. Computed on the region's own
    box plus one voxel (all outside it is background either way, so the result is the same),
    a few times smaller than the measuring box."""
    inner = bounding_box(region, margin=1)
    assert inner is not None
    kept = _grow(seed[inner], _morph(region[inner], steps, erode=True))
    if not kept.any():
        return region
    opened = np.zeros_like(region)
    opened[inner] = _morph(kept, steps, erode=False) & region[inner]
    return opened


@dataclass
class Measurement:
    volume_mm3: float
    diameter_mm: float
    texture: str
    core_hu: float
    box: tuple[slice, slice, slice]  # where ``mask`` sits in the source array
    mask: np.ndarray  # bool, the box's shape


def measure_nodule(
    array_hu: np.ndarray,
    affine: np.ndarray,
    centre_lps: np.ndarray,
    size_mm: np.ndarray,
    solid_hu: float = -300.0,
    ground_glass_hu: float = -750.0,
) -> Measurement | None:
    """Segment one nodule around ``centre_lps`` (its detected box ``size_mm`` along L, P, S)."""
    inverse = np.linalg.inv(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)  # (i, j, k)
    centre = centre_lps @ inverse[:3, :3].T + inverse[:3, 3]
    radius_mm = float(np.clip(np.max(size_mm) * 0.75 + 3.0, 4.0, 40.0))
    half = np.ceil(radius_mm / spacing).astype(int)
    shape_ijk = np.array(array_hu.shape[::-1])
    c = np.rint(centre).astype(int)
    lo = np.clip(c - half, 0, shape_ijk - 1)
    hi = np.clip(c + half + 1, 1, shape_ijk)
    if np.any(hi <= lo):
        return None
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    hu = np.asarray(array_hu[box], dtype=np.float32)
    # distances (mm) from the centre, in patient space (any orientation)
    kk, jj, ii = np.meshgrid(*[np.arange(lo[a], hi[a]) - centre[a] for a in (2, 1, 0)],
                             indexing="ij", sparse=True)  # fmt: skip
    m = affine[:3, :3]
    dist = np.sqrt(sum((m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * kk) ** 2 for r in range(3)))
    core_r = max(float(np.min(size_mm)) * 0.2, float(spacing.max()) * 0.75, 1.0)
    core_voxels = hu[dist <= core_r]
    if core_voxels.size == 0:
        return None
    core = float(np.median(core_voxels))
    shell = hu[(dist > radius_mm * 0.8) & (dist <= radius_mm)]
    background = float(np.quantile(shell, 0.25)) if shell.size else -850.0
    texture = "solid" if core > solid_hu else "ground_glass"
    threshold = float(np.clip((core + min(background, -600.0)) / 2, ground_glass_hu, solid_hu))
    if core <= ground_glass_hu:
        return None
    limit_mm = min(radius_mm, 0.6 * float(np.max(size_mm)) + float(spacing.max()))
    inside = (hu > threshold) & (dist <= limit_mm)
    seed = dist <= max(core_r * 0.5, float(spacing.max()) * 0.6)
    if not (seed & inside).any():
        seed = dist <= core_r
    region = _grow(seed, inside)
    # cut vessels off: an opening by reconstruction, its size a third of the nodule's radius
    steps = int(0.3 * float(np.min(size_mm)) / 2 / float(spacing.max()))
    if steps >= 1 and region.any():
        region = _open_by_reconstruction(region, seed, steps)
    voxels = int(region.sum())
    if voxels == 0:
        return None
    volume = voxels * float(abs(np.linalg.det(affine[:3, :3])))
    diameter = (6.0 * volume / math.pi) ** (1.0 / 3.0)
    return Measurement(volume, diameter, texture, core, box, region)
