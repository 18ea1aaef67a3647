"""Our C-STORE SCU: sends files as they are on disk, in as few associations as contexts allow."""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.errors import AssociationFailed, ConfigError

if TYPE_CHECKING:
    from pynetdicom.association import Association

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_DESTINATION = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP, written ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _DESTINATION.match(text)
        if not match:
            raise ConfigError(f"destination {text!r} is not of the form AET@HOST:PORT")
        return cls(match["aet"], match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SendResult:
    """The outcome for one file: the peer's status, or why it was not sent."""

    path: Path
    status: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0 or self.status >> 12 == 0xB)


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class: UID
    transfer_syntax: UID


def expand(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named, and files under folders named, in a stable order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def send_files(
    paths: Iterable[Path],
    destination: Destination,
    *,
    calling_aet: str = "DICOMNODE",
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
) -> list[SendResult]:
    """Send each file with C-STORE; return one result per file, in order."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from disk, never the whole file in memory
    results: dict[Path, SendResult] = {}
    items: list[_Item] = []
    order = list(expand(paths))
    for path in order:
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=[0x00080016]).file_meta
            items.append(
                _Item(
                    path, UID(str(meta.MediaStorageSOPClassUID)), UID(str(meta.TransferSyntaxUID))
                )
            )
        except (InvalidDicomError, AttributeError, OSError) as exc:
            results[path] = SendResult(path, None, f"not a DICOM file: {exc}")
    for batch in _batches(items):
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class, syntaxes in _contexts(batch):
            ae.add_requested_context(sop_class, syntaxes)
        tls_args = (ssl_context, destination.host) if ssl_context else None
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
        if not assoc.is_established:
            raise AssociationFailed(f"{destination} refused or did not answer the association")
        try:
            for item in batch:
                results[item.path] = _send_one(assoc, item)
        finally:
            if assoc.is_established:
                assoc.release()
    return [results[path] for path in order]


def _contexts(items: list[_Item]) -> list[tuple[UID, list[UID]]]:
    """One context per (SOP class, file syntax), so each file can travel as stored, plus one
    uncompressed context per class for files whose own syntax the peer refuses."""
    contexts: list[tuple[UID, list[UID]]] = []
    for item in items:
        exact = (item.sop_class, [item.transfer_syntax])
        fallback = (item.sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for context in (exact, fallback):
            if context not in contexts:
                contexts.append(context)
    return contexts


def _batches(items: list[_Item]) -> Iterator[list[_Item]]:
    """Split so each association needs at most MAX_CONTEXTS presentation contexts."""
    batch: list[_Item] = []
    for item in items:
        if len(_contexts([*batch, item])) > MAX_CONTEXTS:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _send_one(assoc: Association, item: _Item) -> SendResult:
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    # pynetdicom picks the context whose syntax matches the data it is given
    dataset: Path | Dataset
    if (item.sop_class, item.transfer_syntax) in accepted:
        dataset = item.path  # sent as stored, chunk by chunk
    elif item.transfer_syntax.is_compressed:
        return SendResult(
            item.path,
            None,
            f"peer accepted no context for {item.sop_class.name} in {item.transfer_syntax.name}",
        )
    else:
        dataset = dcmread(item.path)  # pynetdicom re-encodes to an accepted uncompressed syntax
    try:
        status = assoc.send_c_store(dataset)
    except (ValueError, RuntimeError) as exc:
        return SendResult(item.path, None, str(exc))
    if "Status" not in status:
        return SendResult(item.path, None, "no response (association aborted or timed out)")
    return SendResult(item.path, int(status.Status), str(status.get("ErrorComment", "")))
