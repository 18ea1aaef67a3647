"""DICOM TLS (PS3.15 B.1): server context with optional peer verification."""

from __future__ import annotations

import ssl

from dicomnode.config import ClientTLSSettings, TLSSettings
from dicomnode.errors import ConfigError


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build the listener's TLS context; a sender without a certificate our CA signed is refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca is not None:
            context.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TLS files could not be loaded (cert {tls.cert}, key {tls.key}, ca {tls.ca}): {exc}"
        ) from exc
    context.verify_mode = ssl.CERT_REQUIRED if tls.verify_peer else ssl.CERT_NONE
    return context


def client_context(
    *, ca: str | None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A sender's TLS context (for ``dicomnode send --tls``)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.check_hostname = False  # DICOM peers are named by AE title, not host name
    if ca is None:
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context


def peer_context(tls: ClientTLSSettings) -> ssl.SSLContext | None:
    """The TLS context towards a destination or a source (``tls`` of its settings); None when
    its TLS is not enabled."""
    if not tls.enabled:
        return None
    return client_context(
        ca=str(tls.ca) if tls.ca else None,
        cert=str(tls.cert) if tls.cert else None,
        key=str(tls.key) if tls.key else None,
    )
