"""Check a received dataset before it is stored, and read the attributes the index keeps.

pydicom reads truncated files without complaint, so the structure is checked by a streaming walk
over every element (O(1) memory, the pixel data is skipped, never read), then the header is read
with pydicom, stopping before the pixel data.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from dicomnode.domain import InstanceHeader
from dicomnode.errors import (
    EmptyPixelData,
    InvalidIdentifier,
    MalformedDataset,
    MissingIdentifier,
    PixelDataSizeMismatch,
    SOPClassMismatch,
    SOPInstanceMismatch,
)

UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # digits and dots, safe as a file name
_MAX_DEPTH = 32


@dataclass(frozen=True)
class PixelDataInfo:
    """What the walk learnt about the top-level Pixel Data element."""

    present: bool = False
    encapsulated: bool = False
    checked: bool = True  # False where the walk could not see the elements (deflated)
    length: int = 0  # bytes of native data, or of all fragments after the offset table


class _Walker:
    """Walks the elements of an uncompressed-encoding dataset, checking lengths against the end."""

    def __init__(self, fp: BinaryIO, end: int, implicit: bool, little: bool) -> None:
        self.fp, self.end, self.implicit = fp, end, implicit
        self.endian = "<" if little else ">"
        self.pixel = PixelDataInfo()

    def _read(self, size: int, what: str) -> bytes:
        data = self.fp.read(size)
        if len(data) != size:
            raise MalformedDataset(f"dataset is truncated: {what} ends past the end of the data")
        return data

    def _skip(self, length: int, tag: int) -> None:
        if self.fp.tell() + length > self.end:
            raise MalformedDataset(
                f"dataset is truncated: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares "
                f"{length} bytes, only {self.end - self.fp.tell()} remain"
            )
        self.fp.seek(length, 1)

    def _tag(self, raw: bytes) -> int:
        group, element = struct.unpack(self.endian + "HH", raw)
        return group << 16 | element

    def dataset(self, depth: int, stop_at: int | None = None) -> None:
        """Walk elements until the end of the data, or until the delimiter ``stop_at``."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset(f"sequences are nested more than {_MAX_DEPTH} deep")
        while self.fp.tell() < self.end:
            tag = self._tag(self._read(4, "an element tag"))
            if tag in (ITEM_END, SEQUENCE_END):
                self._read(4, "a delimiter length")
                if tag == stop_at:
                    return
                raise MalformedDataset(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            vr, length = self._header(tag)
            if tag in FLOAT_PIXEL_DATA and depth == 0:
                self.pixel = PixelDataInfo(present=True, length=length)
            if length != UNDEFINED:
                if tag == PIXEL_DATA and depth == 0:
                    self.pixel = PixelDataInfo(present=True, length=length)
                self._skip(length, tag)
            elif tag == PIXEL_DATA and depth == 0:
                self.pixel = PixelDataInfo(
                    present=True, encapsulated=True, length=self._fragments()
                )
            elif vr in (b"SQ", b"UN", None):
                self._items(depth + 1)
            else:
                raise MalformedDataset(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has VR "
                    f"{vr!r} with undefined length"
                )
        if stop_at is not None:
            raise MalformedDataset("dataset is truncated: a sequence item has no end")

    def _header(self, tag: int) -> tuple[bytes | None, int]:
        if self.implicit:
            return None, struct.unpack(self.endian + "I", self._read(4, "an element length"))[0]
        vr = self._read(2, "an element VR")
        if vr in _LONG_VRS:
            return vr, struct.unpack(self.endian + "2xI", self._read(6, "an element length"))[0]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise MalformedDataset(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has invalid VR {vr!r}"
            )
        return vr, struct.unpack(self.endian + "H", self._read(2, "an element length"))[0]

    def _items(self, depth: int) -> None:
        while True:
            tag = self._tag(self._read(4, "a sequence item"))
            length = struct.unpack(self.endian + "I", self._read(4, "an item length"))[0]
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise MalformedDataset(
                    f"expected a sequence item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})"
                )
            if length == UNDEFINED:
                self.dataset(depth, stop_at=ITEM_END)
            else:
                self._skip(length, tag)

    def _fragments(self) -> int:
        total, first = 0, True
        while True:
            tag = self._tag(self._read(4, "a pixel data fragment"))
            length = struct.unpack(self.endian + "I", self._read(4, "a fragment length"))[0]
            if tag == SEQUENCE_END:
                return total
            if tag != ITEM or length == UNDEFINED:
                raise MalformedDataset("encapsulated Pixel Data has an invalid fragment")
            self._skip(length, tag)
            if not first:
                total += length
            first = False


def check_structure(path: Path) -> PixelDataInfo:
    """Walk the dataset in a DICOM file; raise MalformedDataset where it is cut short or broken."""
    try:
        meta = read_file_meta_info(path)  # the meta alone: never inflates a deflated dataset
        with path.open("rb") as fp:
            start = _meta_end(fp)
            ts = UID(str(meta.get("TransferSyntaxUID", "")))
            if not ts or not ts.is_transfer_syntax:
                raise MalformedDataset(f"unknown transfer syntax {str(ts)!r}")
            fp.seek(0, 2)
            end = fp.tell()
            fp.seek(start)
            if ts.is_deflated:
                return _check_deflated(fp)
            walker = _Walker(fp, end, ts.is_implicit_VR, ts.is_little_endian)
            walker.dataset(depth=0)
            return walker.pixel
    except (InvalidDicomError, struct.error, zlib.error, ValueError, EOFError, OSError) as exc:
        raise MalformedDataset(f"dataset could not be parsed: {exc}") from exc


def _meta_end(fp: BinaryIO) -> int:
    """Offset of the first dataset byte after the preamble and File Meta group."""
    fp.seek(132)
    while True:
        pos = fp.tell()
        head = fp.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            return pos
        vr = head[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<I", fp.read(4))[0]
        else:
            length = struct.unpack("<H", head[6:8])[0]
        fp.seek(length, 1)


def _check_deflated(fp: BinaryIO) -> PixelDataInfo:
    """Inflate in chunks to prove the stream is whole, without keeping what it inflates."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    while chunk := fp.read(1 << 20):
        inflater.decompress(chunk, 1 << 20)
        while inflater.unconsumed_tail:
            inflater.decompress(inflater.unconsumed_tail, 1 << 20)
    if not inflater.eof:
        raise MalformedDataset("deflated dataset is truncated")
    return PixelDataInfo(checked=False)


def read_header(
    path: Path, *, expected_sop_class: str, expected_sop_instance: str
) -> InstanceHeader:
    """Validate a received file and return the attributes the index keeps.

    Raises a :class:`~dicomnode.errors.DatasetRejected` subclass naming what is wrong.
    """
    pixel = check_structure(path)
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on broken input
        raise MalformedDataset(f"dataset could not be parsed: {exc}") from exc
    uids = {
        key: _uid(ds, key)
        for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    }
    missing = [key for key, value in uids.items() if not value]
    if missing:
        raise MissingIdentifier(f"dataset has no {', '.join(missing)}")
    for key, value in uids.items():
        if len(value) > 64 or not _UID.match(value):
            raise InvalidIdentifier(
                f"{key} {value[:80]!r} is not a valid UID (digits and dots, at most 64 characters)"
            )
    if uids["SOPClassUID"] != expected_sop_class:
        raise SOPClassMismatch(
            f"dataset SOP Class UID {uids['SOPClassUID']} differs from the "
            f"negotiated {expected_sop_class}"
        )
    if uids["SOPInstanceUID"] != expected_sop_instance:
        raise SOPInstanceMismatch(
            f"dataset SOP Instance UID {uids['SOPInstanceUID']} differs from "
            f"the request's {expected_sop_instance}"
        )
    _check_pixels(ds, pixel)
    frames = _int(ds, "NumberOfFrames")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        accession_number=_text(ds, "AccessionNumber"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        instance_number=_int(ds, "InstanceNumber"),
        number_of_frames=frames,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
    )


def _check_pixels(ds: Dataset, pixel: PixelDataInfo) -> None:
    if not pixel.checked:
        return
    if not pixel.present:
        # An image IOD always has pixels (JPIP references them by URL instead): a dataset
        # without them was cut short at an element boundary, or built wrong.
        is_image = "Image Storage" in UID(_uid(ds, "SOPClassUID")).name or "Rows" in ds
        if is_image and "PixelDataProviderURL" not in ds:
            raise EmptyPixelData("image dataset has no Pixel Data")
        return
    if pixel.length == 0:
        raise EmptyPixelData()
    if pixel.encapsulated:
        return
    needed = _native_pixel_bytes(ds)
    if needed is not None and pixel.length < needed:
        raise PixelDataSizeMismatch(
            f"Pixel Data has {pixel.length} bytes; Rows, Columns, frames, "
            f"samples and Bits Allocated need {needed}"
        )


def _native_pixel_bytes(ds: Dataset) -> int | None:
    values = [_int(ds, key) for key in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")]
    if any(value is None or value <= 0 for value in values):
        return None
    rows, columns, samples, bits = values  # type: ignore[misc]
    pixels = rows * columns * (_int(ds, "NumberOfFrames") or 1)
    if samples == 3 and _text(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        return pixels * 2 * bits // 8  # chroma is subsampled: two samples a pixel on average
    return (pixels * samples * bits + 7) // 8


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID from its raw bytes: judged by our own rule, whatever pydicom's validation mode."""
    element = ds.get_item(keyword)
    if element is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return "" if value is None else str(value).strip("\x00 ")


def _text(ds: Dataset, keyword: str) -> str:
    """An attribute as stripped text; "" when absent or unreadable (stored as received anyway)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip().strip("\x00")


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except Exception:
        return None
