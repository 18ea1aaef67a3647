"""A command model's label map (``dicomnode`` contract): ``out/*.nii.gz`` and ``labels.json``.

The program writes one NIfTI label map on the grid of an input series and, optionally,
``labels.json``: label value -> name, or -> ``{"name": ..., "code": {"value", "scheme",
"meaning"}}``. A value it does not name takes its name from the model's ``labels`` setting;
a name without a code is coded as a MONAI bundle's labels are
(:func:`dicomnode.inference.bundle_model.label_code`: SNOMED CT by name, else the node's own
scheme).

The map's affine (NIfTI's RAS, nibabel's ``affine``) must put its voxels where the series' are,
within :func:`tolerance_mm`: the same grid, its axes in any order and direction (it is
transposed and flipped to the node's ``[slice, row, column]``), never resampled. To help a
program, ``job.json`` gives each series' grid as a NIfTI of it would have it
(:func:`grid_json`: ``shape`` [columns, rows, slices] and ``affine_ras``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.errors import CommandOutputInvalid
from dicomnode.inference.findings import MapLabel

if TYPE_CHECKING:
    from dicomnode.imaging import Geometry

#: the label names and codes beside the label map
LABELS_JSON = "labels.json"
#: the mask the label map goes under in the findings
#: a voxel of the map may lie this far from the series' (mm), at most a tenth of a voxel
GRID_TOLERANCE_MM = 0.1
#: LPS <-> RAS
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def grid_json(geometry: Geometry) -> dict[str, Any]:
    """A series' grid as NIfTI has it: voxel (i, j, k) = (column, row, slice), affine in RAS."""
    return {
        "shape": [geometry.shape[2], geometry.shape[1], geometry.shape[0]],
        "affine_ras": np.round(_FLIP @ geometry.affine, 6).tolist(),
        "space": "RAS",
    }


def tolerance_mm(geometry: Geometry) -> float:
    return min(GRID_TOLERANCE_MM, 0.1 * min(geometry.spacing))


def _describe(affine_ras: np.ndarray, shape: Sequence[int]) -> str:
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    return (
        f"{'x'.join(str(int(n)) for n in shape)} voxels of "
        f"{'x'.join(f'{s:.4g}' for s in spacing)} mm, voxel (0,0,0) at RAS "
        f"[{', '.join(f'{v:.3f}' for v in affine_ras[:3, 3])}]"
    )


def read_label_map(path: Path, grids: Mapping[str, Geometry], where: str) -> tuple[str, np.ndarray]:
    """The map at ``path`` as the node's label map (``[slice, row, column]``, non-negative
    integers) on the grid of one of the series ``grids`` (series UID -> grid): that series' UID
    and the map; CommandOutputInvalid naming what is wrong (``where``: the file and model, for
    the message)."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        affine = np.asarray(image.affine, dtype=np.float64)  # type: ignore[attr-defined]
        data = np.asanyarray(image.dataobj)  # type: ignore[attr-defined]
    except Exception as exc:  # nibabel raises many kinds for a damaged or foreign file
        raise CommandOutputInvalid(
            f"{where} is not a NIfTI label map nibabel can read ({type(exc).__name__}: {exc})"
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise CommandOutputInvalid(
            f"{where} has shape {tuple(data.shape)}; a label map is 3-D (one value per voxel)"
        )
    values = _integers(data, where)
    reasons = []
    for uid, geometry in grids.items():
        try:
            return uid, _onto(values, affine, geometry, where, uid)
        except CommandOutputInvalid as exc:
            reasons.append(str(exc))
    raise CommandOutputInvalid("; ".join(reasons) or f"{where}: the job has no series grid")


def _integers(data: np.ndarray, where: str) -> np.ndarray:
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.rint(data)):
            raise CommandOutputInvalid(
                f"{where} holds values that are not whole numbers; a label map's are label values"
            )
    elif data.dtype.kind not in "iub":
        raise CommandOutputInvalid(f"{where} holds {data.dtype} values, not label values")
    if data.size and data.min() < 0:
        raise CommandOutputInvalid(f"{where} holds negative values ({data.min()})")
    if data.size and data.max() > 65535:
        raise CommandOutputInvalid(f"{where} holds label {data.max()}; at most 65535")
    return data.astype(np.uint16)


def _onto(
    data: np.ndarray, affine_ras: np.ndarray, geometry: Geometry, where: str, series: str
) -> np.ndarray:
    """``data`` (NIfTI voxel order) transposed and flipped onto ``geometry``'s ``[k, j, i]``
    when its grid is the series' (its axes permuted or reversed)."""
    series_ras = _FLIP @ geometry.affine
    series_xyz = (geometry.shape[2], geometry.shape[1], geometry.shape[0])

    def mismatch(why: str) -> CommandOutputInvalid:
        return CommandOutputInvalid(
            f"{where} is not on the grid of series {series}: {why} (label map: "
            f"{_describe(affine_ras, data.shape)}; series: {_describe(series_ras, series_xyz)}); "
            "the node does not resample label maps"
        )

    if abs(np.linalg.det(affine_ras[:3, :3])) < 1e-12:
        raise mismatch("its affine is singular")
    # the map's voxel (a0, a1, a2) in the series' voxel indices (i, j, k)
    to_series = np.linalg.inv(series_ras) @ affine_ras
    linear = to_series[:3, :3]
    axis = [int(np.argmax(np.abs(linear[:, a]))) for a in range(3)]
    sign = [1 if linear[axis[a], a] > 0 else -1 for a in range(3)]
    if sorted(axis) != [0, 1, 2]:
        raise mismatch("its voxel axes do not run along the series' columns, rows and slices")
    shape = [series_xyz[axis[a]] for a in range(3)]
    if list(data.shape) != shape:
        raise mismatch(
            f"its shape {list(data.shape)} is not the series' {shape} in the map's axis order"
        )
    ideal = np.zeros((4, 4))
    ideal[3, 3] = 1.0
    for a in range(3):
        ideal[axis[a], a] = sign[a]
        ideal[axis[a], 3] = 0 if sign[a] > 0 else series_xyz[axis[a]] - 1
    corners = np.array(
        [[x, y, z, 1.0] for x in (0, shape[0] - 1) for y in (0, shape[1] - 1)
         for z in (0, shape[2] - 1)]
    ).T  # fmt: skip
    off = np.linalg.norm((affine_ras @ corners - series_ras @ ideal @ corners)[:3], axis=0)
    tolerance = tolerance_mm(geometry)
    if off.max() > tolerance:
        raise mismatch(
            f"its voxels lie up to {off.max():.3f} mm from the series' (tolerance "
            f"{tolerance:.3g} mm)"
        )
    order = [axis.index(b) for b in range(3)]  # the map's axis that is i, j, k
    xyz = data.transpose(order)
    flips = tuple(b for b in range(3) if sign[order[b]] < 0)
    if flips:
        xyz = np.flip(xyz, axis=flips)
    return np.ascontiguousarray(xyz.transpose(2, 1, 0))


