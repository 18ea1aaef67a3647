"""The DICOM listener: accepts connections and serves each association in its own thread."""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
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
from dicomnode.receive.association import AssociationHandler
from dicomnode.receive.contexts import TRANSFER_SYNTAXES
from dicomnode.receive.policy import AccessPolicy
from dicomnode.receive.store import InstanceStore
from dicomnode.receive.tls import server_context

logger = logging.getLogger(__name__)


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

    def finish_request(self, request: Any, client_address: Any) -> None:
        AssociationHandler(self.receiver, request, client_address).run()

    def shutdown_request(self, request: Any) -> None:
        pass  # the handler closes its socket (it may have replaced it with a TLS one)


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
        self._active: set[AssociationHandler] = set()
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

    def admit(self, handler: AssociationHandler) -> bool:
        """Count an association in, unless the configured maximum is reached."""
        with self._lock:
            if len(self._active) >= self.settings.node.max_associations:
                return False
            self._active.add(handler)
            return True

    def association_opened(self, handler: AssociationHandler) -> None:
        assert handler.peer is not None
        try:
            with self.sessions.begin() as session:
                handler.pk = index.open_association(
                    session, handler.peer, datetime.now(UTC), receiver_id=self.receiver_id
                )
        except Exception:
            logger.exception("Could not record association", extra={"action": "association_open"})
        logger.info(
            "Association %s from %s as %r",
            handler.pk,
            handler.host,
            handler.peer.calling_aet,
            extra={"action": "association_open"},
        )

    def association_closed(self, handler: AssociationHandler, outcome: str) -> None:
        with self._lock:
            self._active.discard(handler)
        if handler.pk is not None:
            try:
                with self.sessions.begin() as session:
                    closed_at = datetime.now(UTC)
                    index.close_association(
                        session,
                        handler.pk,
                        outcome=outcome,
                        closed_at=closed_at,
                        stored=handler.stored,
                        refused=handler.refused,
                    )
                    if (handler.stored or handler.refused) and handler.peer is not None:
                        # One audit row per association, in the same commit: off the
                        # per-instance path.
                        audit.add_event(
                            session,
                            audit.aet_actor(handler.peer.calling_aet, handler.host),
                            "received",
                            detail=_received_detail(handler.stored, handler.refused),
                            at=closed_at,
                        )
            except Exception:
                logger.exception(
                    "Could not record association end", extra={"action": "association_close"}
                )
        if self.on_association_closed is not None and handler.stored:
            self.on_association_closed()
        logger.info(
            "Association %s %s: %d stored, %d refused",
            handler.pk,
            outcome,
            handler.stored,
            handler.refused,
            extra={"action": "association_close"},
        )


def _received_detail(stored: int, refused: int) -> str:
    return f"{stored} instances" + (f", {refused} refused" if refused else "")
