"""Send arbitrary bytes as a C-STORE dataset, to prove the receiver refuses bad input cleanly.

:func:`send_raw` goes through pynetdicom (one association per payload); :class:`RawAssociation`
speaks the PDUs itself on a plain socket, to send thousands of payloads on one association
quickly, or to break the protocol on purpose.
"""

from __future__ import annotations

import socket
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode

from dicomnode.errors import PeerClosed


def encode_dataset(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> bytes:
    """Encode a dataset (without file meta) as it would travel in P-DATA."""
    data = encode(ds, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    assert data is not None, "dataset could not be encoded"
    return data


def send_raw(
    host: str,
    port: int,
    *,
    called_aet: str,
    sop_class: str,
    sop_instance: str,
    payload: bytes,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    calling_aet: str = "RAWSCU",
) -> int | None:
    """One association, one C-STORE of ``payload`` as it is; return the status (None: no reply).

    pynetdicom sends a file's bytes after its File Meta untouched when sending chunked, so the
    payload is wrapped in a File Meta naming the command's SOP class and instance.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = transfer_syntax
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "payload.dcm"
        with path.open("wb") as fp:
            fp.write(b"\0" * 128 + b"DICM")
            # pydicom types fp as its DicomIO; it only calls fp.write(bytes) (any binary file)
            write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
            fp.write(payload)
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(sop_class, [transfer_syntax])
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            return None
        # a process-wide switch: set for this send only, or every later pynetdicom sender in
        # the process sends files as they are and needs their exact syntax accepted
        chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            status = assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked
            if assoc.is_established:
                assoc.release()
    return int(status.Status) if "Status" in status else None


EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def associate_rq(
    called: str = "DICOMNODE",
    *,
    calling: str = "RAW",
    context: str | None = None,
    sop_class: str = CT_IMAGE_STORAGE,
    transfer_syntax: str = EXPLICIT_LE,
    max_pdu: int = 16384,
    more_syntaxes: Sequence[str] = (),
) -> bytes:
    """An encoded A-ASSOCIATE-RQ proposing ``sop_class`` in ``transfer_syntax`` as context 1,
    and in each of ``more_syntaxes`` as contexts 3, 5, ... (one syntax per context)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    from dicomnode.receive import pdu

    request = A_ASSOCIATE()
    request.application_context_name = context or pdu.APPLICATION_CONTEXT
    request.calling_ae_title, request.called_ae_title = calling, called
    contexts = []
    for index, syntax in enumerate((transfer_syntax, *more_syntaxes)):
        cx = build_context(sop_class, [syntax])
        cx.context_id = 1 + 2 * index
        contexts.append(cx)
    request.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    request.user_information = [maximum]
    encoded = A_ASSOCIATE_RQ()
    encoded.from_primitive(request)
    return bytes(encoded.encode())


def store_command(
    message_id: int = 1,
    sop_instance: str | bytes = "1.2.3",
    sop_class: str | bytes = CT_IMAGE_STORAGE,
) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian) announcing a dataset."""
    return encode_command(command_elements(message_id, sop_instance, sop_class))


def command_elements(
    message_id: int, sop_instance: str | bytes, sop_class: str | bytes = CT_IMAGE_STORAGE
) -> list[tuple[int, bytes]]:
    """The elements (group 0000 element number, value) of a C-STORE-RQ, to send or to break."""
    from dicomnode.receive import dimse

    def uid(value: str | bytes) -> bytes:
        raw = value.encode() if isinstance(value, str) else value
        return raw + (b"\0" if len(raw) % 2 else b"")

    return [
        (0x0002, uid(sop_class)),
        (0x0100, struct.pack("<H", dimse.C_STORE_RQ)),
        (0x0110, struct.pack("<H", message_id & 0xFFFF)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)),
        (0x1000, uid(sop_instance)),
    ]


def encode_command(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set of these elements, with its group length (implicit VR little endian)."""
    body = b"".join(
        struct.pack("<HHI", 0, element, len(value)) + value for element, value in elements
    )
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def read_status(sock: socket.socket) -> int:
    """The Status of the next P-DATA-TF (a DIMSE response command)."""
    from dicomnode.receive import pdu

    pdu_type, length = pdu.read_header(sock)
    if pdu_type != pdu.P_DATA_TF:
        raise ConnectionError(f"expected P-DATA-TF (4), got PDU type {pdu_type}")
    data = pdu.read_exact(sock, length)[6:]  # one PDV: its length, context ID, control
    offset = 0
    while offset + 8 <= len(data):  # the command set, implicit VR little endian
        group, element, size = struct.unpack_from("<HHI", data, offset)
        if (group, element) == (0x0000, 0x0900):
            return int(struct.unpack_from("<H", data, offset + 8)[0])
        offset += 8 + size
    raise ConnectionError("the response command has no Status (0000,0900)")


class AssociationRefused(ConnectionError):
    """The node answered the A-ASSOCIATE-RQ with something other than A-ASSOCIATE-AC."""

    def __init__(self, pdu_type: int, body: bytes) -> None:
        super().__init__(f"association refused: PDU type {pdu_type}, {body[:4].hex()}")
        self.pdu_type, self.body = pdu_type, body


class RawAssociation:
    """One association on a plain socket; C-STOREs of payload bytes as they are."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        called: str = "DICOMNODE",
        calling: str = "RAW",
        sop_class: str = CT_IMAGE_STORAGE,
        transfer_syntax: str = EXPLICIT_LE,
        more_syntaxes: Sequence[str] = (),
        fragment: int = 16000,
        timeout: float = 30.0,
    ) -> None:
        from dicomnode.receive import pdu

        self.sop_class, self.fragment = sop_class, fragment
        self.peer, self.calling = (host, port), calling
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.sendall(
            associate_rq(
                called,
                calling=calling,
                sop_class=sop_class,
                transfer_syntax=transfer_syntax,
                more_syntaxes=more_syntaxes,
            )
        )
        pdu_type, length = pdu.read_header(self.sock)
        body = pdu.read_exact(self.sock, length)
        if pdu_type != pdu.ASSOCIATE_AC:
            self.sock.close()
            raise AssociationRefused(pdu_type, body)
        self.message_id = 0
        #: transfer syntax -> the presentation context ID proposed for it
        self.contexts = {
            syntax: 1 + 2 * index for index, syntax in enumerate((transfer_syntax, *more_syntaxes))
        }

    def store(
        self,
        payload: bytes,
        sop_instance: str | bytes,
        *,
        syntax: str | None = None,
        command: bytes | None = None,
    ) -> int:
        """Send one C-STORE (in the context of ``syntax``, the first by default; ``command``
        replaces the well-formed command set); its response status (ConnectionError when the
        node hung up)."""
        from dicomnode.receive import pdu

        self.message_id += 1
        context = self.contexts[syntax] if syntax is not None else 1
        if command is None:
            command = store_command(self.message_id, sop_instance, self.sop_class)
        self.sock.sendall(pdu.encode_p_data(context, 0x03, command))
        chunks = [payload[i : i + self.fragment] for i in range(0, len(payload), self.fragment)]
        for index, chunk in enumerate(chunks or [b""]):
            last = index == len(chunks or [b""]) - 1
            self.sock.sendall(pdu.encode_p_data(context, 0x02 if last else 0x00, chunk))
        try:
            return read_status(self.sock)
        except PeerClosed as exc:
            raise ConnectionError("the node closed the connection instead of answering") from exc

    def release(self) -> None:
        from dicomnode.receive import pdu

        try:
            self.sock.sendall(struct.pack(">BxI", pdu.RELEASE_RQ, 4) + b"\0" * 4)
            pdu.read_header(self.sock)
        except (OSError, PeerClosed):
            pass  # already ended by the node
        finally:
            self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
