"""The configured sources as :class:`~.query.Source` objects, with the node's store."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dicomnode.domain import Peer
from dicomnode.fetch.ingest import Ingest

if TYPE_CHECKING:
    from dicomnode.config import Settings, SourceSettings
    from dicomnode.fetch.query import Source
    from dicomnode.receive.store import InstanceStore

#: the called AE title recorded for instances that came over DICOMweb
DICOMWEB_CALLED = "DICOMWEB"


def source_peer(source: SourceSettings, our_aet: str) -> Peer:
    """The peer that instances retrieved from ``source`` are indexed with: its AE title, host
    and port (DICOMweb: its name, as far as 16 characters go, and the URL's host and port)."""
    if source.url is None:
        assert source.ae_title and source.host and source.port
        return Peer(source.ae_title, source.calling_aet or our_aet, source.host, source.port)
    parts = urlsplit(source.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Peer(source.name[:16], DICOMWEB_CALLED, (parts.hostname or "")[:64], port)


def open_source(settings: Settings, name: str, store: InstanceStore | None) -> Source:
    """The source ``name`` (ConfigError naming the known ones if there is none), storing what
    it retrieves through ``store`` (C-GET, WADO-RS; None: query only)."""
    source = settings.source(name)
    our_aet = settings.node.ae_title
    ingest = Ingest(store, source_peer(source, our_aet)) if store is not None else None
    if source.url is not None:
        from dicomnode.fetch.dicomweb import DicomwebSource

        return DicomwebSource(source, ingest=ingest)
    from dicomnode.fetch.dimse import DimseSource
    from dicomnode.receive.tls import peer_context

    return DimseSource(
        source,
        calling_aet=our_aet,
        move_destination=our_aet,
        ingest=ingest,
        ssl_context=peer_context(source.tls),
    )
