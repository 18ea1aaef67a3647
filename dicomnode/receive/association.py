"""One association, acceptor side: negotiate, then serve C-ECHO and C-STORE until release.

Each C-STORE dataset streams from the socket into a temporary file in the receiver's own
``incoming/<receiver_id>/`` folder of the spool, one bounded buffer at a time, so no dataset is
ever held in memory whatever its size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dicomnode.domain import Peer
from dicomnode.errors import PeerClosed, ProtocolError, StoreFailed, StoreRefused
from dicomnode.receive import dimse, pdu
from dicomnode.receive.policy import REJECT_CALLED_AET, REJECT_CALLING_AET, Rejection
from dicomnode.receive.spool import file_meta

if TYPE_CHECKING:
    from dicomnode.receive.server import Receiver

logger = logging.getLogger(__name__)

BUFFER_SIZE = 1 << 20
LINGER_BUFFER_SIZE = 1 << 12
MAX_COMMAND_SET = 1 << 16
STATUS_SUCCESS = 0x0000
STATUS_UNEXPECTED_FAILURE = 0xA701  # out of resources: unable to store (a fault on our side)
STATUS_MISSING_DATASET = 0xC000
REJECT_APPLICATION_CONTEXT = Rejection("unsupported application context", 0x01, 0x01, 0x02)


class _Reader:
    """Reads from the socket no longer than the network timeout per read, and not past
    ``deadline`` (monotonic) in all, however the peer trickles its bytes: past it, a read
    raises TimeoutError.

    The socket's timeout is set again only within a network timeout of the deadline, so the
    data path makes no extra system call.
    """

    def __init__(self, sock: socket.socket, network_timeout: float, deadline: float) -> None:
        self.sock = sock
        self.network_timeout = network_timeout
        self.deadline = deadline
        self._timeout = -1.0

    def rebind(self, sock: socket.socket) -> None:
        """Read from ``sock`` now (the TLS socket that wraps the first)."""
        self.sock, self._timeout = sock, -1.0

    def recv(self, size: int, /) -> bytes:
        self._arm()
        return self.sock.recv(size)

    def recv_into(self, buffer: memoryview, /) -> int:
        self._arm()
        return self.sock.recv_into(buffer)

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        timeout = min(self.network_timeout, left)
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout


@dataclass
class _Transfer:
    """A C-STORE whose dataset is arriving."""

    command: dimse.Command
    context_id: int
    transfer_syntax: str
    path: Path | None = None
    file: BinaryIO | None = None
    refusal: StoreRefused | None = None  # decided before the data came (disk floor)
    status: int | None = None  # a non-storage request with a dataset: answer this


class AssociationHandler:
    """Serves one connection from accept to close."""

    def __init__(
        self,
        receiver: Receiver,
        sock: socket.socket,
        address: tuple[str, int],
        accepted_at: float | None = None,
    ) -> None:
        node = receiver.settings.node
        self.receiver = receiver
        self.sock = sock
        self.host, self.port = str(address[0]), int(address[1])
        self.peer: Peer | None = None
        self.admitted = False  # holds an association slot (else a pending one)
        self.pk: int | None = None
        self.contexts: dict[int, tuple[str, str]] = {}
        self.max_pdu = node.max_pdu_size
        self.command = bytearray()
        self.transfer: _Transfer | None = None
        #: allocated once associated: a connection that never associates costs no megabyte
        self.buffer = memoryview(bytearray(0))
        self.stored = self.refused = self.received = 0
        started = time.monotonic() if accepted_at is None else accepted_at
        #: the whole A-ASSOCIATE-RQ (after any TLS handshake) must have come by then
        self.associate_by = started + node.associate_timeout_s
        self.reader = _Reader(sock, node.network_timeout_s, self.associate_by)
        self.end_by = self.idle_by = math.inf  # set once associated

    def run(self) -> None:
        """Serve the connection; whatever happens, end it with one log line that says why,
        an A-ABORT where an association is left to abort, and the association closed in the
        index."""
        outcome = "aborted"
        try:
            if self._secure() and self._associate():
                outcome = self._data_phase()
        except ProtocolError as exc:
            self._abort(str(exc), pdu.encode_abort(exc.reason))
        except TimeoutError:
            if self.peer is None:
                logger.warning(
                    "Closed connection from %s: no association request within %g s "
                    "(associate_timeout_s)",
                    self.host,
                    self.receiver.settings.node.associate_timeout_s,
                    extra={"action": "association_rejected"},
                )
            else:
                self._abort(self._expired(), self._user_abort())
        except (PeerClosed, ConnectionError, ssl.SSLError) as exc:
            if self.peer is not None:
                logger.warning(
                    "Association %s from %s ended without release: %s",
                    self.pk,
                    self.host,
                    type(exc).__name__,
                    extra={"action": "association_abort"},
                )
        except Exception as exc:  # a fault of ours: this association ends, the node goes on
            logger.exception(
                "Aborting association %s from %s after an internal error: %s",
                self.pk,
                self.host,
                type(exc).__name__,
                extra={"action": "association_abort"},
            )
            self._send(self._user_abort())
            self._linger()
        finally:
            try:
                self._discard_transfer()
            finally:
                self._close()
                self.receiver.connection_closed(self, outcome)

    def _abort(self, reason: str, abort_pdu: bytes) -> None:
        logger.warning(
            "Aborting association %s from %s: %s",
            self.pk,
            self.host,
            reason,
            extra={"action": "association_abort"},
        )
        self._send(abort_pdu)
        self._linger()

    @staticmethod
    def _user_abort() -> bytes:
        """The A-ABORT of our own policy (a time limit, a fault): from the service user."""
        return pdu.encode_abort(pdu.ABORT_NOT_SPECIFIED, pdu.ABORT_SERVICE_USER)

    def _expired(self) -> str:
        """Which time limit ended the association."""
        node = self.receiver.settings.node
        now = time.monotonic()
        if now >= self.end_by:
            return f"open for max_association_s ({node.max_association_s:g} s)"
        if now >= self.idle_by:
            return (
                f"no C-STORE for idle_timeout_s ({node.idle_timeout_s:g} s; C-ECHO does not count)"
            )
        return f"nothing received for network_timeout_s ({node.network_timeout_s:g} s)"

    def _stored_something(self) -> None:
        """C-STORE traffic: the idle time starts again (nothing else restarts it)."""
        idle = self.receiver.settings.node.idle_timeout_s
        if idle:
            self.idle_by = time.monotonic() + idle
            self.reader.deadline = min(self.end_by, self.idle_by)

    # -- association phase ---------------------------------------------------------------

    def _secure(self) -> bool:
        context = self.receiver.ssl_context
        if context is None:
            return True
        # CPython bounds the whole handshake by the timeout, not each read
        self.sock.settimeout(max(self.associate_by - time.monotonic(), 0.001))
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            logger.warning(
                "TLS handshake with %s failed: %s", self.host, exc, extra={"action": "tls_refused"}
            )
            return False
        self.reader.rebind(self.sock)
        return True

    def _associate(self) -> bool:
        node = self.receiver.settings.node
        try:
            pdu_type, length = pdu.read_header(self.reader)
        except (PeerClosed, ConnectionError):
            return False
        if pdu_type != pdu.ASSOCIATE_RQ or length > pdu.MAX_ASSOCIATE_RQ:
            logger.warning(
                "Closed connection from %s: not an association request (PDU type "
                "0x%02X, length %d)",
                self.host,
                pdu_type,
                length,
                extra={"action": "association_rejected"},
            )
            self._linger()
            return False
        body = pdu.read_exact(self.reader, length)
        rejection = _invalid_ae_title(body)
        if rejection is not None:
            return self._reject(rejection, pdu.raw_ae_titles(body)[1].decode("latin-1").rstrip())
        request = pdu.decode_associate_rq(body)
        peer = Peer(
            calling_aet=str(request.calling_ae_title).strip(),
            called_aet=str(request.called_ae_title).strip(),
            host=self.host,
            port=self.port,
        )
        rejection = self.receiver.policy.check(
            calling_aet=peer.calling_aet, called_aet=peer.called_aet, host=peer.host
        )
        if rejection is None and str(request.application_context_name) != pdu.APPLICATION_CONTEXT:
            rejection = REJECT_APPLICATION_CONTEXT
        if rejection is None:
            rejection = self.receiver.admit(self, peer)
        if rejection is not None:
            return self._reject(rejection, peer.calling_aet)
        self.peer = peer  # from here on the association is closed in the index, however it ends
        negotiated = pdu.negotiate(request, self.receiver.supported_contexts, self.max_pdu)
        self.contexts = negotiated.contexts
        self.buffer = memoryview(bytearray(BUFFER_SIZE))
        self.sock.sendall(negotiated.encoded_ac)
        self.receiver.association_opened(self)
        now = time.monotonic()
        self.end_by = now + node.max_association_s if node.max_association_s else math.inf
        self.idle_by = now + node.idle_timeout_s if node.idle_timeout_s else math.inf
        self.reader.deadline = min(self.end_by, self.idle_by)
        return True

    def _reject(self, rejection: Rejection, calling_aet: str) -> bool:
        logger.warning(
            "Rejected association from %s as %r: %s",
            self.host,
            calling_aet,
            rejection.reason,
            extra={"action": "association_rejected"},
        )
        self._send(
            pdu.encode_associate_rj(rejection.result, rejection.source, rejection.diagnostic)
        )
        self._linger()
        return False

    # -- data phase ----------------------------------------------------------------------

    def _data_phase(self) -> str:
        while True:
            pdu_type, length = pdu.read_header(self.reader)
            if pdu_type == pdu.P_DATA_TF:
                if self.max_pdu and length > self.max_pdu:
                    raise ProtocolError(
                        f"P-DATA-TF of {length} bytes exceeds the agreed maximum of {self.max_pdu}"
                    )
                self._p_data(length)
            elif pdu_type == pdu.RELEASE_RQ:
                pdu.read_exact(self.reader, min(length, 64))
                self.sock.sendall(pdu.RELEASE_RP_PDU)
                self._linger()
                return "released"
            elif pdu_type == pdu.ABORT:
                return "aborted"
            else:
                raise ProtocolError(
                    f"unexpected PDU type 0x{pdu_type:02X}", pdu.ABORT_UNEXPECTED_PDU
                )

    def _p_data(self, length: int) -> None:
        remaining = length
        while remaining:
            if remaining < 6:
                raise ProtocolError("P-DATA-TF ends inside a presentation data value")
            size, context_id, control = pdu.read_pdv_header(self.reader)
            remaining -= 6
            if size > remaining:
                raise ProtocolError("presentation data value is longer than its PDU")
            if context_id not in self.contexts:
                raise ProtocolError(f"presentation context {context_id} was not accepted")
            if control & 0x01:
                self._command_fragment(size, context_id, last=bool(control & 0x02))
            else:
                self._dataset_fragment(size, context_id, last=bool(control & 0x02))
            remaining -= size

    def _command_fragment(self, size: int, context_id: int, *, last: bool) -> None:
        if self.transfer is not None:
            raise ProtocolError("a command arrived before the previous dataset ended")
        if len(self.command) + size > MAX_COMMAND_SET:
            raise ProtocolError("command set is larger than 64 KiB")
        self.command += pdu.read_exact(self.reader, size)
        if not last:
            return
        try:
            command = dimse.decode_command(bytes(self.command))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        finally:
            self.command.clear()
        self._start(command, context_id)

    def _start(self, command: dimse.Command, context_id: int) -> None:
        abstract_syntax, transfer_syntax = self.contexts[context_id]
        if command.command_field == dimse.C_STORE_RQ:
            self._stored_something()
        if command.refusal is not None and command.command_field in (
            dimse.C_STORE_RQ,
            dimse.C_ECHO_RQ,
        ):
            self._refuse_command(command, context_id, transfer_syntax, command.refusal)
        elif command.command_field == dimse.C_ECHO_RQ:
            self._respond(context_id, command, STATUS_SUCCESS)
        elif command.command_field == dimse.C_STORE_RQ and command.has_dataset:
            self.transfer = _Transfer(command, context_id, transfer_syntax)
            self._open_file(self.transfer, abstract_syntax)
        elif command.command_field == dimse.C_STORE_RQ:
            self._respond(context_id, command, STATUS_MISSING_DATASET, "C-STORE without dataset")
        elif command.command_field == dimse.C_CANCEL_RQ:
            pass
        elif command.has_dataset:  # read and drop its dataset, then answer
            self.transfer = _Transfer(
                command, context_id, transfer_syntax, status=dimse.STATUS_UNRECOGNIZED_OPERATION
            )
        else:
            self._respond(context_id, command, dimse.STATUS_UNRECOGNIZED_OPERATION)

    def _refuse_command(
        self, command: dimse.Command, context_id: int, transfer_syntax: str, refusal: StoreRefused
    ) -> None:
        """A request whose UIDs are unusable: its dataset (if any) is read and dropped, then
        the failure status is answered; the association goes on."""
        if command.has_dataset:
            self.transfer = _Transfer(command, context_id, transfer_syntax, refusal=refusal)
            return
        if command.command_field == dimse.C_STORE_RQ:
            self.refused += 1
        logger.warning(
            "Refused request (association %s, status 0x%04X): %s",
            self.pk,
            refusal.dicom_status,
            refusal.message,
            extra={"action": "store_refused"},
        )
        self._respond(context_id, command, refusal.dicom_status, refusal.message)

    def _open_file(self, transfer: _Transfer, abstract_syntax: str) -> None:
        try:
            self.receiver.store.check_disk()  # refuse before writing anything
        except StoreRefused as exc:
            transfer.refusal = exc
            return
        header = file_meta(
            sop_class_uid=abstract_syntax,
            sop_instance_uid=transfer.command.affected_sop_instance_uid or "0",
            transfer_syntax_uid=transfer.transfer_syntax,
            implementation_class_uid=pdu.IMPLEMENTATION_CLASS_UID,
            implementation_version=pdu.IMPLEMENTATION_VERSION,
            source_aet=self.peer.calling_aet if self.peer is not None else "",
        )
        transfer.path = self._incoming_name()
        try:
            fd = os.open(transfer.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            transfer.file = os.fdopen(fd, "wb", buffering=0)
            transfer.file.write(header)
        except OSError as exc:  # no file, no disk: refuse this one, keep the association
            transfer.refusal = StoreFailed(f"could not write: {exc.strerror}")
            self._close_file(transfer, remove=True)

    def _incoming_name(self) -> Path:
        """A name no other association or receiver uses (see Spool.new_incoming)."""
        self.received += 1
        return self.receiver.store.spool.new_incoming()

    def _dataset_fragment(self, size: int, context_id: int, *, last: bool) -> None:
        transfer = self.transfer
        if transfer is None or transfer.context_id != context_id:
            raise ProtocolError("dataset fragment without a command in its context")
        if transfer.command.command_field == dimse.C_STORE_RQ:
            self._stored_something()
        while size:
            chunk = self.buffer[: min(size, BUFFER_SIZE)]
            pdu.read_into(self.reader, chunk)
            if transfer.file is not None:
                try:
                    transfer.file.write(chunk)
                except OSError as exc:  # disk full mid-write: keep reading, refuse at the end
                    transfer.refusal = StoreRefused(f"could not write: {exc.strerror}")
                    self._close_file(transfer, remove=True)
            size -= len(chunk)
        if last:
            self.transfer = None
            self._finish(transfer)

    def _finish(self, transfer: _Transfer) -> None:
        command = transfer.command
        if transfer.status is not None:
            self._respond(transfer.context_id, command, transfer.status)
            return
        self._close_file(transfer, remove=False)
        status, comment = self._store(transfer)
        if transfer.path is not None:
            transfer.path.unlink(missing_ok=True)  # refused, duplicate: nothing left behind
        self._respond(transfer.context_id, command, status, comment)

    def _store(self, transfer: _Transfer) -> tuple[int, str]:
        try:
            if transfer.refusal is not None:
                raise transfer.refusal
            assert transfer.path is not None and self.peer is not None
            stored = self.receiver.store.store(
                transfer.path,
                sop_class_uid=self.contexts[transfer.context_id][0],
                sop_instance_uid=transfer.command.affected_sop_instance_uid,
                transfer_syntax=transfer.transfer_syntax,
                peer=self.peer,
                association_pk=self.pk,
            )
        except StoreRefused as exc:
            self.refused += 1
            logger.warning(
                "Refused instance (association %s, status 0x%04X): %s",
                self.pk,
                exc.dicom_status,
                exc.message,
                extra={"action": "store_refused"},
            )
            return exc.dicom_status, exc.message
        except Exception as exc:
            self.refused += 1
            logger.exception(
                "Failed to store instance (association %s)",
                self.pk,
                extra={"action": "store_failed"},
            )
            return STATUS_UNEXPECTED_FAILURE, f"internal error: {type(exc).__name__}"
        self.stored += 1
        logger.debug(
            "Stored %s as %s%s",
            stored.header.sop_instance_uid,
            stored.path,
            " (duplicate, kept first)" if stored.duplicate else "",
            extra={"action": "store"},
        )
        return STATUS_SUCCESS, ""

    # -- plumbing ------------------------------------------------------------------------

    def _respond(
        self, context_id: int, command: dimse.Command, status: int, comment: str = ""
    ) -> None:
        data = dimse.encode_response(command, status, comment)
        self.sock.sendall(pdu.encode_p_data(context_id, 0x03, data))

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _linger(self, seconds: float = 2.0) -> None:
        """After our last PDU, half-close and drain what the peer still sends, for at most
        ``seconds``: closing with unread input would reset the connection and could destroy
        the reject, release or abort before the peer reads it (PS3.8 ARTIM)."""
        deadline = time.monotonic() + seconds
        drain = memoryview(bytearray(LINGER_BUFFER_SIZE))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv_into(drain):
                    break

    def _close_file(self, transfer: _Transfer, *, remove: bool) -> None:
        if transfer.file is not None:
            transfer.file.close()
            transfer.file = None
        if remove and transfer.path is not None:
            transfer.path.unlink(missing_ok=True)
            transfer.path = None

    def _discard_transfer(self) -> None:
        if self.transfer is not None:
            self._close_file(self.transfer, remove=True)
            self.transfer = None

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _invalid_ae_title(body: bytes) -> Rejection | None:
    """Refuse an A-ASSOCIATE-RQ whose AE titles hold control characters, non-ASCII bytes or a
    backslash (the AE value representation forbids them; such a title would reach log lines,
    the index and the dashboard); one too short to hold them is left to the decoder."""
    if len(body) < 36:
        return None
    called, calling = pdu.raw_ae_titles(body)
    if not pdu.valid_ae_title(calling):
        return Rejection(f"calling AE title {calling!r} is not valid", *REJECT_CALLING_AET)
    if not pdu.valid_ae_title(called):
        return Rejection(f"called AE title {called!r} is not valid", *REJECT_CALLED_AET)
    return None
