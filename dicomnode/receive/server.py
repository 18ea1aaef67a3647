"""The DICOM listener: accepts connections and serves each association in its own thread."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # set via globals()
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import audit
from dicomnode.config import Settings
from dicomnode.db import index
from dicomnode.domain import Peer
from dicomnode.receive.association import AssociationHandler
from dicomnode.receive.contexts import TRANSFER_SYNTAXES
from dicomnode.receive.policy import AccessPolicy, Rejection, Slots, host_key
from dicomnode.receive.store import InstanceStore
from dicomnode.receive.tls import server_context

logger = logging.getLogger(__name__)

#: connections closed at accept (over a pending limit) are logged at most this often per host
REFUSAL_LOG_INTERVAL_S = 10.0


def supported_contexts() -> list[PresentationContext]:
    """Verification, and every storage SOP class in every transfer syntax we store as received."""
    syntaxes: list[str | UID] = list(TRANSFER_SYNTAXES)  # the list type build_context takes
    contexts = [build_context(Verification)]
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None  # each of pynetdicom's contexts names its class
        contexts.append(build_context(cx.abstract_syntax, syntaxes))
    return contexts


class _Server(socketserver.ThreadingTCPServer):
    """Accepts connections; each is handed to an AssociationHandler in a thread of its own."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    #: the accept loop closes what is over a limit at once: a burst of senders (or a flood)
    #: waits in this queue, not in SYN retries (socketserver's default is 5)
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], receiver: Receiver, *, reuse_port: bool) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.receiver = receiver
        # serve --processes: every process binds the port, the kernel spreads connections
        self.allow_reuse_port = reuse_port
        super().__init__(address, socketserver.BaseRequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        # A C-STORE-RSP must not wait on the peer's delayed ACK.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread, unless too many connections wait to associate (in
        all or from its host): then close it at once, and no thread is spent on it."""
        host = str(client_address[0])
        if not self.receiver.connection_accepted(host):
            _close(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: give the slot back
            self.receiver.slots.release(host, None)
            _close(request)
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        AssociationHandler(self.receiver, request, client_address, time.monotonic()).run()

    def shutdown_request(self, request: Any) -> None:
        pass  # the handler closes its socket (it may have replaced it with a TLS one)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A fault outside an association's own handling: logged, not printed to stderr."""
        logger.exception(
            "Connection from %s failed", client_address[0], extra={"action": "association_abort"}
        )


