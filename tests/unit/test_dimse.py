"""The DIMSE command decoder: UIDs from the wire are checked before anything uses them."""

from __future__ import annotations

import struct

import pytest

from dicomnode.errors import InvalidRequestSOPClass, InvalidRequestUID
from dicomnode.receive import dimse
from dicomnode.testing.rawstore import CT_IMAGE_STORAGE, store_command


def _with_instance_uid(raw: bytes) -> bytes:
    """A C-STORE-RQ whose Affected SOP Instance UID is ``raw``, byte for byte."""
    return store_command(sop_instance=raw)


def test_valid_command_decodes() -> None:
    command = dimse.decode_command(store_command(7, "1.2.840.99.1"))
    assert command.refusal is None
    assert command.command_field == dimse.C_STORE_RQ and command.message_id == 7
    assert command.affected_sop_class_uid == CT_IMAGE_STORAGE
    assert command.affected_sop_instance_uid == "1.2.840.99.1"


@pytest.mark.parametrize(
    "raw",
    [
        b"1.2\xff\xfe.4",  # the bytes that once killed the association's thread
        b"1.2.3\n.4",
        b"1.2.3.4\x1b[31m",
        b"1." + b"2" * 63,  # 65 characters
        b"1.2.abc",
        b"../../etc",
        b"1..2",
        b"",
    ],
)
def test_invalid_instance_uid_is_refused_not_raised(raw: bytes) -> None:
    command = dimse.decode_command(_with_instance_uid(raw))
    assert isinstance(command.refusal, InvalidRequestUID)
    assert command.refusal.dicom_status == 0x0117
    assert command.affected_sop_instance_uid == ""  # never the bytes as they came
    message = command.refusal.message
    assert message.isascii() and message.isprintable(), message
    # and the response can always be encoded, without the bad UID
    response = dimse.encode_response(command, command.refusal.dicom_status, message)
    assert 0x1000 not in _elements(response)
    assert _elements(response)[0x0900] == struct.pack("<H", 0x0117)


def _elements(command: bytes) -> dict[int, bytes]:
    found, offset = {}, 0
    while offset < len(command):
        _, element, length = struct.unpack_from("<HHI", command, offset)
        found[element] = command[offset + 8 : offset + 8 + length]
        offset += 8 + length
    return found


def test_longest_valid_uid_is_accepted() -> None:
    uid = "1." + "2" * 62
    assert len(uid) == 64
    assert dimse.decode_command(store_command(sop_instance=uid)).refusal is None


def test_invalid_sop_class_uid_is_refused() -> None:
    command = dimse.decode_command(store_command(sop_class="1.2.3\xff"))
    assert isinstance(command.refusal, InvalidRequestSOPClass)
    assert command.refusal.dicom_status == 0x0122
    assert command.affected_sop_class_uid == ""


def test_echo_without_sop_class_is_fine() -> None:
    body = struct.pack("<HHI", 0, 0x0100, 2) + struct.pack("<H", dimse.C_ECHO_RQ)
    body += struct.pack("<HHI", 0, 0x0800, 2) + struct.pack("<H", dimse.NO_DATASET)
    command = dimse.decode_command(body)
    assert command.refusal is None and not command.has_dataset
