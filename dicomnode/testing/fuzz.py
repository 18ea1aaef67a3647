"""Malformed datasets and hostile association attempts, for the reliability suite.

A :class:`Mutation` is a recipe (its kind and parameters, drawn by hypothesis or a seeded
generator) that turns a valid CT dataset, in explicit VR little endian, deflated or RLE
compressed, into bytes a broken or hostile sender might put in a C-STORE: truncated, bytes
flipped, a wrong VR, an absurd length, huge declared pixel data, a bad UID, plain garbage, or
a broken command set (bad Affected SOP Instance UID bytes, missing elements, absurd lengths).
:func:`judge` says whether the node handled one cleanly: a failure status and nothing stored,
or Success with the bytes stored exactly as sent (a deflated dataset: as sent, inflated); a
broken command set may also end the association with an A-ABORT, storing nothing.
"""

from __future__ import annotations

import contextlib
import random
import socket
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.errors import PeerClosed
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.receive import pdu
from dicomnode.testing.rawstore import (
    RawAssociation,
    associate_rq,
    command_elements,
    encode_command,
    encode_dataset,
)

KINDS = ("truncate", "flip", "vr", "length", "pixels", "uid", "garbage", "insert", "command")
#: the transfer syntaxes a mutation's dataset travels in: as encoded, deflated, RLE-compressed
SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "deflated": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
}
#: kinds that break the bytes as they travel (for a deflated dataset: the deflated stream)
BYTE_KINDS = frozenset({"truncate", "flip", "garbage", "insert"})
#: ways to break the C-STORE-RQ command set itself (the dataset is a good one)
COMMAND_BREAKS = (
    "uid-ff-fe",
    "uid-newline",
    "uid-too-long",
    "uid-empty",
    "class-garbage",
    "drop-element",
    "group-length",
    "element-length",
    "command-field",
    "noise",
)
#: VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_VR_NAMES = (
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    "UR US UT UV"
)
#: the VRs of PS3.5, and four that are not
VR_CODES = (*(v.encode() for v in _VR_NAMES.split()), b"ZZ", b"\0\0", b"\xff\xff", b"ob")
ABSURD_LENGTHS = (0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0xFFFF, 0xFFFE, 1, 3)
BAD_UIDS = (
    "",
    "1.2.3/../../etc/passwd",
    "1.02.3",
    "a.b.c",
    "1." * 40 + "1",
    "1..2",
    "1.2.3\0",
    " 1.2.3",
    "1.2.3.",
    "\x00\x01\x02",
    "1.2.840.10008.1.2.1" * 4,
)
UID_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
PIXEL_CHANGES: tuple[dict[str, int], ...] = (
    {"Rows": 65535, "Columns": 65535},
    {"Rows": 0},
    {"Columns": 0},
    {"BitsAllocated": 64},
    {"BitsAllocated": 1},
    {"BitsAllocated": 13},
    {"NumberOfFrames": 2_147_483_647},
    {"NumberOfFrames": 0},
    {"SamplesPerPixel": 3},
    {"SamplesPerPixel": 0},
    {"Rows": 4096, "Columns": 4096, "NumberOfFrames": 1000},
)


@dataclass(frozen=True)
class Element:
    """One top-level element of an explicit VR little endian byte stream."""

    offset: int
    tag: int
    vr: bytes
    header: int  # bytes of tag, VR and length
    length: int


def elements(data: bytes) -> list[Element]:
    """The top-level elements, up to the first undefined length or damaged header."""
    found = []
    pos = 0
    while pos + 8 <= len(data):
        group, number = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            if pos + 12 > len(data):
                break
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if length == 0xFFFFFFFF:
            break
        found.append(Element(pos, (group << 16) | number, vr, header, length))
        pos += header + length
    return found


