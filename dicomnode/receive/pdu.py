"""DICOM Upper Layer PDUs (PS3.8 section 9) for the acceptor side.

The association phase happens once per connection, so it reuses pynetdicom's PDU classes and
presentation context negotiation. The data phase is ours: it streams P-DATA values to their
destination without queues between threads, which is where the receiver spends its time.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicomnode.errors import PeerClosed, ProtocolError

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.12273546044512710602301282630506522174"
IMPLEMENTATION_VERSION = "DICOMNODE_010"
MAX_ASSOCIATE_RQ = 1 << 20  # an A-ASSOCIATE-RQ with 128 contexts is some tens of KB

# A-ABORT sources and source 2 (service provider) reasons, PS3.8 9.3.8; ProtocolError's
# default is 6, invalid parameter value
ABORT_SERVICE_USER, ABORT_SERVICE_PROVIDER = 0, 2
ABORT_NOT_SPECIFIED, ABORT_UNEXPECTED_PDU = 0, 2

_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
RELEASE_RP_PDU = _HEADER.pack(RELEASE_RP, 4) + b"\0" * 4


class Readable(Protocol):
    """A socket, or what reads from one within a deadline."""

    def recv(self, size: int, /) -> bytes: ...

    def recv_into(self, buffer: memoryview, /) -> int: ...


def read_exact(sock: Readable, size: int) -> bytes:
    """Read exactly ``size`` bytes (small reads only: headers and command sets)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise PeerClosed()
        data += chunk
    return bytes(data)


def read_into(sock: Readable, view: memoryview) -> None:
    """Fill ``view`` from the socket without intermediate copies."""
    while view:
        received = sock.recv_into(view)
        if not received:
            raise PeerClosed()
        view = view[received:]


def read_header(sock: Readable) -> tuple[int, int]:
    """A PDU's type and length."""
    return _HEADER.unpack(read_exact(sock, _HEADER.size))


def read_pdv_header(sock: Readable) -> tuple[int, int, int]:
    """A presentation data value item: data length, context ID, message control header."""
    length, context_id, control = _PDV_HEADER.unpack(read_exact(sock, _PDV_HEADER.size))
    if length < 2:
        raise ProtocolError(f"presentation data value item of length {length}")
    return length - 2, context_id, control


def raw_ae_titles(body: bytes) -> tuple[bytes, bytes]:
    """The called and calling AE title fields of an A-ASSOCIATE-RQ body, as sent (PS3.8
    9.3.2: after the protocol version and two reserved bytes, 16 bytes each)."""
    return body[4:20], body[20:36]


def valid_ae_title(raw: bytes) -> bool:
    """Printable ASCII, no backslash, not all spaces (the AE value representation, PS3.5):
    no control character may reach a log line, the index or a dashboard."""
    return bool(raw.strip(b" ")) and all(0x20 <= byte <= 0x7E and byte != 0x5C for byte in raw)


def decode_associate_rq(body: bytes) -> A_ASSOCIATE:
    """Decode the body of an A-ASSOCIATE-RQ into pynetdicom's primitive."""
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(_HEADER.pack(ASSOCIATE_RQ, len(body)) + body)
        return pdu.to_primitive()
    except Exception as exc:  # pynetdicom raises assorted errors on malformed items
        # its messages quote the peer's bytes: repr keeps them on one line, without escapes
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {str(exc)[:200]!r}") from exc


@dataclass(frozen=True)
class Negotiated:
    """What the A-ASSOCIATE-AC granted: accepted context ID -> (abstract, transfer syntax)."""

    contexts: dict[int, tuple[str, str]]
    peer_max_pdu: int  # 0: no limit
    encoded_ac: bytes


def negotiate(
    request: A_ASSOCIATE, supported: Sequence[PresentationContext], max_pdu: int
) -> Negotiated:
    """Answer an association request: accept what we support, one transfer syntax per context."""
    # role selection is not needed to receive storage and verification
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    results, _ = negotiate_as_acceptor(
        request.presentation_context_definition_list, list(supported), roles
    )
    response = A_ASSOCIATE()
    response.application_context_name = APPLICATION_CONTEXT
    response.calling_ae_title = request.calling_ae_title
    response.called_ae_title = request.called_ae_title
    response.result = 0x00
    response.presentation_context_definition_results_list = results
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    response.user_information = [maximum, implementation, version]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(response)
    accepted: dict[int, tuple[str, str]] = {}
    for cx in results:
        if cx.result == 0x00:
            assert cx.context_id is not None  # a result carries its request item's ID
            accepted[cx.context_id] = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
    return Negotiated(accepted, int(request.maximum_length_received or 0), pdu.encode())


def encode_associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    response = A_ASSOCIATE()
    response.result, response.result_source, response.diagnostic = result, source, diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(response)
    return pdu.encode()


def encode_abort(reason: int, source: int = ABORT_SERVICE_PROVIDER) -> bytes:
    """An A-ABORT; from the service user (our policy ending it) the reason is always 0."""
    pdu = A_ABORT_RQ()
    pdu.source = source
    pdu.reason_diagnostic = reason if source == ABORT_SERVICE_PROVIDER else ABORT_NOT_SPECIFIED
    return pdu.encode()


def encode_p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF with one PDV (responses are small: a command set)."""
    item = _PDV_HEADER.pack(len(data) + 2, context_id, control) + data
    return _HEADER.pack(P_DATA_TF, len(item)) + item
