"""Planar images (ophthalmic OCT B-scans, fundus photographs) as a Volume of frames.

``load_series`` builds patient-space volumes and refuses what cannot be one. Ophthalmic series
are often not: colour photographs (3 samples per pixel, RGB or YBR_FULL_422 from JPEG) with no
Image Position at all, and OCT cubes whose frames carry only Pixel Measures (ophthalmic OCT
places B-scans in its own Ophthalmic Frame Location groups, relative to a fundus image, not in
patient coordinates). ``load_planar`` keeps every frame as one slice of a Volume:

- when every frame has Image Position and Orientation (Patient) (per-frame / shared Plane
  Position and Orientation groups, or single-frame attributes) and they form one regular stack,
  the slices are ordered and placed exactly as ``load_series`` places them;
- otherwise the volume gets a **nominal geometry**: identity orientation at the origin, the Pixel
  Spacing (1 mm without one) in-plane and the frames' spacing or thickness (1 mm without one)
  between them, the frames in Instance Number then frame order. Such a volume's millimetres are
  not patient coordinates; results are referenced by frame (``Volume.frames``), never by position.

Colour frames keep their RGB axis: ``array[k, j, i, 3]`` (float32 0..255).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.errors import MismatchedFrames, SeriesNotVolume, UnsupportedPixels
from dicomnode.imaging.frames import FrameInfo, frames_of, read_dataset
from dicomnode.imaging.geometry import Geometry
from dicomnode.imaging.stack import StackRules, plan_one
from dicomnode.imaging.volume import FrameRef, Volume

log = logging.getLogger(__name__)

#: Ophthalmic Photography 8/16 Bit, Tomography, Wide Field, Optical Coherence Tomography B-scan
#: Volume Analysis and Ophthalmic Thickness Map Image Storage share this root
OPHTHALMIC_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.77.1.5."
PLANAR_MODALITIES = frozenset({"OP", "OPT"})


def is_planar(modality: str, sop_classes: Collection[str] = ()) -> bool:
    """Whether a series is ophthalmic imaging, to be loaded with :func:`load_planar`."""
    return modality.upper() in PLANAR_MODALITIES or any(
        str(uid).startswith(OPHTHALMIC_CLASS_ROOT) for uid in sop_classes
    )


def _read(paths: Sequence[Path | str]) -> list[tuple[str, Dataset]]:
    if not paths:
        raise SeriesNotVolume("no files were given: an empty series has no frames")
    read: list[tuple[str, Dataset]] = []
    seen: set[str] = set()
    for path in paths:
        name = Path(path).name
        ds = read_dataset(path)
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue
        seen.add(uid)
        if "PixelData" not in ds:
            raise UnsupportedPixels(f"{name} has no pixel data (SOP Class {ds.get('SOPClassUID')})")
        samples = int(ds.get("SamplesPerPixel", 1))
        if samples not in (1, 3):
            raise UnsupportedPixels(
                f"{name} has {samples} samples per pixel; expected 1 (grey) or 3 (colour)"
            )
        read.append((str(path), ds))
    read.sort(key=lambda item: (int(item[1].get("InstanceNumber", 0) or 0), item[0]))
    first = read[0][1]
    shape = (int(first.Rows), int(first.Columns), int(first.get("SamplesPerPixel", 1)))
    for path, ds in read[1:]:
        other = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1)))
        if other != shape:
            raise MismatchedFrames(
                f"{Path(path).name} is {other[0]}x{other[1]} with {other[2]} samples per pixel; "
                f"{Path(read[0][0]).name} is {shape[0]}x{shape[1]} with {shape[2]}"
            )
    return read


def _frame_records(read: Sequence[tuple[str, Dataset]]) -> list[FrameInfo] | None:
    """The frame records (position, rescale, ...) of every frame; None for a multi-frame object
    without functional groups, whose frames have none."""
    records: list[FrameInfo] = []
    for source, (path, ds) in enumerate(read):
        try:
            records.extend(frames_of(ds, path, source))
        except SeriesNotVolume:
            return None
    return records


def _nominal(read: Sequence[tuple[str, Dataset]], count: int) -> Geometry:
    """Identity orientation; Pixel Spacing in-plane, the frames' spacing between them."""
    ds = read[0][1]
    spacing: Sequence[float] | None = None
    between: float | None = None
    shared = ds.get("SharedFunctionalGroupsSequence")
    measures = shared[0].get("PixelMeasuresSequence") if shared else None
    if measures:
        spacing = measures[0].get("PixelSpacing")
        between = measures[0].get("SpacingBetweenSlices") or measures[0].get("SliceThickness")
    spacing = spacing or ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
    between = between or ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
    row, column = (float(v) for v in spacing)
    step = float(between)
    if not all(np.isfinite((row, column, step))) or min(row, column, step) <= 0:
        row, column, step = 1.0, 1.0, 1.0
    return Geometry.from_parts(
        (0.0, 0.0, 0.0), np.eye(3), (column, row, step), (count, int(ds.Rows), int(ds.Columns))
    )


