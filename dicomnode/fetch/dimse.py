"""A DIMSE source with pynetdicom: C-FIND at study, series and image level, then C-MOVE (the
source sends to our AE: the node's receiver stores what arrives) or C-GET (the instances come
back on our own association and are stored here through :class:`~.ingest.Ingest`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydicom import Dataset

from dicomnode.errors import SourceError, SourceUnavailable, StoreRefused
from dicomnode.fetch.query import (
    SERIES_KEYS,
    STUDY_KEYS,
    RetrieveOutcome,
    SeriesMatch,
    StudyMatch,
    int_of,
    text_of,
    values_of,
)

if TYPE_CHECKING:
    import ssl

    from pynetdicom.association import Association

    from dicomnode.config import SourceSettings
    from dicomnode.fetch.ingest import Ingest

logger = logging.getLogger(__name__)

FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # - MOVE
GET = "1.2.840.10008.5.1.4.1.2.2.3"  # - GET
PENDING = (0xFF00, 0xFF01)


class DimseSource:
    """One ``[[sources]]`` entry with ``ae_title``, ``host`` and ``port``."""

    def __init__(
        self,
        settings: SourceSettings,
        *,
        calling_aet: str,
        move_destination: str,
        ingest: Ingest | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not (settings.ae_title and settings.host and settings.port):
            raise ValueError(f"source {settings.name!r} is not a DIMSE peer")
        self.settings = settings
        self.peer: tuple[str, str, int] = (settings.ae_title, settings.host, settings.port)
        self.name = settings.name
        self.calling_aet = settings.calling_aet or calling_aet
        self.move_destination = settings.move_destination or move_destination
        self.ingest = ingest
        self.ssl_context = ssl_context

    def __str__(self) -> str:
        s = self.settings
        return f"source {s.name!r} ({s.ae_title}@{s.host}:{s.port})"

    # -- C-FIND ------------------------------------------------------------------------------

    def find_studies(self, filters: Mapping[str, str]) -> list[StudyMatch]:
        identifier = _identifier("STUDY", STUDY_KEYS, filters)
        return [
            StudyMatch(
                study_instance_uid=text_of(ds, "StudyInstanceUID"),
                accession_number=text_of(ds, "AccessionNumber"),
                patient_id=text_of(ds, "PatientID"),
                study_date=text_of(ds, "StudyDate"),
                study_time=text_of(ds, "StudyTime"),
                modalities=tuple(values_of(ds, "ModalitiesInStudy")),
                description=text_of(ds, "StudyDescription"),
                instances=int_of(ds, "NumberOfStudyRelatedInstances"),
            )
            for ds in self._find(identifier)
            if text_of(ds, "StudyInstanceUID")
        ]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        identifier = _identifier("SERIES", SERIES_KEYS, {"StudyInstanceUID": study_uid})
        return [
            SeriesMatch(
                series_instance_uid=text_of(ds, "SeriesInstanceUID"),
                modality=text_of(ds, "Modality"),
                number=text_of(ds, "SeriesNumber"),
                description=text_of(ds, "SeriesDescription"),
                body_part=text_of(ds, "BodyPartExamined"),
                protocol=text_of(ds, "ProtocolName"),
                expected=int_of(ds, "NumberOfSeriesRelatedInstances"),
            )
            for ds in self._find(identifier)
            if text_of(ds, "SeriesInstanceUID")
        ]

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        identifier = _identifier(
            "IMAGE",
            ("SOPInstanceUID",),
            {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
        )
        return [text_of(ds, "SOPInstanceUID") for ds in self._find(identifier)]

    def _find(self, identifier: Dataset) -> list[Dataset]:
        found: list[Dataset] = []
        with self._association([(FIND, None)]) as assoc:
            for status, ds in assoc.send_c_find(identifier, FIND):
                code = _status(status, "C-FIND", self)
                if code in PENDING:
                    if ds is not None:
                        found.append(ds)
                elif code != 0:
                    raise SourceError(
                        f"{self} refused C-FIND: status 0x{code:04X} "
                        f"{status.get('ErrorComment', '')}".rstrip()
                    )
        return found

    # -- C-MOVE / C-GET -----------------------------------------------------------------------

    def retrieve(
        self, study_uid: str, series_uid: str | None = None, sop_uids: Sequence[str] = ()
    ) -> RetrieveOutcome:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE" if sop_uids else "SERIES" if series_uid else "STUDY"
        identifier.StudyInstanceUID = study_uid
        if series_uid:
            identifier.SeriesInstanceUID = series_uid
        if sop_uids:
            identifier.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
        if self.settings.retrieve == "get":
            return self._get(identifier)
        return self._move(identifier)

    def _move(self, identifier: Dataset) -> RetrieveOutcome:
        with self._association([(MOVE, None)]) as assoc:
            final: Dataset | None = None
            for status, _ in assoc.send_c_move(identifier, self.move_destination, MOVE):
                code = _status(status, "C-MOVE", self, allow_none=True)
                if code is None:  # aborted or timed out mid-move: what arrived stays
                    return RetrieveOutcome(
                        error=f"{self} stopped answering during C-MOVE (association aborted "
                        "or timed out)"
                    )
                if code not in PENDING:
                    final = status
        return _outcome(final, "C-MOVE", self)

    def _get(self, identifier: Dataset) -> RetrieveOutcome:
        from pynetdicom import StoragePresentationContexts, build_role, evt

        if self.ingest is None:
            raise SourceError(f"{self}: C-GET needs the node's store to put instances in")
        ingest = self.ingest
        stored = failed = 0

        def on_store(event: Any) -> int:
            nonlocal stored, failed
            try:
                ingest.encoded(
                    bytes(event.encoded_dataset(include_meta=True)),
                    sop_class=str(event.request.AffectedSOPClassUID),
                    sop_instance=str(event.request.AffectedSOPInstanceUID),
                    syntax=str(event.context.transfer_syntax),
                )
            except StoreRefused as exc:
                failed += 1
                return exc.dicom_status
            except Exception:
                failed += 1
                logger.exception(
                    "could not store an instance from %s", self, extra={"action": "retrieve_error"}
                )
                return 0xA701
            stored += 1
            return 0x0000

        classes = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
        contexts = [(GET, None), *((uid, None) for uid in classes)]
        roles = [build_role(uid, scp_role=True) for uid in classes]
        with self._association(
            contexts, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)]
        ) as assoc:
            final: Dataset | None = None
            for status, _ in assoc.send_c_get(identifier, GET):
                code = _status(status, "C-GET", self, allow_none=True)
                if code is None:
                    return RetrieveOutcome(
                        stored, failed, f"{self} stopped answering during C-GET (association "
                        "aborted or timed out)",
                    )  # fmt: skip
                if code not in PENDING:
                    final = status
        outcome = _outcome(final, "C-GET", self)
        return RetrieveOutcome(stored, failed, outcome.error)

    # -- the association ---------------------------------------------------------------------

    @contextmanager
    def _association(
        self,
        contexts: Sequence[tuple[str, Sequence[str] | None]],
        *,
        ext_neg: Sequence[Any] = (),
        handlers: Sequence[Any] = (),
    ) -> Iterator[Association]:
        from pynetdicom import AE

        settings = self.settings
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
        ae.maximum_pdu_size = 0  # the source's PDUs are taken whole
        for uid, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(uid)
            else:
                ae.add_requested_context(uid, list(syntaxes))
        ae_title, host, port = self.peer
        tls_args = (self.ssl_context, host) if self.ssl_context else None
        try:
            assoc = ae.associate(
                host, port, ae_title=ae_title, tls_args=tls_args,
                ext_neg=list(ext_neg) or None, evt_handlers=list(handlers) or None,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            raise SourceUnavailable(f"{self} could not be reached: {exc}") from exc
        if not assoc.is_established:
            raise SourceUnavailable(f"{self} refused or did not answer the association")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()


def _identifier(level: str, keys: Sequence[str], filters: Mapping[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in (*keys, *filters):
        setattr(ds, keyword, filters.get(keyword, ""))
    return ds


def _status(status: Dataset, what: str, source: DimseSource, *, allow_none: bool = False) -> Any:
    if "Status" not in status:
        if allow_none:
            return None
        raise SourceUnavailable(f"{source} stopped answering during {what}")
    return int(status.Status)


def _outcome(final: Dataset | None, what: str, source: DimseSource) -> RetrieveOutcome:
    """The final response's counts; an error when sub-operations failed or it refused."""
    if final is None:
        return RetrieveOutcome(error=f"{source} sent no final {what} response")
    code = int(final.Status)
    completed = int_of(final, "NumberOfCompletedSuboperations") or 0
    failed = int_of(final, "NumberOfFailedSuboperations") or 0
    if code == 0:
        return RetrieveOutcome(completed, failed)
    comment = str(final.get("ErrorComment", "")).strip()
    return RetrieveOutcome(
        completed,
        failed,
        f"{source} ended {what} with status 0x{code:04X}"
        + (f" ({comment})" if comment else "")
        + (f": {failed} sub-operations failed" if failed else ""),
    )