@dataclass(frozen=True)
class Mutation:
    """How to break one dataset: ``kind`` and its parameters (all plain values, so hypothesis
    can shrink them and a failure names exactly what was sent)."""

    kind: str
    at: float = 0.0  # where, as a fraction of the stream or of the element list
    choice: int = 0  # which VR, length, UID, pixel change...
    noise: bytes = b""  # bytes to write or insert
    syntax: str = "explicit"  # a key of SYNTAXES

    @property
    def transfer_syntax(self) -> str:
        return SYNTAXES[self.syntax]

    def apply(self, ds: Dataset) -> bytes:
        """The mutated bytes of ``ds`` as they travel in :attr:`transfer_syntax` (``ds`` is
        changed by the dataset-level kinds, and compressed for ``rle``)."""
        if self.syntax == "rle":
            from pydicom.uid import RLELossless

            ds.compress(RLELossless)
        if self.syntax != "deflated":
            return self._mutate(ds, encoded=None)
        if self.kind in BYTE_KINDS:
            return self._mutate(ds, encoded=deflate(encode_dataset(ds)))
        return deflate(self._mutate(ds, encoded=None))

    def command(self, message_id: int, sop_instance: str) -> bytes | None:
        """The C-STORE-RQ command set to send: a broken one for the ``command`` kind."""
        if self.kind != "command":
            return None
        elements = command_elements(message_id, sop_instance)
        how = COMMAND_BREAKS[self.choice % len(COMMAND_BREAKS)]
        where = min(int(self.at * len(elements)), len(elements) - 1)
        replace = {
            "uid-ff-fe": (0x1000, b"1.2.\xff\xfe"),
            "uid-newline": (0x1000, sop_instance.encode()[:60] + b"\n\0"),
            "uid-too-long": (0x1000, b"1." * 40),
            "uid-empty": (0x1000, b""),
            "class-garbage": (0x0002, (self.noise or b"\x00\x01")[:64]),
            "command-field": (0x0100, struct.pack("<H", self.choice & 0xFFFF)),
        }
        if how in replace:
            number, value = replace[how]
            elements = [(n, value if n == number else v) for n, v in elements]
        elif how == "drop-element":
            del elements[where]
        elif how == "noise":
            elements.insert(where, (0x0000 + 0x10 * (1 + where), self.noise))
        encoded = bytearray(encode_command(elements))
        if how == "group-length":
            struct.pack_into("<I", encoded, 8, self.choice * 7919)
        elif how == "element-length":
            offset = 12 + sum(8 + len(v) for _, v in elements[:where])
            struct.pack_into("<I", encoded, offset + 4, ABSURD_LENGTHS[self.choice % 8])
        return bytes(encoded)

    def stored_form(self, payload: bytes) -> bytes:
        """The dataset bytes the node keeps when it stores ``payload``: a deflated dataset is
        kept inflated (receive.inflate)."""
        if self.syntax != "deflated":
            return payload
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(payload)
        except zlib.error:
            return b""  # not a deflate stream: nothing may be stored for it
        return data if inflater.eof else b""

    def _mutate(self, ds: Dataset, encoded: bytes | None) -> bytes:
        if self.kind == "command":
            return encoded if encoded is not None else encode_dataset(ds)
        if self.kind == "pixels":
            for keyword, value in PIXEL_CHANGES[self.choice % len(PIXEL_CHANGES)].items():
                setattr(ds, keyword, value)
            return encode_dataset(ds)
        if self.kind == "uid":
            keyword = UID_KEYWORDS[self.choice % len(UID_KEYWORDS)]
            bad = BAD_UIDS[(self.choice // len(UID_KEYWORDS)) % len(BAD_UIDS)]
            ds[keyword].value = bad
            return encode_dataset(ds)
        data = bytearray(encoded if encoded is not None else encode_dataset(ds))
        where = min(int(self.at * len(data)), len(data) - 1)
        if self.kind == "truncate":
            return bytes(data[:where])
        if self.kind == "garbage":
            return self.noise
        if self.kind == "insert":
            return bytes(data[:where] + self.noise + data[where:])
        if self.kind == "flip":
            for offset, value in enumerate(self.noise or b"\xff"):
                data[(where + offset * 7919) % len(data)] ^= value or 0xFF
            return bytes(data)
        items = elements(bytes(data))
        item = items[min(int(self.at * len(items)), len(items) - 1)]
        if self.kind == "vr":
            data[item.offset + 4 : item.offset + 6] = VR_CODES[self.choice % len(VR_CODES)]
            return bytes(data)
        if self.kind == "length":
            length = ABSURD_LENGTHS[self.choice % len(ABSURD_LENGTHS)]
            if item.header == 12:
                struct.pack_into("<I", data, item.offset + 8, length)
            else:
                struct.pack_into("<H", data, item.offset + 6, length & 0xFFFF)
            return bytes(data)
        raise ValueError(f"mutation kind {self.kind!r} is not one of {', '.join(KINDS)}")


@contextmanager
def lenient_pydicom() -> Iterator[None]:
    """Let a test build deliberately invalid values despite the session's RAISE mode."""
    settings = pydicom_config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def base_dataset(seed: int) -> Dataset:
    """A valid 64x64 CT slice with UIDs of its own (so every sent instance is distinct)."""
    uid = generate_uid(entropy_srcs=["fuzz", str(seed)])
    study = generate_uid(entropy_srcs=["fuzz", str(seed), "study"])
    spec = SeriesSpec(slices=1, rows=64, columns=64, seed=seed, study_uid=study)
    ds = next(ct_slices(spec))
    ds.SOPInstanceUID = uid
    return ds


def mutations() -> Any:
    """A hypothesis strategy of :class:`Mutation` (hypothesis is imported here, lazily)."""
    from hypothesis import strategies as st

    return st.builds(
        Mutation,
        kind=st.sampled_from(KINDS),
        at=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
        choice=st.integers(min_value=0, max_value=1000),
        noise=st.binary(min_size=0, max_size=512),
        syntax=st.sampled_from(tuple(SYNTAXES)),
    )


def random_mutations(count: int, seed: int = 0) -> Iterator[Mutation]:
    """``count`` mutations from a seeded generator (for the benchmark script)."""
    rng = random.Random(seed)
    for index in range(count):
        yield Mutation(
            KINDS[index % len(KINDS)],
            rng.random(),
            rng.randrange(1000),
            rng.randbytes(rng.randrange(513)),
            tuple(SYNTAXES)[(index // len(KINDS)) % len(SYNTAXES)],
        )


def deflate(data: bytes) -> bytes:
    """``data`` as a Deflated Explicit VR Little Endian dataset travels (raw deflate)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


#: statuses that mean "refused, with a reason": out of resources, SOP class/instance mismatch,
#: cannot understand (PS3.7 C.4.2.1.4 and Annex C), and the general failures of a bad command
#: set (0x0117 invalid SOP instance, 0x0122 SOP class not supported; PS3.7 C.4)
def is_failure(status: int) -> bool:
    general = 0x0100 <= status <= 0x02FF and status not in (0x0107, 0x0116)  # those two warn
    return (
        general
        or 0xA700 <= status <= 0xA7FF
        or 0xA900 <= status <= 0xA9FF
        or 0xC000 <= status <= 0xCFFF
    )


@dataclass
class Tally:
    """What happened to each malformed input, for the report."""

    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, kind: str, outcome: str) -> None:
        counts = self.by_kind.setdefault(kind, {})
        counts[outcome] = counts.get(outcome, 0) + 1

    @property
    def total(self) -> int:
        return sum(sum(counts.values()) for counts in self.by_kind.values())

    def count(self, outcome: str) -> int:
        return sum(counts.get(outcome, 0) for counts in self.by_kind.values())


def judge(
    status: int,
    payload: bytes,
    sop_instance: str,
    stored: Callable[[str], bytes | None],
    expected: bytes | None = None,
) -> str:
    """``refused`` or ``stored`` when the node handled the input cleanly; raises otherwise.

    ``stored(uid)`` returns the dataset bytes the node keeps for the instance (after its File
    Meta), or None when it keeps nothing; ``expected`` is what it should keep on Success
    (default: ``payload``).
    """
    kept = stored(sop_instance)
    if status in (0x0000, 0xB000, 0xB006, 0xB007):
        if kept != (payload if expected is None else expected):
            raise AssertionError(
                f"Success (0x{status:04X}) but the stored bytes differ from those sent "
                f"({'nothing stored' if kept is None else f'{len(kept)} bytes stored'}, "
                f"{len(payload)} sent)"
            )
        return "stored"
    if not is_failure(status):
        raise AssertionError(f"status 0x{status:04X} is neither Success nor a failure status")
    if kept is not None:
        raise AssertionError(f"refused with 0x{status:04X} but the instance was stored")
    return "refused"


FUZZ_SYNTAXES = tuple(SYNTAXES.values())


def fuzz_association(host: str, port: int, calling: str = "RAW") -> RawAssociation:
    """An association offering every syntax a mutation travels in."""
    first, *more = FUZZ_SYNTAXES
    return RawAssociation(host, port, calling=calling, transfer_syntax=first, more_syntaxes=more)


def send_mutation(
    association: RawAssociation,
    mutation: Mutation,
    seed: int,
    stored: Callable[[str], bytes | None],
) -> str:
    """Send one mutated instance; how the node handled it (``stored``, ``refused``, or, for a
    broken command set only, ``aborted``). Raises AssertionError when it was not handled
    cleanly, ConnectionError when the node hung up on a good command set.

    A broken command set goes on an association of its own (opened like ``association``):
    once a command's lengths lie, sender and node may no longer agree where a message ends,
    and the node may end that association later, not at once; the next case must not pay."""
    if mutation.kind == "command":
        own = fuzz_association(*association.peer, calling=association.calling)
        try:
            return _send(own, mutation, seed, stored)
        finally:
            own.release()
    return _send(association, mutation, seed, stored)


def _send(
    association: RawAssociation,
    mutation: Mutation,
    seed: int,
    stored: Callable[[str], bytes | None],
) -> str:
    with lenient_pydicom():
        ds = base_dataset(seed)
        uid = str(ds.SOPInstanceUID)
        payload = mutation.apply(ds)
    try:
        status = association.store(
            payload,
            uid,
            syntax=mutation.transfer_syntax,
            command=mutation.command(association.message_id + 1, uid),
        )
    except (ConnectionError, OSError, PeerClosed):
        if mutation.kind != "command":
            raise
        if stored(uid) is not None:
            raise AssertionError(f"{mutation}: aborted, but the instance was stored") from None
        return "aborted"
    return judge(status, payload, uid, stored, mutation.stored_form(payload))


def stored_bytes(storage: Path) -> Callable[[str], bytes | None]:
    """For :func:`judge`: the dataset bytes (after the File Meta) a node with its index in
    ``storage`` keeps for a SOP Instance UID, read from its SQLite index and spool."""

    def lookup(sop_instance_uid: str) -> bytes | None:
        uri = f"file:{storage / 'dicomnode.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            row = db.execute(
                "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        if row is None:
            return None
        data = (storage / row[0]).read_bytes()
        # preamble, "DICM", then (0002,0000) UL: the length of the rest of the File Meta
        meta_length = struct.unpack_from("<I", data, 128 + 4 + 8)[0]
        return data[128 + 4 + 12 + meta_length :]

    return lookup


def hostile_attempt(kind: str, port: int, rng: random.Random) -> str:
    """One hostile connection; how the node ended it (each must end, and quickly)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        if kind == "unknown-calling-ae":
            sock.sendall(associate_rq(calling=f"INTRUDER{rng.randrange(100)}"))
        elif kind == "wrong-called-ae":
            sock.sendall(associate_rq("NOT-THE-NODE", calling="RAW"))
        elif kind == "wrong-context":
            sock.sendall(associate_rq(calling="RAW", context="1.2.3.4.5"))
        elif kind == "garbage":
            sock.sendall(rng.randbytes(rng.randrange(1, 4096)))
        elif kind == "truncated-rq":
            request = associate_rq(calling="RAW")
            sock.sendall(request[: rng.randrange(1, len(request))])
            sock.shutdown(socket.SHUT_WR)
        elif kind == "absurd-pdu-length":
            sock.sendall(struct.pack(">BxI", pdu.ASSOCIATE_RQ, rng.choice([0xFFFFFFFF, 1 << 31])))
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    if not reply:
        return "closed"
    return {pdu.ASSOCIATE_RJ: "rejected", pdu.ABORT: "aborted"}.get(reply[0], f"pdu {reply[0]}")


#: the hostile connections :func:`hostile_attempt` knows
ATTEMPTS = (
    "unknown-calling-ae",
    "wrong-called-ae",
    "wrong-context",
    "garbage",
    "truncated-rq",
    "absurd-pdu-length",
)
