"""Instances a source hands us (C-GET sub-operations, WADO-RS parts) into the spool and the
index through the receiver's own store, so they are validated, filed and indexed exactly as a
C-STORE is, with a peer that names the source."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.domain import Peer, StoredInstance
from dicomnode.errors import StoreRefused

if TYPE_CHECKING:
    from pydicom import Dataset

    from dicomnode.receive.store import InstanceStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ingest:
    """Stores what one source sends, as coming from ``peer``."""

    store: InstanceStore
    peer: Peer

    def encoded(self, data: bytes, *, sop_class: str, sop_instance: str, syntax: str) -> None:
        """One instance as a DICOM file (preamble, file meta, dataset); StoreRefused when the
        store refuses it (it is then not stored, and the retrieve counts it failed)."""
        path = self._write(data)
        try:
            self._store(path, sop_class, sop_instance, syntax)
        finally:
            path.unlink(missing_ok=True)  # refused, or a duplicate: nothing left behind

    def dataset(self, dataset: Dataset) -> None:
        """One instance as pydicom read it (its file meta names the transfer syntax)."""
        from io import BytesIO

        from pydicom import dcmwrite

        meta = dataset.file_meta
        buffer = BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        self.encoded(
            buffer.getvalue(),
            sop_class=str(meta.MediaStorageSOPClassUID),
            sop_instance=str(meta.MediaStorageSOPInstanceUID),
            syntax=str(meta.TransferSyntaxUID),
        )

    def _write(self, data: bytes) -> Path:
        self.store.check_disk()
        path = self.store.spool.new_incoming()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return path

    def _store(self, path: Path, sop_class: str, sop_instance: str, syntax: str) -> StoredInstance:
        try:
            return self.store.store(
                path,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                transfer_syntax=syntax,
                peer=self.peer,
                association_pk=None,
            )
        except StoreRefused as exc:
            logger.warning(
                "Refused an instance retrieved from %s (status 0x%04X): %s",
                self.peer.calling_aet,
                exc.dicom_status,
                exc.message,
                extra={"action": "retrieve_refused"},
            )
            raise
