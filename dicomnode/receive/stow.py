"""STOW-RS in: the instances of one HTTP request, stored through the receiver's own path.

A request is one transfer, as an association is: it holds one of the receiver's association
slots while it runs, its parts are written to the receiver's ``incoming/`` folder as they
arrive, and only once the whole body has come (its closing boundary seen, every part a DICOM
file) is any of them stored, each by :meth:`InstanceStore.store` (the same disk floor,
inflation, validation, duplicate policy, spool and index as C-STORE). The request is then
recorded as a released association from its client, so the intake completes the series it
delivered as it completes those of a released association, at once, with no quiet time. A body
that breaks off, or that is malformed, stores nothing: nothing half received is analysed.

The HTTP side (multipart parsing, the response) is :mod:`dicomnode.api.dicomweb`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from dicomnode.domain import Peer, StoredInstance
from dicomnode.durable import fsync_file
from dicomnode.errors import (
    BodyInvalid,
    ServiceBusy,
    SOPClassNotSupported,
    StoreFailed,
    StoreRefused,
    TransferSyntaxNotSupported,
)
from dicomnode.receive.contexts import TRANSFER_SYNTAXES
from dicomnode.receive.inflate import meta_end
from dicomnode.receive.server import Receiver
from dicomnode.receive.validate import is_valid_uid

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
#: the called AE title recorded for a STOW-RS request (the associations table's column)
STOW_CALLED_AET = "STOW-RS"
#: the longest a calling AE title may be: a token's name is cut to it
AE_TITLE_LENGTH = 16
#: instances of one request stored at once: their fsyncs overlap, their rows share commits
STORE_THREADS = 4
#: parts flushed to disk at once while the rest of the request arrives
SYNC_THREADS = 2
#: a part's File Meta Information may be at most this long (a handful of UIDs in practice)
MAX_META_BYTES = 64 << 10
#: PS3.18 Table I.2-2: a failure the node did not foresee
PROCESSING_FAILURE = 0x0110


def stow_peer(token_name: str, host: str, port: int) -> Peer:
    """The peer a STOW-RS request is recorded under: its token's name as the calling AE title
    (routes and ``whole_series_senders`` match it), the client's address as the host."""
    return Peer(token_name[:AE_TITLE_LENGTH], STOW_CALLED_AET, host, port)


@dataclass(frozen=True)
class Part:
    """One DICOM file of a request, as its File Meta Information names it."""

    number: int  # 1-based, in the body's order
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part: stored (status 0) or refused with a DICOM status and why."""

    part: Part
    status: int
    reason: str = ""
    stored: StoredInstance | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass
class Upload:
    """The parts of one request being written into the receiver's ``incoming/`` folder.

    Each part, once written, is flushed to disk in the background while the next ones arrive
    (its ``fsync`` in :meth:`InstanceStore.store` then finds little or nothing to write), so
    storing a request's instances costs about what indexing them does."""

    ingest: StowIngest
    peer: Peer
    paths: list[Path] = field(default_factory=list)
    size: int = 0
    _file: BinaryIO | None = None
    _syncs: ThreadPoolExecutor | None = None
    _synced: list[Future[None]] = field(default_factory=list)

    def write(
        self, data: bytes | bytearray | memoryview, *, begin: bool = False, end: bool = False
    ) -> None:
        """Append ``data`` to the current part (``begin``: a new one, refused below the disk
        floor before it is written; ``end``: then close it)."""
        if begin:
            self._begin_part()
        if self._file is None:
            raise BodyInvalid("part data outside a part")  # the parser never does this
        try:
            self._file.write(data)
        except OSError as exc:
            raise StoreFailed(f"could not write a received part: {exc.strerror}") from exc
        self.size += len(data)
        if end:
            self._end_part()

    def parts(self) -> list[Part]:
        """Every part as a DICOM file; BodyInvalid naming the first part that is none."""
        self._end_part()
        self._wait_syncs()
        return [identify(number, path) for number, path in enumerate(self.paths, 1)]

    def discard(self) -> None:
        """Remove what is left in ``incoming/`` (stored parts have moved to the spool)."""
        self._end_part()
        self._wait_syncs()
        for path in self.paths:
            path.unlink(missing_ok=True)

    def _begin_part(self) -> None:
        self._end_part()
        store = self.ingest.receiver.store
        store.check_disk()
        path = store.spool.new_incoming()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.paths.append(path)
        self._file = os.fdopen(fd, "wb")

    def _end_part(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._syncs is None:
            self._syncs = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="stow-sync")
        self._synced.append(self._syncs.submit(_write_back, self.paths[-1]))

    def _wait_syncs(self) -> None:
        if self._syncs is not None:
            self._syncs.shutdown(wait=True)
            self._syncs = None
        self._synced.clear()


