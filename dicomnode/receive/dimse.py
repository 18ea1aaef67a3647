"""DIMSE command sets (PS3.7 section 9.3), always implicit VR little endian: just what an SCP of
storage and verification reads and writes."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from dicomnode.errors import InvalidRequestSOPClass, InvalidRequestUID, StoreRefused

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
STATUS_UNRECOGNIZED_OPERATION = 0x0211

_ELEMENT = struct.Struct("<HHI")
_US = {0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900}
_TEXT = {0x0003, 0x1001, 0x1030, 0x0902}
AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID = 0x0002, 0x1000
_UID = re.compile(rb"[0-9]+(\.[0-9]+)*")  # the rule validate.py applies to the dataset's UIDs
UID_MAX = 64


@dataclass(frozen=True)
class Command:
    """A request's command set.

    Its Affected SOP Class and Instance UIDs are valid UIDs or empty: one that is not (bytes
    from the wire that would reach a file name, a file's meta header, a log line) is left out
    and ``refusal`` says why, for the response to carry.
    """

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    has_dataset: bool
    refusal: StoreRefused | None = field(default=None, compare=False)


def decode_command(data: bytes) -> Command:
    """Parse a command set; raise ValueError when it is malformed.

    A missing or invalid Affected SOP Class or Instance UID (mandatory in a C-STORE) is not
    malformed framing: the command is returned with ``refusal`` set, to be answered with a
    failure status while the association goes on.
    """
    values: dict[int, int | str] = {}
    uids: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + _ELEMENT.size > len(data):
            raise ValueError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += _ELEMENT.size
        if group != 0x0000 or offset + length > len(data):
            raise ValueError(f"command element ({group:04X},{element:04X}) is invalid")
        value = data[offset : offset + length]
        offset += length
        if element in _US and length == 2:
            values[element] = struct.unpack("<H", value)[0]
        elif element in (AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID):
            uids[element] = value.rstrip(b"\0 ")
        elif element in _TEXT:
            values[element] = value.decode("ascii", "replace").strip("\0 ")
    if 0x0100 not in values:
        raise ValueError("command set has no Command Field")
    command_field = int(values[0x0100])
    required = command_field == C_STORE_RQ  # both UIDs are mandatory in a C-STORE-RQ
    sop_class, class_problem = _checked_uid(uids.get(AFFECTED_SOP_CLASS_UID), required=required)
    sop_instance, instance_problem = _checked_uid(
        uids.get(AFFECTED_SOP_INSTANCE_UID), required=required
    )
    refusal: StoreRefused | None = None
    if class_problem:
        refusal = InvalidRequestSOPClass(f"Affected SOP Class UID {class_problem}")
    elif instance_problem:
        refusal = InvalidRequestUID(f"Affected SOP Instance UID {instance_problem}")
    return Command(
        command_field=command_field,
        message_id=int(values.get(0x0110, 0)),
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=sop_instance,
        has_dataset=values.get(0x0800, NO_DATASET) != NO_DATASET,
        refusal=refusal,
    )


def valid_uid(raw: bytes) -> bool:
    """Digits and dots, at most 64 characters (PS3.5 9.1)."""
    return len(raw) <= UID_MAX and _UID.fullmatch(raw) is not None


def _checked_uid(raw: bytes | None, *, required: bool) -> tuple[str, str]:
    """The UID as text and "" when valid; "" and what is wrong with it otherwise (its bytes
    quoted, never raw: they go to a log line and an Error Comment)."""
    if not raw:
        return "", "is missing" if required else ""
    if not valid_uid(raw):
        shown = raw[:UID_MAX].decode("ascii", "backslashreplace")
        more = "..." if len(raw) > UID_MAX else ""
        return "", f"{shown!r}{more} is not a valid UID"
    return raw.decode("ascii"), ""


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_response(request: Command, status: int, error_comment: str = "") -> bytes:
    """The response command set to ``request`` (C-STORE-RSP, C-ECHO-RSP, or any other)."""
    body = b""
    if request.affected_sop_class_uid:
        body += _element(0x0002, _uid(request.affected_sop_class_uid))
    body += _element(0x0100, struct.pack("<H", request.command_field | 0x8000))
    body += _element(0x0120, struct.pack("<H", request.message_id))
    body += _element(0x0800, struct.pack("<H", NO_DATASET))
    body += _element(0x0900, struct.pack("<H", status))
    if error_comment:
        body += _element(0x0902, _text(error_comment[:64]))
    if request.affected_sop_instance_uid:
        body += _element(0x1000, _uid(request.affected_sop_instance_uid))
    return _element(0x0000, struct.pack("<I", len(body))) + body
