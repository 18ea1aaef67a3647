"""Findings as a job's JSON result, with their masks in files beside the spool, and back."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dicomnode.domain import Code, Finding, Findings, MaskRef
from dicomnode.inference.regions import bounding_box

#: where a job's masks go, under the storage directory: results/<job id>/<mask name>.npz
RESULTS_DIR = "results"


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready values: dataclasses and mappings as dicts, numpy scalars and
    arrays as numbers and lists, tuples as lists, paths as text, NaN/inf as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return jsonable(tolist())
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r:.80}")


def write_masks(
    findings: Findings, storage_dir: Path, job_id: int | str
) -> dict[str, dict[str, Any]]:
    """Save each mask as ``results/<job id>/<name>.npz`` under ``storage_dir`` (read it back
    with :func:`read_mask`); their paths (relative to ``storage_dir``), shapes and label
    values."""
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    if not findings.masks:
        return out
    folder = storage_dir / RESULTS_DIR / str(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in findings.masks.items():
        array = np.asarray(mask)
        if array.dtype == bool:
            array = array.astype(np.uint8)
        elif not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"mask {name!r} is {array.dtype}; masks are integer label maps")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        path = folder / f"{safe}.npz"
        # only the labelled box: a CT-sized label map is mostly zeros, which would cost 0.1 s to
        # compress (512x512x300) for nothing
        box = bounding_box(array) or tuple(slice(0, 0) for _ in array.shape)
        labelled = array[box]
        origin = [s.start for s in box]
        _save_npz(path, mask=labelled, origin=np.array(origin), shape=np.array(array.shape))
        out[name] = {
            "path": str(path.relative_to(storage_dir)),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "labels": [int(v) for v in np.unique(labelled[labelled != 0])],
        }
    return out


def read_mask(path: Path) -> Any:
    """A mask written by :func:`write_masks`, whole (its file holds the labelled box only)."""
    import numpy as np

    with np.load(path) as data:
        box = data["mask"]
        if "origin" not in data:
            return box  # written whole
        whole = np.zeros(tuple(int(n) for n in data["shape"]), dtype=box.dtype)
        whole[tuple(slice(o, o + n) for o, n in zip(data["origin"], box.shape, strict=True))] = box
    return whole


def _save_npz(path: Path, **arrays: Any) -> None:
    """``np.savez_compressed(path, **arrays)`` at a fast compression level (as well packed for
    label maps, in half the time of numpy's default)."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=3) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


#: the mask name under which a label map's findings keep their voxels
LABEL_MAP = "labels"


@dataclasses.dataclass(frozen=True)
class MapLabel:
    """One label value of a label map: its name, its finding type's code, its SEG category."""

    value: int
    name: str
    code: Code
    category: str | None = None


def label_map_findings(
    labels: Any, geometry: Any, classes: Iterable[MapLabel]
) -> tuple[list[Finding], dict[str, int]]:
    """One finding per label with voxels (its volume and centre; its voxels the map's, under
    :data:`LABEL_MAP`), and each label's voxel count. ``labels`` is ``[slice, row, column]``
    on ``geometry`` (a :class:`~dicomnode.imaging.Geometry`)."""
    import numpy as np

    voxel_mm3 = float(abs(np.linalg.det(geometry.affine[:3, :3])))
    findings, voxels = [], {}
    for label in classes:
        # counts per slice, row and column of one boolean mask: no index arrays (np.nonzero
        # takes 24 bytes a voxel, gigabytes on a whole CT)
        mask = labels == label.value
        per_slice = mask.sum(axis=(1, 2), dtype=np.int64)
        count = int(per_slice.sum())
        voxels[label.name] = count
        if not count:
            continue
        per_row = mask.sum(axis=(0, 2), dtype=np.int64)
        per_column = mask.sum(axis=(0, 1), dtype=np.int64)
        k, j, i = (float(np.dot(np.arange(n.size), n)) / count
                   for n in (per_slice, per_row, per_column))  # fmt: skip
        centre = geometry.voxel_to_patient([i, j, k])
        findings.append(
            Finding(
                label=label.name,
                finding_type=label.code,
                probability=1.0,  # a label map: each voxel is the label's or not
                centre_mm=tuple(round(float(c), 3) for c in centre),  # type: ignore[arg-type]
                volume_mm3=round(count * voxel_mm3, 3),
                mask=MaskRef(LABEL_MAP, label.value),
                category=label.category,
            )
        )
    return findings, voxels


def findings_to_json(findings: Findings, masks: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON form of ``findings``; ``masks`` replaces the arrays (see :func:`write_masks`)."""
    return {
        "model": findings.model,
        "version": findings.version,
        "demo": findings.demo,
        "reference": findings.reference,
        "findings": [jsonable(f) for f in findings.findings],
        "masks": jsonable(masks or {}),
        "summary": jsonable(findings.summary),
    }


def findings_from_json(result: Mapping[str, Any], storage_dir: Path | None = None) -> Findings:
    """Findings back from a job result; with ``storage_dir``, their masks read from the files."""
    masks: dict[str, Any] = {}
    if storage_dir is not None:
        for name, entry in (result.get("masks") or {}).items():
            masks[name] = read_mask(storage_dir / entry["path"])
    return Findings(
        model=result["model"],
        version=result["version"],
        demo=bool(result["demo"]),
        findings=tuple(_finding(f) for f in result.get("findings") or ()),
        masks=masks,
        reference=result.get("reference"),
        summary=dict(result.get("summary") or {}),
    )


def _finding(values: Mapping[str, Any]) -> Finding:
    def code(v: Any) -> Code | None:
        return Code(v["value"], v["scheme"], v["meaning"]) if v else None

    centre = None
    if values.get("centre_mm") is not None:
        x, y, z = (float(c) for c in values["centre_mm"])
        centre = (x, y, z)
    mask = values.get("mask")
    finding_type = code(values["finding_type"])
    assert finding_type is not None
    return Finding(
        label=values["label"],
        finding_type=finding_type,
        probability=float(values["probability"]),
        finding_site=code(values.get("finding_site")),
        centre_mm=centre,
        diameter_mm=values.get("diameter_mm"),
        volume_mm3=values.get("volume_mm3"),
        mask=MaskRef(mask["name"], int(mask["value"])) if mask else None,
        attributes=dict(values.get("attributes") or {}),
        category=values.get("category"),
    )