class Receiver:
    """Accepts associations and stores what they send through an InstanceStore."""

    def __init__(
        self, settings: Settings, store: InstanceStore, sessions: sessionmaker[Session]
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.policy = AccessPolicy.from_settings(settings.node.ae_title, settings.security)
        tls = settings.security.tls
        self.ssl_context = server_context(tls) if tls.enabled else None
        self.supported_contexts = supported_contexts()
        self.slots = Slots(settings.node)
        self._refusals: dict[str, tuple[float, int]] = {}  # host: (last logged, since then)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        #: called after each association ends (the intake sweeps at once)
        self.on_association_closed: Callable[[], None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is real even when 0 was configured."""
        assert self._server is not None, "receiver is not started"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def receiver_id(self) -> str:
        return self.settings.node.receiver_id

    def start(self) -> None:
        """Close the associations an earlier run of this receiver died holding, then bind and
        serve in a background thread."""
        node = self.settings.node
        self.close_lost_associations()
        self._server = _Server((node.host, node.port), self, reuse_port=node.processes > 1)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dicom-listener", daemon=True
        )
        self._thread.start()
        host, port = self.address
        logger.info(
            "Listening as %s on %s:%d%s, receiver %s",
            node.ae_title,
            host,
            port,
            " (TLS)" if self.ssl_context else "",
            self.receiver_id,
            extra={"action": "listen"},
        )

    def close_lost_associations(self) -> int:
        """Mark this receiver's associations still open in the index as lost: they died with its
        previous run (only this receiver's: others sharing the database are alive)."""
        with self.sessions.begin() as session:
            lost = index.close_lost_associations(session, self.receiver_id, datetime.now(UTC))
        if lost:
            logger.warning(
                "Closed %d associations that receiver %s's previous run left open, as lost",
                lost,
                self.receiver_id,
                extra={"action": "association_lost"},
            )
        return lost

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, and give open associations a moment to finish."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        if self.store.written:
            logger.info(
                "Receiver %s indexed %d instances in %d transactions",
                self.receiver_id,
                self.store.written,
                self.store.transactions,
                extra={"action": "store_stats"},
            )

    # -- called by AssociationHandler --------------------------------------------------

    def connection_accepted(self, host: str) -> bool:
        """Take a slot for a new connection, or log (rate-limited) why it is closed at once."""
        refused = self.slots.connect(host)
        if refused is None:
            return True
        key, now = host_key(host), time.monotonic()
        with self._lock:
            last, since = self._refusals.get(key, (-REFUSAL_LOG_INTERVAL_S, 0))
            if now - last < REFUSAL_LOG_INTERVAL_S:
                self._refusals[key] = (last, since + 1)
                return False
            if len(self._refusals) > 1024:  # many hosts: forget the old ones
                self._refusals.clear()
            self._refusals[key] = (now, 0)
        logger.warning(
            "Closed connection from %s at once: %s%s",
            host,
            refused,
            f" ({since} more closed since the last such line)" if since else "",
            extra={"action": "connection_refused"},
        )
        return False

    def admit(self, handler: AssociationHandler, peer: Peer) -> Rejection | None:
        """Count an association in, unless a limit of ``[node]`` is reached: in all, for its
        host, for its calling AE title."""
        rejection = self.slots.admit(handler.host, peer.calling_aet)
        handler.admitted = rejection is None
        return rejection

    def connection_closed(self, handler: AssociationHandler, outcome: str) -> None:
        """Give back the connection's slot; an association it held is closed in the index."""
        held = handler.peer if handler.admitted else None  # admitted: peer is set
        self.slots.release(handler.host, held.calling_aet if held is not None else None)
        if held is not None:
            try:
                self.association_closed(handler, outcome)
            except Exception:
                logger.exception(
                    "Could not close association %s",
                    handler.pk,
                    extra={"action": "association_close"},
                )

    def association_opened(self, handler: AssociationHandler) -> None:
        assert handler.peer is not None
        handler.pk = self.open_transfer(handler.peer)
        logger.info(
            "Association %s from %s as %r",
            handler.pk,
            handler.host,
            handler.peer.calling_aet,
            extra={"action": "association_open"},
        )

    def association_closed(self, handler: AssociationHandler, outcome: str) -> None:
        if handler.peer is not None:
            self.close_transfer(
                handler.pk,
                outcome,
                stored=handler.stored,
                refused=handler.refused,
                actor=audit.aet_actor(handler.peer.calling_aet, handler.host),
            )
        logger.info(
            "Association %s %s: %d stored, %d refused",
            handler.pk,
            outcome,
            handler.stored,
            handler.refused,
            extra={"action": "association_close"},
        )

    # -- one transfer (an association, or a STOW-RS request) in the index ----------------

    def open_transfer(self, peer: Peer) -> int | None:
        """Record a transfer from ``peer`` as open (its instances name it); None when the
        index could not be written (the instances are then stored without it)."""
        try:
            with self.sessions.begin() as session:
                return index.open_association(
                    session, peer, datetime.now(UTC), receiver_id=self.receiver_id
                )
        except Exception:
            logger.exception("Could not record association", extra={"action": "association_open"})
            return None

    def close_transfer(
        self, pk: int | None, outcome: str, *, stored: int, refused: int, actor: str, via: str = ""
    ) -> None:
        """Record a transfer's end (``released``: the sender said it sent everything) with one
        audit event, in one commit; then wake the intake when it stored something."""
        if pk is not None:
            try:
                with self.sessions.begin() as session:
                    closed_at = datetime.now(UTC)
                    index.close_association(
                        session,
                        pk,
                        outcome=outcome,
                        closed_at=closed_at,
                        stored=stored,
                        refused=refused,
                    )
                    if stored or refused:
                        # One audit row per transfer, in the same commit: off the per-instance
                        # path.
                        audit.add_event(
                            session,
                            actor,
                            "received",
                            detail=_received_detail(stored, refused) + via,
                            at=closed_at,
                        )
            except Exception:
                logger.exception(
                    "Could not record association end", extra={"action": "association_close"}
                )
        if self.on_association_closed is not None and stored:
            self.on_association_closed()


def _close(request: socket.socket) -> None:
    with contextlib.suppress(OSError):
        request.close()


def _received_detail(stored: int, refused: int) -> str:
    return f"{stored} instances" + (f", {refused} refused" if refused else "")
