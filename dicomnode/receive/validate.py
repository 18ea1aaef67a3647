"""Check a received dataset before it is stored, and read the attributes the index keeps.

pydicom reads truncated files without complaint, so one streaming walk over every element
checks the structure (O(1) memory; the pixel data is skipped, never read) and picks up the few
attribute values the index needs on the way, so the file is read once and not parsed twice.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID

from dicomnode.domain import InstanceHeader
from dicomnode.errors import (
    DatasetTooLarge,
    EmptyPixelData,
    InvalidIdentifier,
    MalformedDataset,
    MissingIdentifier,
    PixelDataSizeMismatch,
    PixelDescriptionInvalid,
    SOPClassMismatch,
    SOPInstanceMismatch,
    StudyMismatch,
)
from dicomnode.receive.inflate import LONG_VRS, meta_end

UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: PS3.5 9.1: digits and dots, no component with a leading zero (a full match: safe as a name)
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
#: ``[node] lenient_uids``: leading zeros allowed, for senders that write them
_LENIENT_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_MAX_DEPTH = 32
_MAX_VALUE = 1 << 12  # a wanted value longer than this is not read (no sane header value is)


@dataclass(frozen=True)
class Limits:
    """What a received dataset may ask of the node (``[node]`` settings)."""

    #: accept UID components with leading zeros (``1.02.3``), which PS3.5 forbids
    lenient_uids: bool = False
    #: the most bytes an instance's pixel data may decode to (compressed data declares it)
    max_pixel_bytes: int = 2048 << 20


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class PixelDataInfo:
    """What the walk learnt about the top-level Pixel Data element."""

    present: bool = False
    encapsulated: bool = False
    length: int = 0  # bytes of native data, or of all fragments after the offset table


class _Walker:
    """Walks the elements of an uncompressed-encoding dataset, checking lengths against the end."""

    def __init__(self, fp: IO[bytes], end: int, implicit: bool, little: bool) -> None:
        self.fp, self.end, self.implicit = fp, end, implicit
        self.endian = "<" if little else ">"
        self.pixel = PixelDataInfo()
        self.values: dict[int, tuple[str, bytes]] = {}  # wanted top-level tag -> (VR, raw value)

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
                if depth == 0 and tag in WANTED and length <= _MAX_VALUE:
                    value = self._read(length, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
                    self.values[tag] = ((vr or b"").decode("ascii") or WANTED[tag][1], value)
                else:
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
        if vr in LONG_VRS:
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


@dataclass(frozen=True)
class Scan:
    """What one walk over a received file found."""

    transfer_syntax: str
    pixel: PixelDataInfo
    values: dict[str, str | int]  # the WANTED attributes present, decoded


def scan(path: Path) -> Scan:
    """Walk the dataset in a DICOM file once: check its structure, find its pixel data, and
    read the attributes the index needs. Raise MalformedDataset where it is cut short or broken.
    """
    try:
        meta = read_file_meta_info(path)  # the meta alone: never inflates a deflated dataset
        ts = UID(str(meta.get("TransferSyntaxUID", "")))
        if not ts or not ts.is_transfer_syntax:
            raise MalformedDataset(f"unknown transfer syntax {str(ts)!r}")
        if ts.is_deflated:  # receive.inflate turns these into explicit VR little endian first
            raise MalformedDataset("a deflated dataset must be inflated before it is scanned")
        with path.open("rb") as fp:
            fp.seek(meta_end(fp))
            walker = _walk(fp, implicit=ts.is_implicit_VR, little=ts.is_little_endian)
    except (InvalidDicomError, struct.error, ValueError, EOFError, OSError) as exc:
        raise MalformedDataset(f"dataset could not be parsed: {exc}") from exc
    return Scan(str(ts), walker.pixel, _decode(walker.values, walker.endian))


def _walk(fp: IO[bytes], *, implicit: bool, little: bool) -> _Walker:
    start = fp.tell()
    end = fp.seek(0, 2)
    fp.seek(start)
    walker = _Walker(fp, end, implicit, little)
    walker.dataset(depth=0)
    return walker


def read_header(
    path: Path,
    *,
    expected_sop_class: str,
    expected_sop_instance: str,
    expected_study: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> InstanceHeader:
    """Validate a received file and return the attributes the index keeps; with
    ``expected_study`` (a STOW-RS request to one study) it must be of that study.

    Raises a :class:`~dicomnode.errors.DatasetRejected` subclass naming what is wrong.
    """
    found = scan(path)
    values = found.values
    uids = {key: str(values.get(key, "")) for key in _IDENTIFIERS}
    missing = [key for key, value in uids.items() if not value]
    if missing:
        raise MissingIdentifier(f"dataset has no {', '.join(missing)}")
    for key, value in uids.items():
        if len(value) > 64 or not is_valid_uid(value, lenient=limits.lenient_uids):
            raise InvalidIdentifier(
                f"{key} {value[:80]!r} is not a valid UID (digits and dots, no leading zeros, "
                "at most 64 characters)"
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
    if expected_study is not None and uids["StudyInstanceUID"] != expected_study:
        raise StudyMismatch(
            f"dataset Study Instance UID {uids['StudyInstanceUID']} differs from the "
            f"request's study {expected_study}"
        )
    _check_pixels(values, found.pixel, limits.max_pixel_bytes)

    def text(keyword: str) -> str:
        value = values.get(keyword, "")
        return value if isinstance(value, str) else str(value)

    def number(keyword: str) -> int | None:
        value = values.get(keyword)
        return value if isinstance(value, int) else None

    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=found.transfer_syntax,
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"),
        patient_sex=text("PatientSex"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        study_id=text("StudyID"),
        study_description=text("StudyDescription"),
        accession_number=text("AccessionNumber"),
        referring_physician_name=text("ReferringPhysicianName"),
        modality=text("Modality"),
        series_number=number("SeriesNumber"),
        series_description=text("SeriesDescription"),
        body_part_examined=text("BodyPartExamined"),
        frame_of_reference_uid=text("FrameOfReferenceUID"),
        instance_number=number("InstanceNumber"),
        number_of_frames=number("NumberOfFrames"),
        rows=number("Rows"),
        columns=number("Columns"),
    )


def is_valid_uid(value: str, *, lenient: bool = False) -> bool:
    """A UID as PS3.5 9.1 writes it (``lenient``: leading zeros too), whole, at most 64 long."""
    pattern = _LENIENT_UID if lenient else _UID
    return len(value) <= 64 and pattern.fullmatch(value) is not None


def _check_pixels(values: dict[str, str | int], pixel: PixelDataInfo, max_bytes: int) -> None:
    if not pixel.present:
        # An image IOD always has pixels (JPIP references them by URL instead): a dataset
        # without them was cut short at an element boundary, or built wrong.
        is_image = "Image Storage" in UID(str(values.get("SOPClassUID", ""))).name
        if (is_image or "Rows" in values) and "PixelDataProviderURL" not in values:
            raise EmptyPixelData("image dataset has no Pixel Data")
        return
    if pixel.length == 0:
        raise EmptyPixelData()
    _check_pixel_description(values)
    needed = _native_pixel_bytes(values)
    if needed is not None and needed > max_bytes:
        # Compressed data can declare any size in a few bytes; a decoder would allocate it.
        raise DatasetTooLarge(
            f"the image attributes declare {needed // 2**20} MB of pixel data, more than the "
            f"limit of {max_bytes // 2**20} MB ([node] max_pixel_data_mb)"
        )
    if pixel.encapsulated:
        return
    if needed is not None and pixel.length < needed:
        raise PixelDataSizeMismatch(
            f"Pixel Data has {pixel.length} bytes; Rows, Columns, frames, "
            f"samples and Bits Allocated need {needed}"
        )


def _check_pixel_description(values: dict[str, str | int]) -> None:
    """Dimensions and sample layout a decoder could work with (those given; PS3.3 C.7.6.3)."""
    problems = []
    for keyword in ("Rows", "Columns", "NumberOfFrames"):
        value = values.get(keyword)
        if isinstance(value, int) and value <= 0:
            problems.append(f"{keyword} {value} (must be at least 1)")
    samples = values.get("SamplesPerPixel")
    if isinstance(samples, int) and samples not in (1, 3, 4):
        problems.append(f"Samples per Pixel {samples} (must be 1, 3 or 4)")
    bits = values.get("BitsAllocated")
    if isinstance(bits, int) and not (bits == 1 or (bits % 8 == 0 and 8 <= bits <= 64)):
        problems.append(f"Bits Allocated {bits} (must be 1 or a multiple of 8 up to 64)")
    if problems:
        raise PixelDescriptionInvalid(
            "image attributes describe no valid image: " + "; ".join(problems)
        )


def _native_pixel_bytes(values: dict[str, str | int]) -> int | None:
    numbers = [values.get(key) for key in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")]
    positive = [n for n in numbers if isinstance(n, int) and n > 0]
    if len(positive) < len(numbers):
        return None
    rows, columns, samples, bits = positive
    frames = values.get("NumberOfFrames")
    pixels = rows * columns * (frames if isinstance(frames, int) and frames > 0 else 1)
    if samples == 3 and values.get("PhotometricInterpretation") == "YBR_FULL_422":
        return pixels * 2 * bits // 8  # chroma is subsampled: two samples a pixel on average
    return (pixels * samples * bits + 7) // 8


def _decode(raw: dict[int, tuple[str, bytes]], endian: str) -> dict[str, str | int]:
    """Decode the collected raw values; an unreadable one is left out (stored as received)."""
    charset = raw.get(SPECIFIC_CHARACTER_SET)
    encodings = ["iso8859"]
    if charset is not None:
        terms = [t.strip() for t in charset[1].decode("ascii", "replace").split("\\")]
        try:
            encodings = convert_encodings(terms)
        except Exception:  # an unknown character set: fall back to the default repertoire
            encodings = ["iso8859"]
    values: dict[str, str | int] = {}
    for tag, (vr, value) in raw.items():
        keyword = WANTED[tag][0]
        try:
            if vr == "US":
                if len(value) >= 2:
                    values[keyword] = struct.unpack(endian + "H", value[:2])[0]
            elif vr == "IS":
                number = value.decode("ascii").split("\\")[0].strip(" \0")
                if number:
                    values[keyword] = int(number)
            elif vr in _CHARSET_VRS:
                values[keyword] = decode_bytes(value, encodings, _DELIMITERS).strip(" \0")
            else:
                values[keyword] = value.decode("ascii", "replace").strip(" \0")
        except (ValueError, LookupError, UnicodeError):
            continue
    return values


_IDENTIFIERS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_CHARSET_VRS = {"PN", "LO", "SH", "ST", "LT", "UC", "UT"}
_DELIMITERS = {0x5C, 0x5E, 0x3D}  # backslash, caret, equals: kept in the person-name text
_KEYWORDS = (
    "SpecificCharacterSet", *_IDENTIFIERS, "PatientID", "IssuerOfPatientID", "PatientName",
    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "StudyDescription",
    "AccessionNumber", "ReferringPhysicianName", "Modality", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "FrameOfReferenceUID", "InstanceNumber",
    "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
    "PhotometricInterpretation", "PixelDataProviderURL",
)  # fmt: skip
#: top-level tags read during the walk -> (keyword, VR from the data dictionary)
WANTED: dict[int, tuple[str, str]] = {int(Tag(k)): (k, dictionary_VR(Tag(k))) for k in _KEYWORDS}
SPECIFIC_CHARACTER_SET = 0x00080005
