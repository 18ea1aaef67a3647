"""Deflate bombs: valid small images that inflate to gigabytes, for the tests and benchmarks.

A 16x16 CT slice in Deflated Explicit VR Little Endian, padded after its Pixel Data with private
OB elements of zeros. The stream is built without ever holding, or compressing, the zeros: one
megabyte of zeros compressed after a full flush is the same block every time, so the block is
repeated (about 1,000 times smaller than what it inflates to).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid

from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.testing.rawstore import encode_dataset

BLOCK = 1 << 20
#: the largest padding element: OB lengths are 32 bits, and even
MAX_ELEMENT = (1 << 31) - 2
PADDING_GROUP = 0x7FE1  # private, after Pixel Data (7FE0,0010)
CREATOR = b"DICOMNODE BOMB  "  # LO, even length


@dataclass(frozen=True)
class Bomb:
    """One deflate bomb: the C-STORE payload (the deflated dataset) and its identifiers."""

    payload: bytes
    sop_class_uid: str
    sop_instance_uid: str
    inflated: int  # bytes of dataset once inflated

    def file(self) -> bytes:
        """The same, as a DICOM file (preamble and File Meta before the payload)."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(self.sop_class_uid)
        meta.MediaStorageSOPInstanceUID = UID(self.sop_instance_uid)
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        out = DicomBytesIO()
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        return bytes(out.getvalue()) + self.payload


def bomb(zeros: int, *, seed: int = 1) -> Bomb:
    """A deflated CT slice padded with ``zeros`` bytes of zeros (rounded up to whole MB)."""
    ds = next(ct_slices(SeriesSpec(slices=1, rows=16, columns=16, seed=seed)))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["deflate-bomb", str(seed), str(zeros)])
    body = encode_dataset(ds)
    blocks = -(-zeros // BLOCK)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(body + _element(0x0010, "LO", CREATOR))]
    parts.append(compressor.flush(zlib.Z_FULL_FLUSH))
    zero_block = compressor.compress(b"\0" * BLOCK) + compressor.flush(zlib.Z_FULL_FLUSH)
    remaining, element = blocks * BLOCK, 0x1000
    written = 0
    first = True
    while remaining:
        length = min(remaining, MAX_ELEMENT - MAX_ELEMENT % BLOCK)
        header = _header(element, "OB", length)
        parts.append(compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH))
        count = length // BLOCK
        if first:  # the block was made above, after a full flush: exactly as here
            count -= 1
            parts.append(zero_block)
            first = False
        parts.append(zero_block * count)
        remaining -= length
        written += len(header) + length
        element += 1
    parts.append(compressor.flush())
    return Bomb(
        b"".join(parts),
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        len(body) + len(_element(0x0010, "LO", CREATOR)) + written,
    )


def deflate_bomb(zeros: int, *, seed: int = 1) -> bytes:
    """:func:`bomb` as a file."""
    return bomb(zeros, seed=seed).file()


def _header(element: int, vr: str, length: int) -> bytes:
    if vr == "OB":
        return struct.pack("<HH2s2xI", PADDING_GROUP, element, vr.encode(), length)
    return struct.pack("<HH2sH", PADDING_GROUP, element, vr.encode(), length)


def _element(element: int, vr: str, value: bytes) -> bytes:
    return _header(element, vr, len(value)) + value
