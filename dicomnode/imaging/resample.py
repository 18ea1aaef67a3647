"""Resample a volume onto a new spacing or onto another grid (SimpleITK, imported lazily)."""

from __future__ import annotations

import numpy as np

from dicomnode.imaging.geometry import Geometry
from dicomnode.imaging.volume import Volume

#: Interpolation order -> SimpleITK interpolator name.
_INTERPOLATORS = {0: "sitkNearestNeighbor", 1: "sitkLinear", 3: "sitkBSpline"}


def respaced(
    geometry: Geometry, spacing: tuple[float, float, float], *, orthonormal: bool = True
) -> Geometry:
    """The grid covering the same box as ``geometry`` with a new (column, row, slice) spacing.

    With ``orthonormal`` the slice axis becomes the normal of the image plane, which removes a
    gantry tilt's shear. The box's outer edges stay put, so nothing shifts by half a voxel.
    """
    new = np.asarray(spacing, dtype=np.float64)
    if new.shape != (3,) or np.any(new <= 0):
        raise ValueError(f"spacing must be three positive mm values, not {spacing}")
    axes = geometry.affine[:3, :3]
    direction = geometry.direction
    if orthonormal:
        i = direction[:, 0]
        j = direction[:, 1] - np.dot(direction[:, 1], i) * i
        j /= np.linalg.norm(j)
        k = np.cross(i, j)
        if np.dot(k, axes[:, 2]) < 0:
            k = -k
        direction = np.stack([i, j, k], axis=1)
    # Extent of the old grid along each new axis, in mm (voxel count x step along that axis).
    old = np.abs(np.einsum("ia,ia->a", direction, axes))
    counts = np.array(geometry.shape[::-1], dtype=np.float64)
    size = np.maximum(1, np.rint(counts * old / new)).astype(int)
    origin = geometry.origin + direction @ ((new - old) / 2)
    return Geometry.from_parts(origin, direction, tuple(new), (size[2], size[1], size[0]))


def resample(
    volume: Volume,
    spacing: tuple[float, float, float],
    *,
    order: int = 1,
    reference: Geometry | None = None,
    fill: float | None = None,
) -> Volume:
    """Resample onto ``spacing`` (same orientation, same box) or onto ``reference``'s grid.

    With a reference, its grid is used as is when ``spacing`` equals its spacing, else its box at
    the new spacing. ``order`` is 0 (nearest, for labels), 1 (linear) or 3 (cubic B-spline).
    Outside the source, voxels get ``fill`` (default: -1024 for CT, 0 otherwise). Each output
    slice's frame ref is the source frame nearest that slice's centre.
    """
    if order not in _INTERPOLATORS:
        raise ValueError(f"order must be one of {sorted(_INTERPOLATORS)}, not {order}")
    if reference is None:
        target = respaced(volume.geometry, spacing)
    elif np.allclose(spacing, reference.spacing, rtol=1e-6, atol=1e-9):
        target = reference
    else:
        target = respaced(reference, spacing, orthonormal=False)
    if fill is None:
        fill = -1024.0 if volume.modality == "CT" else 0.0

    array = _sitk_resample(volume.array, volume.geometry, target, order, fill)
    to_source = np.linalg.inv(volume.geometry.affine) @ target.affine

    centres = np.array(
        [[(target.shape[2] - 1) / 2, (target.shape[1] - 1) / 2, k] for k in range(target.shape[0])]
    )
    source_k = centres @ to_source[:3, :3].T + to_source[:3, 3]
    nearest = np.clip(np.rint(source_k[:, 2]).astype(int), 0, volume.array.shape[0] - 1)
    return Volume(
        array=array,
        geometry=target,
        frames=tuple(volume.frames[k] for k in nearest),
        modality=volume.modality,
        series_instance_uid=volume.series_instance_uid,
    )


def _orthonormal(geometry: Geometry) -> bool:
    direction = geometry.direction
    return bool(np.allclose(direction.T @ direction, np.eye(3), atol=1e-6))


def _sitk_resample(
    array: np.ndarray, source: Geometry, target: Geometry, order: int, fill: float
) -> np.ndarray:
    import SimpleITK as sitk  # noqa: N813 -- heavy: only workers that resample pay for it

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(target.shape[2]), int(target.shape[1]), int(target.shape[0])])
    if _orthonormal(source) and _orthonormal(target):
        # Both grids in patient space with an identity transform: ITK's fastest path.
        for grid, set_spacing, set_origin, set_direction in (
            (source, image.SetSpacing, image.SetOrigin, image.SetDirection),
            (
                target,
                resampler.SetOutputSpacing,
                resampler.SetOutputOrigin,
                resampler.SetOutputDirection,
            ),
        ):
            set_spacing(grid.spacing)
            set_origin(grid.origin.tolist())
            set_direction(grid.direction.ravel().tolist())
    else:
        # A sheared grid (gantry tilt): both images in index space, one affine from output
        # indices to source indices, so no direction matrix has to be orthonormal.
        to_source = np.linalg.inv(source.affine) @ target.affine
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(to_source[:3, :3].ravel().tolist())
        transform.SetTranslation(to_source[:3, 3].tolist())
        resampler.SetTransform(transform)
    resampler.SetInterpolator(getattr(sitk, _INTERPOLATORS[order]))
    resampler.SetDefaultPixelValue(float(fill))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampler.Execute(image))