def _pixels(path: str, ds: Dataset) -> np.ndarray:
    """All frames of one object, ``[frames, rows, columns(, 3)]``, colour as RGB."""
    try:
        pixels = ds.pixel_array  # pydicom converts YBR (JPEG) to RGB
    except Exception as exc:  # no decoder, corrupt stream, ...
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise UnsupportedPixels(
            f"{Path(path).name}: pixel data in transfer syntax {getattr(syntax, 'name', syntax)} "
            f"cannot be decoded: {exc}"
        ) from exc
    samples = int(ds.get("SamplesPerPixel", 1))
    tail = (int(ds.Rows), int(ds.Columns)) + ((3,) if samples == 3 else ())
    return pixels.reshape((-1, *tail))


def load_planar(paths: Sequence[Path | str], *, rules: StackRules | None = None) -> Volume:
    """Every frame of the files as one Volume (grey ``[k, j, i]`` or colour ``[k, j, i, 3]``)."""
    read = _read(paths)
    records = _frame_records(read)
    geometry: Geometry | None = None
    order: list[tuple[int, int, FrameRef]] = []  # (source, frame index, reference)
    placed = records is not None and all(
        r.position is not None and r.orientation is not None for r in records
    )
    if placed:
        try:
            stack = plan_one(records or [], rules or StackRules())
        except SeriesNotVolume as exc:
            log.debug("frames do not form a stack (%s); nominal geometry", exc,
                      extra={"action": "imaging"})  # fmt: skip
        else:
            geometry = stack.geometry
            order = [(f.source, f.index, f.ref) for f in stack.frames]
    nominal = geometry is None
    if geometry is None:
        for source, (path, ds) in enumerate(read):
            count = int(ds.get("NumberOfFrames", 1) or 1)
            multi = "NumberOfFrames" in ds
            for f in range(count):
                ref = FrameRef(str(ds.SOPInstanceUID), str(ds.get("SOPClassUID", "")),
                               f + 1 if multi else None, path)  # fmt: skip
                order.append((source, f, ref))
        geometry = _nominal(read, len(order))
    decoded: dict[int, np.ndarray] = {}
    slope_of = {(r.source, r.index): (r.slope, r.intercept) for r in records or ()}
    first = decoded.setdefault(order[0][0], _pixels(*read[order[0][0]]))
    array = np.empty((len(order), *first.shape[1:]), dtype=np.float32)
    for k, (source, index, _) in enumerate(order):
        if source not in decoded:
            decoded[source] = _pixels(*read[source])
        frames = decoded[source]
        if index >= len(frames):
            raise MismatchedFrames(
                f"{Path(read[source][0]).name} declares frame {index + 1} but holds {len(frames)}"
            )
        array[k] = frames[index]
        slope, intercept = slope_of.get((source, index), (1.0, 0.0))
        if array.ndim == 3 and (slope != 1.0 or intercept != 0.0):
            array[k] = array[k] * np.float32(slope) + np.float32(intercept)
    ds0 = read[0][1]
    volume = Volume(
        array=array,
        geometry=geometry,
        frames=tuple(ref for _, _, ref in order),
        modality=str(ds0.get("Modality", "")),
        series_instance_uid=str(ds0.get("SeriesInstanceUID", "")),
    )
    log.debug(
        "loaded %d files as %d planar frames%s",
        len(read),
        len(order),
        " (nominal geometry)" if nominal else "",
        extra={"action": "imaging"},
    )
    return volume
