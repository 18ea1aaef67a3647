"""DICOM files -> one record per frame (position, orientation, size, rescale), and their pixels.

Single-frame images and enhanced multi-frame objects (per-frame and shared functional groups)
become the same records, so stacking never cares where a frame came from.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, overload

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from dicomnode.errors import NoImagePosition, SeriesNotVolume, UnsupportedPixels
from dicomnode.imaging.volume import FrameRef

log = logging.getLogger(__name__)

Triple = tuple[float, float, float]
_Numbers = Iterable[str | float] | None  # a numeric attribute's values (DS text, or numbers)


@dataclass(frozen=True)
class FrameInfo:
    """What stacking needs to know about one frame; ``source`` indexes the loaded datasets."""

    ref: FrameRef
    source: int
    index: int
    position: Triple | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) as in DICOM
    thickness: float | None
    rows: int
    columns: int
    slope: float
    intercept: float
    localizer: bool
    series_uid: str
    frame_of_reference: str
    modality: str

    @property
    def name(self) -> str:
        """Short name for messages: the file and, for multi-frame, the frame."""
        base = Path(self.ref.path).name
        return base if self.ref.frame_number is None else f"{base} frame {self.ref.frame_number}"


@overload
def _floats(value: _Numbers, count: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats(value: _Numbers, count: Literal[3]) -> Triple | None: ...
@overload
def _floats(value: _Numbers, count: int) -> tuple[float, ...] | None: ...
def _floats(value: _Numbers, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers, or None (absent, another count, not numbers)."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _number(value: str | float | None, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


# Attributes as read, without pydicom's conversion of each element (its value hooks cost about
# 20 us an element: 0.1 s for the 17 attributes of 300 CT slices). An element already converted,
# or one of big-endian data, goes through pydicom as usual.


@functools.cache
def _tag(keyword: str) -> BaseTag:
    return Tag(keyword)


def _raw(ds: Dataset, keyword: str) -> bytes | DataElement | RawDataElement | None:
    """The element's value bytes while still raw and little endian; else the element itself
    (None when absent)."""
    element = ds.get_item(_tag(keyword))
    if isinstance(element, RawDataElement) and element.is_little_endian:
        return element.value or b""
    return element


def _texts(ds: Dataset, keyword: str) -> list[str] | None:
    """A text attribute's values (DS, IS, CS, UI: always ASCII)."""
    raw = _raw(ds, keyword)
    if isinstance(raw, bytes):
        text = raw.decode("ascii", "replace").strip(" \0")
        return [part.strip(" \0") for part in text.split("\\")] if text else []
    if raw is None:
        return None
    value = ds[keyword].value
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, MultiValue | list | tuple) else [str(value)]


def _text(ds: Dataset, keyword: str) -> str:
    values = _texts(ds, keyword)
    return values[0] if values else ""


