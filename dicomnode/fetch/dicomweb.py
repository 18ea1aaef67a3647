"""A DICOMweb source with dicomweb-client: QIDO-RS at study, series and instance level, then
WADO-RS (the study, a series, or single instances), each instance stored as it streams in
through :class:`~.ingest.Ingest`, in the transfer syntax the source holds it in."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
    from pydicom import Dataset

    from dicomnode.config import SourceSettings
    from dicomnode.fetch.ingest import Ingest

logger = logging.getLogger(__name__)

#: WADO-RS: every instance in the transfer syntax the source stores it in (no transcoding)
AS_STORED = (("application/dicom", "*"),)
#: instances stored at once as they stream in (the store's group commit takes them together)
STORE_THREADS = 4


class DicomwebSource:
    """One ``[[sources]]`` entry with a ``url``."""

    def __init__(self, settings: SourceSettings, *, ingest: Ingest | None = None) -> None:
        if not settings.url:
            raise ValueError(f"source {settings.name!r} is not a DICOMweb service")
        self.url: str = settings.url
        self.settings = settings
        self.name = settings.name
        self.ingest = ingest
        self._client: Any = None

    def __str__(self) -> str:
        parts = urlsplit(self.settings.url or "")
        return f"source {self.settings.name!r} ({parts.scheme}://{parts.netloc})"

    @property
    def client(self) -> Any:
        if self._client is None:
            import requests
            from dicomweb_client.api import DICOMwebClient

            headers = dict(self.settings.headers)
            if self.settings.token:
                headers["Authorization"] = f"Bearer {self.settings.token}"
            session = requests.Session()
            tls = self.settings.tls
            if tls.enabled:  # as for DIMSE: tls.ca verifies the server (none: not verified)
                session.verify = str(tls.ca) if tls.ca else False
                if tls.cert and tls.key:
                    session.cert = (str(tls.cert), str(tls.key))
            client = DICOMwebClient(
                self.url,
                session=session,
                headers=headers,
                timeout=self.settings.timeout_s,
            )
            client.set_http_retry_params(retry=False)  # the runner retries, with its backoff
            self._client = client
        return self._client

    # -- QIDO-RS -----------------------------------------------------------------------------

    def find_studies(self, filters: Mapping[str, str]) -> list[StudyMatch]:
        found = self._qido(
            "search_for_studies", search_filters=dict(filters), fields=list(STUDY_KEYS)
        )
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
            for ds in found
            if text_of(ds, "StudyInstanceUID")
        ]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        found = self._qido(
            "search_for_series", study_instance_uid=study_uid, fields=list(SERIES_KEYS)
        )
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
            for ds in found
            if text_of(ds, "SeriesInstanceUID")
        ]

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        found = self._qido(
            "search_for_instances",
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            fields=["SOPInstanceUID"],
        )
        return [text_of(ds, "SOPInstanceUID") for ds in found]

    def _qido(self, method: str, **arguments: Any) -> list[Dataset]:
        from pydicom import Dataset

        answers = self._call(
            lambda: getattr(self.client, method)(**arguments), "QIDO-RS", missing=[]
        )
        return [Dataset.from_json(item) for item in answers or ()]

    # -- WADO-RS ------------------------------------------------------------------------------

    def retrieve(
        self, study_uid: str, series_uid: str | None = None, sop_uids: Sequence[str] = ()
    ) -> RetrieveOutcome:
        if self.ingest is None:
            raise SourceError(f"{self}: WADO-RS needs the node's store to put instances in")
        ingest = self.ingest
        stored = failed = 0
        error = ""
        # instances are stored while the next ones stream in, STORE_THREADS at a time, so the
        # store commits them in groups (one index commit and one folder fsync per group)
        slots = threading.BoundedSemaphore(STORE_THREADS * 2)

        def store(ds: Dataset) -> bool:
            try:
                ingest.dataset(ds)
                return True
            except StoreRefused:
                return False
            finally:
                slots.release()

        with ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="wado-store") as pool:
            pending: list[Future[bool]] = []
            try:
                for ds in self._instances(study_uid, series_uid, sop_uids):
                    slots.acquire()
                    pending.append(pool.submit(store, ds))
            except SourceError as exc:
                error = exc.message
            for future in pending:
                if future.result():
                    stored += 1
                else:
                    failed += 1
        if failed and not error:
            error = f"{failed} instances were refused by the node"
        return RetrieveOutcome(stored, failed, error)

    def _instances(
        self, study_uid: str, series_uid: str | None, sop_uids: Sequence[str]
    ) -> Iterator[Dataset]:
        client = self.client
        if sop_uids and series_uid:
            for uid in sop_uids:
                one = self._call(
                    lambda uid=uid: client.retrieve_instance(
                        study_uid, series_uid, uid, media_types=AS_STORED
                    ),
                    "WADO-RS",
                )
                if one is not None:  # gone from the source meanwhile: still missing
                    yield one
            return
        if series_uid:
            stream = self._call(
                lambda: client.iter_series(study_uid, series_uid, media_types=AS_STORED),
                "WADO-RS",
                missing=iter(()),
            )
        else:
            stream = self._call(
                lambda: client.iter_study(study_uid, media_types=AS_STORED),
                "WADO-RS",
                missing=iter(()),
            )
        while True:
            item = self._call(lambda: next(stream, None), "WADO-RS")
            if item is None:
                return
            yield item

    def _call(self, call: Any, what: str, *, missing: Any = None) -> Any:
        """``call()``; ``missing`` when the source has no such thing (HTTP 404); its other
        failures as SourceUnavailable (unreachable, 5xx, cut off) or SourceError (4xx)."""
        import requests

        try:
            return call()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 404:
                return missing
            error = SourceUnavailable if status >= 500 or status in (408, 429) else SourceError
            raise error(f"{self} answered {what} with HTTP {status}") from exc
        except (requests.RequestException, OSError, ValueError) as exc:
            raise SourceUnavailable(f"{self} failed during {what}: {type(exc).__name__}") from exc