def read_labels(
    path: Path | None, configured: Mapping[int, str], where: str
) -> dict[int, tuple[str, dict[str, Any] | None]]:
    """``labels.json`` (if any) over the ``labels`` setting: value -> (name, code or None)."""
    labels: dict[int, tuple[str, dict[str, Any] | None]] = {
        int(value): (name, None) for value, name in configured.items()
    }
    if path is None:
        return labels
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CommandOutputInvalid(f"{where}: {LABELS_JSON} is not JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise CommandOutputInvalid(
            f"{where}: {LABELS_JSON} must be an object of label value -> name "
            f'(e.g. {{"1": "liver"}}), not {type(values).__name__}'
        )
    for key, entry in values.items():
        if not re.fullmatch(r"\d+", str(key)) or int(key) == 0:
            raise CommandOutputInvalid(
                f"{where}: {LABELS_JSON} key {key!r} is no label value (1 to 65535; 0 is "
                "the background)"
            )
        if isinstance(entry, str):
            name, code = entry, None
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, code = entry["name"], entry.get("code")
            if code is not None and not isinstance(code, dict):
                raise CommandOutputInvalid(
                    f"{where}: {LABELS_JSON} label {key}: code must be {{value, scheme, "
                    f"meaning}}, not {code!r}"
                )
        else:
            raise CommandOutputInvalid(
                f"{where}: {LABELS_JSON} label {key}: expected a name or {{name, code}}, "
                f"not {entry!r}"
            )
        if not name.strip():
            raise CommandOutputInvalid(f"{where}: {LABELS_JSON} label {key} has an empty name")
        labels[int(key)] = (name, code)
    return labels


def map_labels(
    present: Sequence[int],
    named: Mapping[int, tuple[str, dict[str, Any] | None]],
    where: str,
) -> list[MapLabel]:
    """Every named label (sorted by value) with its code; CommandOutputInvalid when a value
    ``present`` in the map is named nowhere, or two values share a name."""
    from pydantic import ValidationError

    from dicomnode.inference.bundle_model import label_code
    from dicomnode.inference.protocol import CodeSpec

    unknown = sorted(v for v in present if v != 0 and v not in named)
    if unknown:
        raise CommandOutputInvalid(
            f"{where} holds label value(s) {unknown}, named neither in out/{LABELS_JSON} nor "
            f"in the model's labels setting (named: {sorted(named) or 'none'})"
        )
    out: list[MapLabel] = []
    seen: dict[str, int] = {}
    for value, (name, code) in sorted(named.items()):
        if name in seen:
            raise CommandOutputInvalid(
                f"{where}: labels {seen[name]} and {value} are both named {name!r}"
            )
        seen[name] = value
        if code is None:
            spec, _ = label_code(name)
        else:
            try:
                spec = CodeSpec(**code)
            except (ValidationError, TypeError) as exc:
                raise CommandOutputInvalid(
                    f"{where}: label {value} ({name!r}) has a code the node cannot use "
                    f"(expected value, scheme, meaning): {exc}"
                ) from exc
        out.append(MapLabel(value, name, spec.code))
    return out