@overload
def _floats_of(ds: Dataset, keyword: str, count: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats_of(ds: Dataset, keyword: str, count: Literal[3]) -> Triple | None: ...
@overload
def _floats_of(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None: ...
def _floats_of(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    return _floats(_texts(ds, keyword), count)


def _number_of(ds: Dataset, keyword: str, default: float | None) -> float | None:
    values = _texts(ds, keyword)
    return _number(values[0] if values else None, default)


def _unsigned(ds: Dataset, keyword: str, default: int) -> int:
    """A US attribute (Rows, Bits Allocated, ...)."""
    raw = _raw(ds, keyword)
    if isinstance(raw, bytes):
        return int.from_bytes(raw[:2], "little") if len(raw) >= 2 else default
    if raw is None:
        return default
    value = ds[keyword].value
    return default if value is None or value == "" else int(value)


def _is_localizer(image_type: str | Iterable[object] | None) -> bool:
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).upper() == "LOCALIZER" for v in values[2:])


def _group(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """A functional group macro for one frame: per-frame first, then shared."""
    for holder, at in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(holder)
        if groups and len(groups) > at:
            item = groups[at].get(name)
            if item:
                return item[0]
    return None


class _Common(TypedDict):
    """The attributes every frame of a dataset shares."""

    source: int
    rows: int
    columns: int
    series_uid: str
    frame_of_reference: str
    modality: str


def _common(ds: Dataset, source: int) -> _Common:
    return {
        "source": source,
        "rows": _unsigned(ds, "Rows", 0),
        "columns": _unsigned(ds, "Columns", 0),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "frame_of_reference": _text(ds, "FrameOfReferenceUID"),
        "modality": _text(ds, "Modality"),
    }


def _single_frame(ds: Dataset, path: str, source: int) -> FrameInfo:
    return FrameInfo(
        ref=FrameRef(_text(ds, "SOPInstanceUID"), _text(ds, "SOPClassUID"), None, path),
        index=0,
        position=_floats_of(ds, "ImagePositionPatient", 3),
        orientation=_floats_of(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_floats_of(ds, "PixelSpacing", 2),
        thickness=_number_of(ds, "SpacingBetweenSlices", None)
        or _number_of(ds, "SliceThickness", None),
        slope=_number_of(ds, "RescaleSlope", 1.0) or 1.0,
        intercept=_number_of(ds, "RescaleIntercept", 0.0) or 0.0,
        localizer=_is_localizer(_texts(ds, "ImageType")),
        **_common(ds, source),
    )


def _enhanced_frames(ds: Dataset, path: str, source: int, count: int) -> list[FrameInfo]:
    common = _common(ds, source)
    image_localizer = _is_localizer(_texts(ds, "ImageType"))
    frames = []
    for f in range(count):
        position = _group(ds, f, "PlanePositionSequence")
        orientation = _group(ds, f, "PlaneOrientationSequence")
        measures = _group(ds, f, "PixelMeasuresSequence")
        transform = _group(ds, f, "PixelValueTransformationSequence")
        frame_type = None
        for name in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence", "FrameTypeSequence"):
            item = _group(ds, f, name)
            if item is not None:
                frame_type = item.get("FrameType")
                break
        thickness = None
        if measures is not None:
            thickness = _number(measures.get("SpacingBetweenSlices"), None) or _number(
                measures.get("SliceThickness"), None
            )
        frames.append(
            FrameInfo(
                ref=FrameRef(str(ds.SOPInstanceUID), str(ds.get("SOPClassUID", "")), f + 1, path),
                index=f,
                position=None
                if position is None
                else _floats(position.get("ImagePositionPatient"), 3),
                orientation=None
                if orientation is None
                else _floats(orientation.get("ImageOrientationPatient"), 6),
                pixel_spacing=None
                if measures is None
                else _floats(measures.get("PixelSpacing"), 2),
                thickness=thickness,
                slope=1.0
                if transform is None
                else _number(transform.get("RescaleSlope"), 1.0) or 1.0,
                intercept=0.0
                if transform is None
                else _number(transform.get("RescaleIntercept"), 0.0) or 0.0,
                localizer=_is_localizer(frame_type) if frame_type is not None else image_localizer,
                **common,
            )
        )
    return frames


def frames_of(ds: Dataset, path: str, source: int) -> list[FrameInfo]:
    """The frame records of one dataset."""
    count = int(_number_of(ds, "NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, path, source, count)
    if count > 1:
        raise NoImagePosition(
            f"{Path(path).name} holds {count} frames without per-frame functional groups, "
            "so the frames have no positions of their own"
        )
    return [_single_frame(ds, path, source)]


#: values longer than this stay on disk until used: a large private element (an attacker's
#: padding, a vendor blob) costs no memory unless something reads it
DEFER_SIZE = 1 << 20


def read_dataset(path: Path | str, *, pixels: bool = True) -> Dataset:
    """One file as DICOM; SeriesNotVolume naming the file when it is not DICOM, is damaged, or
    has no SOP Instance UID (no result could refer to it). Long values are read when used."""
    name = Path(path).name
    try:
        ds = dcmread(path, stop_before_pixels=not pixels, defer_size=DEFER_SIZE)
    except InvalidDicomError as exc:
        raise SeriesNotVolume(f"{name} is not a DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds for damaged files
        raise SeriesNotVolume(f"{name} cannot be read as DICOM: {exc}") from exc
    if not _text(ds, "SOPInstanceUID"):
        raise SeriesNotVolume(f"{name} has no SOP Instance UID, so no result could refer to it")
    return ds


def read_frames(
    paths: Sequence[Path | str], *, pixels: bool = True
) -> tuple[list[Dataset], list[FrameInfo]]:
    """Read every file; the same SOP instance twice counts once. ``pixels=False`` reads the
    headers only, for checks of the stack's shape (completion), not for decoding."""
    if not paths:
        raise SeriesNotVolume("no files were given: an empty series cannot form a volume")
    datasets: list[Dataset] = []
    frames: list[FrameInfo] = []
    seen: set[str] = set()
    for path in paths:
        name = Path(path).name
        ds = read_dataset(path, pixels=pixels)
        uid = _text(ds, "SOPInstanceUID")
        if uid in seen:
            log.debug("skipping a second copy of one instance", extra={"action": "imaging"})
            continue
        seen.add(uid)
        has_pixels = any(
            tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
        )
        if pixels and not has_pixels:
            raise UnsupportedPixels(f"{name} has no pixel data (SOP Class {ds.get('SOPClassUID')})")
        samples = _unsigned(ds, "SamplesPerPixel", 1)
        if samples != 1:
            raise UnsupportedPixels(
                f"{name} has {samples} samples per pixel ({ds.get('PhotometricInterpretation')}); "
                "a volume needs 1 (grayscale)"
            )
        frames.extend(frames_of(ds, str(path), len(datasets)))
        datasets.append(ds)
    return datasets, frames


_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native_pixels(ds: Dataset, rows: int, columns: int) -> np.ndarray | None:
    """Uncompressed little-endian pixels read straight from the element, skipping the decoder
    pipeline (half the load time of a CT series); None where that pipeline is needed: other
    transfer syntaxes, several samples, odd bit depths, or signed values narrower than their
    words (which need sign extension)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    data = _raw(ds, "PixelData")
    if syntax not in _NATIVE_SYNTAXES or not isinstance(data, bytes):
        return None
    allocated = _unsigned(ds, "BitsAllocated", 0)
    stored = _unsigned(ds, "BitsStored", allocated)
    signed = _unsigned(ds, "PixelRepresentation", 0) == 1
    if allocated not in (8, 16, 32) or _unsigned(ds, "SamplesPerPixel", 1) != 1:
        return None
    if signed and stored != allocated:
        return None
    count = int(_number_of(ds, "NumberOfFrames", 1) or 1) * rows * columns
    if len(data) < count * allocated // 8:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    return np.frombuffer(data, dtype, count)


def decode(datasets: Sequence[Dataset], frames: Sequence[FrameInfo]) -> np.ndarray:
    """Pixels of the frames, in the given order, rescaled to float32 (slices, rows, columns)."""
    rows, columns = frames[0].rows, frames[0].columns
    out = np.empty((len(frames), rows, columns), dtype=np.float32)
    by_source: dict[int, list[tuple[int, FrameInfo]]] = {}
    for k, frame in enumerate(frames):
        by_source.setdefault(frame.source, []).append((k, frame))
    for source, members in by_source.items():
        ds = datasets[source]
        pixels = _native_pixels(ds, rows, columns)
        if pixels is None:
            try:
                pixels = ds.pixel_array
            except Exception as exc:  # no decoder, corrupt stream, ...
                syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
                name = members[0][1].name
                raise UnsupportedPixels(
                    f"{name}: pixel data in transfer syntax {getattr(syntax, 'name', syntax)} "
                    f"cannot be decoded: {exc}"
                ) from exc
        pixels = pixels.reshape(-1, rows, columns)
        for k, frame in members:
            # one pass per operation, straight into the output slice (no temporaries)
            slope, intercept = np.float32(frame.slope), np.float32(frame.intercept)
            if frame.slope != 1.0:
                np.multiply(pixels[frame.index], slope, out=out[k], casting="unsafe")
                source_values = out[k]
            else:
                source_values = pixels[frame.index]
            np.add(source_values, intercept, out=out[k], casting="unsafe")
    return out