def _write_back(path: Path) -> None:
    """Flush a received part to disk early; a failure is left to the store's own fsync."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def identify(number: int, path: Path) -> Part:
    """A part's SOP Class and Instance UIDs and transfer syntax from its File Meta Information
    (PS3.10, which PS3.18 asks of application/dicom); BodyInvalid when it has none."""
    try:
        with path.open("rb") as fp:
            if fp.read(132)[128:] != b"DICM":
                raise BodyInvalid(
                    f"part {number} is not a DICOM file (PS3.10): no 'DICM' after the preamble"
                )
            end = meta_end(fp)
        if end > MAX_META_BYTES:
            raise BodyInvalid(
                f"part {number}'s File Meta Information is {end} bytes long, more than "
                f"{MAX_META_BYTES}"
            )
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, struct.error) as exc:
        raise BodyInvalid(f"part {number} is not a DICOM file (PS3.10): {exc}") from exc
    values = {
        key: str(meta.get(key, "")).strip()
        for key in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    }
    missing = [key for key, value in values.items() if not is_valid_uid(value, lenient=True)]
    if missing:
        raise BodyInvalid(
            f"part {number} is not a DICOM file (PS3.10): its File Meta Information has no "
            f"valid {', '.join(missing)}"
        )
    return Part(
        number,
        path,
        values["MediaStorageSOPClassUID"],
        values["MediaStorageSOPInstanceUID"],
        values["TransferSyntaxUID"],
    )


class StowIngest:
    """Stores STOW-RS requests through ``receiver`` (its store, slots and index rows)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        #: what C-STORE negotiates: every storage SOP class, every transfer syntax it stores
        self.sop_classes = frozenset(
            str(cx.abstract_syntax)
            for cx in receiver.supported_contexts
            if cx.abstract_syntax != VERIFICATION
        )
        self.transfer_syntaxes = frozenset(str(ts) for ts in TRANSFER_SYNTAXES)

    def check_negotiable(self, part: Part) -> None:
        """Refuse a part that C-STORE could not have negotiated: not a storage SOP class, or a
        transfer syntax the receiver does not store."""
        if part.sop_class_uid not in self.sop_classes:
            raise SOPClassNotSupported(
                f"SOP Class UID {part.sop_class_uid} is not a storage class the node accepts"
            )
        if part.transfer_syntax not in self.transfer_syntaxes:
            raise TransferSyntaxNotSupported(
                f"transfer syntax {part.transfer_syntax} is not one the node accepts"
            )

    def admit(self, peer: Peer) -> Upload:
        """An upload holding one association slot (of all, of its host, of its calling AE
        title); ServiceBusy when a limit is reached. :meth:`finish` gives it back."""
        slots = self.receiver.slots
        refused = slots.connect(peer.host)
        if refused is not None:
            raise ServiceBusy(f"STOW-RS request refused: {refused}")
        rejection = slots.admit(peer.host, peer.calling_aet)
        if rejection is not None:
            slots.release(peer.host, None)
            raise ServiceBusy(f"STOW-RS request refused: {rejection.reason}")
        return Upload(self, peer)

    def finish(self, upload: Upload) -> None:
        """Give back the upload's slot and remove what it left in ``incoming/``."""
        upload.discard()
        self.receiver.slots.release(upload.peer.host, upload.peer.calling_aet)

    def store(
        self, upload: Upload, parts: Sequence[Part], *, study: str | None, actor: str
    ) -> list[PartOutcome]:
        """Store every part (with ``study``: only instances of that study), as one released
        transfer of ``upload.peer``; one outcome per part, in order."""
        peer = upload.peer
        pk = self.receiver.open_transfer(peer)

        def store_one(part: Part) -> PartOutcome:
            try:
                self.check_negotiable(part)
                stored = self.receiver.store.store(
                    part.path,
                    sop_class_uid=part.sop_class_uid,
                    sop_instance_uid=part.sop_instance_uid,
                    transfer_syntax=part.transfer_syntax,
                    peer=peer,
                    association_pk=pk,
                    expected_study=study,
                )
            except StoreRefused as exc:
                logger.warning(
                    "Refused instance (STOW-RS request %s, part %d, status 0x%04X): %s",
                    pk,
                    part.number,
                    exc.dicom_status,
                    exc.message,
                    extra={"action": "store_refused"},
                )
                return PartOutcome(part, exc.dicom_status, exc.message)
            except Exception as exc:
                logger.exception(
                    "Failed to store instance (STOW-RS request %s, part %d)",
                    pk,
                    part.number,
                    extra={"action": "store_failed"},
                )
                reason = f"internal error: {type(exc).__name__}"
                return PartOutcome(part, PROCESSING_FAILURE, reason)
            return PartOutcome(part, 0, stored=stored)

        if len(parts) > 1:
            with ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="stow-store") as pool:
                outcomes = list(pool.map(store_one, parts))
        else:
            outcomes = [store_one(part) for part in parts]
        stored = sum(outcome.ok for outcome in outcomes)
        refused = len(outcomes) - stored
        self.receiver.close_transfer(
            pk,
            "released",
            stored=stored,
            refused=refused,
            actor=actor,
            via=f" by STOW-RS from {peer.host}",
        )
        logger.info(
            "STOW-RS request %s from %s as %r: %d stored, %d refused",
            pk,
            peer.host,
            peer.calling_aet,
            stored,
            refused,
            extra={"action": "stow_stored"},
        )
        return outcomes


__all__ = ["Part", "PartOutcome", "StowIngest", "Upload", "identify", "stow_peer"]
