"""The DICOM listener: a pynetdicom AE serving C-ECHO and C-STORE for every storage class."""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import index
from dicomnode.domain import Peer
from dicomnode.errors import StoreRefused
from dicomnode.receive.contexts import TRANSFER_SYNTAXES
from dicomnode.receive.policy import AccessPolicy
from dicomnode.receive.store import InstanceStore
from dicomnode.receive.tls import server_context

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_UNEXPECTED_FAILURE = 0xA701  # out of resources: unable to store (a fault on our side)


@dataclass
class _AssociationState:
    pk: int | None
    peer: Peer
    stored: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadedAssociationServer):
    """Sets TCP_NODELAY and moves the TLS handshake off the accept loop into the association thread.

    Without TCP_NODELAY a C-STORE-RSP can wait on the peer's delayed ACK; with the handshake in the
    accept loop one silent TLS client would stall every other connection.
    """

    handshake_timeout: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(self.handshake_timeout)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                logger.warning(
                    "TLS handshake with %s failed: %s",
                    client_address[0],
                    exc,
                    extra={"action": "tls_refused"},
                )
                self.shutdown_request(request)
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


class Receiver:
    """Accepts associations and stores what they send through an InstanceStore."""

    def __init__(
        self, settings: Settings, store: InstanceStore, sessions: sessionmaker[Session]
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.policy = AccessPolicy.from_settings(settings.node.ae_title, settings.security)
        self._states: dict[int, _AssociationState] = {}
        self._states_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is real even when 0 was configured."""
        assert self._server is not None, "receiver is not started"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve in a background thread."""
        node = self.settings.node
        # Stream each dataset to a file next to the spool (same filesystem: a rename moves it).
        # pynetdicom has no setting for where; point only its C-STORE temporary files there.
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined]
            tempfile.NamedTemporaryFile, dir=self.store.spool.incoming
        )
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = False  # our policy checks it, with logging
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        tls = self.settings.security.tls
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = ae.make_server(
            (node.host, node.port),
            ssl_context=server_context(tls) if tls.enabled else None,
            evt_handlers=handlers,
            server_class=_Server,
        )
        ae._servers.append(self._server)  # as ae.start_server does; shutdown() expects it
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dicom-listener", daemon=True
        )
        self._thread.start()
        host, port = self.address
        logger.info(
            "Listening as %s on %s:%d%s",
            node.ae_title,
            host,
            port,
            " (TLS)" if tls.enabled else "",
            extra={"action": "listen"},
        )

    def stop(self) -> None:
        """Stop accepting, and wait briefly for open associations to finish."""
        if self._server is None:
            return
        self._server.shutdown()  # also closes the listening socket
        for assoc in list(self._server.active_associations):
            assoc.join(timeout=10)
        self._server = None

    # -- association events --------------------------------------------------------------

    def _peer(self, event: evt.Event) -> Peer:
        requestor, acceptor = event.assoc.requestor, event.assoc.acceptor
        request = requestor.primitive  # at EVT_REQUESTED the titles are only in the request
        calling = request.calling_ae_title if request else requestor.ae_title
        called = request.called_ae_title if request else acceptor.ae_title
        return Peer(
            calling_aet=str(calling).strip(),
            called_aet=str(called).strip(),
            host=str(requestor.address),
            port=int(requestor.port),
        )

    def _on_requested(self, event: evt.Event) -> None:
        peer = self._peer(event)
        rejection = self.policy.check(
            calling_aet=peer.calling_aet, called_aet=peer.called_aet, host=peer.host
        )
        if rejection is not None:
            logger.warning(
                "Rejected association from %s as %r: %s",
                peer.host,
                peer.calling_aet,
                rejection.reason,
                extra={"action": "association_rejected"},
            )
            event.assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            # send_reject only queues the A-ASSOCIATE-RJ; kill() waits until it is on the wire
            # (as pynetdicom's own rejections do), else the socket closes first.
            event.assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        peer = self._peer(event)
        pk = None
        try:
            with self.sessions.begin() as session:
                pk = index.open_association(session, peer, datetime.now(UTC))
        except Exception:
            logger.exception("Could not record association", extra={"action": "association_open"})
        with self._states_lock:
            self._states[id(event.assoc)] = _AssociationState(pk=pk, peer=peer)
        logger.info(
            "Association %s from %s as %r",
            pk,
            peer.host,
            peer.calling_aet,
            extra={"action": "association_open"},
        )

    def _on_closed(self, event: evt.Event, outcome: str) -> None:
        with self._states_lock:
            state = self._states.pop(id(event.assoc), None)
        if state is None:
            return
        if state.pk is not None:
            try:
                with self.sessions.begin() as session:
                    index.close_association(
                        session,
                        state.pk,
                        outcome=outcome,
                        closed_at=datetime.now(UTC),
                        stored=state.stored,
                        refused=state.refused,
                    )
            except Exception:
                logger.exception(
                    "Could not record association end", extra={"action": "association_close"}
                )
        logger.info(
            "Association %s %s: %d stored, %d refused",
            state.pk,
            outcome,
            state.stored,
            state.refused,
            extra={"action": "association_close"},
        )

    def _state(self, event: evt.Event) -> _AssociationState:
        with self._states_lock:
            state = self._states.get(id(event.assoc))
        if state is None:  # established handler failed; keep serving
            state = _AssociationState(pk=None, peer=self._peer(event))
        return state

    # -- DIMSE services ------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        state = self._state(event)
        request = event.request
        try:
            stored = self.store.store(
                event.dataset_path,
                sop_class_uid=str(event.context.abstract_syntax),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                peer=state.peer,
                association_pk=state.pk,
            )
        except StoreRefused as exc:
            with state.lock:
                state.refused += 1
            logger.warning(
                "Refused instance (association %s, status 0x%04X): %s",
                state.pk,
                exc.dicom_status,
                exc.message,
                extra={"action": "store_refused"},
            )
            return _failure(exc.dicom_status, exc.message)
        except Exception as exc:
            with state.lock:
                state.refused += 1
            logger.exception(
                "Failed to store instance (association %s)",
                state.pk,
                extra={"action": "store_failed"},
            )
            return _failure(STATUS_UNEXPECTED_FAILURE, f"internal error: {type(exc).__name__}")
        with state.lock:
            state.stored += 1
        logger.debug(
            "Stored %s as %s%s",
            stored.header.sop_instance_uid,
            stored.path,
            " (duplicate, kept first)" if stored.duplicate else "",
            extra={"action": "store"},
        )
        return STATUS_SUCCESS


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]  # LO
    return response
