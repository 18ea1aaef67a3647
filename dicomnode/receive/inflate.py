"""Deflated datasets are inflated once, on receipt, with a hard cap, before anything reads them.

Deflated Explicit VR Little Endian (PS3.5 A.5) is a transport encoding: the dataset under it is
plain Explicit VR Little Endian. A few hundred kilobytes of it can inflate to gigabytes (a
"deflate bomb"), and pydicom inflates a deflated file whole, in memory, every time it reads
one. So the receiver inflates each deflated file as it arrives, a megabyte at a time, into a
file beside it in the receiver's own ``incoming/`` folder (the spool's disk, under the disk
floor), refuses it once it passes ``[node] max_inflated_mb``, and stores the inflated dataset
as Explicit VR Little Endian: every later read (intake, workers, results) is then an ordinary,
bounded read of a file whose size the limit fixed.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.errors import DatasetTooLarge, MalformedDataset

CHUNK = 1 << 20
#: VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: how often (in inflated bytes) the disk floor is checked again while a dataset inflates
CHECK_EVERY = 64 << 20


def inflate_in_place(path: Path, *, limit: int, check_disk: Callable[[], None]) -> int:
    """Replace a deflated file by the same dataset in Explicit VR Little Endian; return its
    inflated dataset size in bytes.

    Raises :class:`DatasetTooLarge` once the dataset inflates past ``limit`` bytes, and
    :class:`MalformedDataset` where the deflated stream is broken or cut short; ``check_disk``
    (which raises to refuse) runs before and every 64 MB. Memory stays at about one chunk.
    """
    meta = read_file_meta_info(path)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    target = path.with_name(path.name + ".inflated")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = next_check = 0
    try:
        with path.open("rb") as source, target.open("wb") as out:
            source.seek(meta_end(source))
            out.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
            pending = b""
            while True:
                if not pending:
                    pending = source.read(CHUNK)
                    if not pending:
                        break
                if written >= next_check:
                    check_disk()
                    next_check = written + CHECK_EVERY
                data = inflater.decompress(pending, CHUNK)
                pending = inflater.unconsumed_tail
                written += len(data)
                if written > limit:
                    raise DatasetTooLarge(
                        f"the deflated dataset inflates past the limit of {limit // 2**20} MB "
                        "([node] max_inflated_mb); it was not stored"
                    )
                out.write(data)
                if inflater.eof:
                    break
            if not inflater.eof:
                raise MalformedDataset("deflated dataset is truncated")
        target.replace(path)
    except zlib.error as exc:
        raise MalformedDataset(f"deflated dataset could not be inflated: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    return written


def meta_end(fp: BinaryIO) -> int:
    """Offset of the first dataset byte after the preamble, 'DICM' and the File Meta group."""
    fp.seek(132)
    while True:
        pos = fp.tell()
        head = fp.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            return pos
        if head[4:6] in LONG_VRS:
            length = struct.unpack("<I", fp.read(4))[0]
        else:
            length = struct.unpack("<H", head[6:8])[0]
        fp.seek(length, 1)
