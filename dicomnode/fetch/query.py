"""What a source answers (studies, series), the query a request or a backfill asks, and the
protocol every source speaks; no I/O here."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qsl

from dicomnode.config import SERIES_QUERY_KEYS, check_query_keys
from dicomnode.errors import InvalidQuery
from dicomnode.routing import value_matches

if TYPE_CHECKING:
    from pydicom import Dataset

#: study attributes asked of the source at study level (C-FIND return keys, QIDO includefield)
STUDY_KEYS = (
    "StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate", "StudyTime",
    "ModalitiesInStudy", "StudyDescription", "NumberOfStudyRelatedInstances",
)  # fmt: skip
#: series attributes asked at series level
SERIES_KEYS = (
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "ProtocolName", "NumberOfSeriesRelatedInstances",
)  # fmt: skip
_RANGE = re.compile(r"^\d{0,8}-?\d{0,8}$")


@dataclass(frozen=True)
class StudyMatch:
    """One study a source holds, as its study-level query answered."""

    study_instance_uid: str
    accession_number: str = ""
    patient_id: str = ""
    study_date: str = ""
    study_time: str = ""
    modalities: tuple[str, ...] = ()
    description: str = ""
    instances: int | None = None

    @property
    def when(self) -> str:
        """Date and time, sortable: the most recent study sorts last."""
        return f"{self.study_date:0<8}{self.study_time.split('.')[0]:0<6}"


@dataclass(frozen=True)
class SeriesMatch:
    """One series of a study on a source; ``expected`` is how many instances it holds (None
    when the source does not say)."""

    series_instance_uid: str
    modality: str = ""
    number: str = ""
    description: str = ""
    body_part: str = ""
    protocol: str = ""
    expected: int | None = None

    def attribute(self, keyword: str) -> str:
        return {
            "Modality": self.modality, "SeriesNumber": self.number,
            "SeriesDescription": self.description, "BodyPartExamined": self.body_part,
            "ProtocolName": self.protocol,
        }.get(keyword, "")  # fmt: skip


@dataclass(frozen=True)
class RetrieveOutcome:
    """What one retrieve brought: instances stored, refused, and why it stopped (if early)."""

    stored: int = 0
    failed: int = 0
    error: str = ""


class Source(Protocol):
    """A PACS to query and retrieve from: DIMSE (:mod:`.dimse`) or DICOMweb (:mod:`.dicomweb`).

    Each call raises SourceUnavailable when the source cannot be reached or stops answering,
    SourceError when it refuses the query."""

    name: str

    def find_studies(self, filters: Mapping[str, str]) -> list[StudyMatch]: ...

    def find_series(self, study_uid: str) -> list[SeriesMatch]: ...

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]: ...

    def retrieve(
        self, study_uid: str, series_uid: str | None = None, sop_uids: Sequence[str] = ()
    ) -> RetrieveOutcome:
        """The study, one series of it, or some instances of that series; each instance is
        stored by the node (C-MOVE: by its receiver) before this returns."""
        ...


@dataclass(frozen=True)
class StudyQuery:
    """Which studies a backfill takes (or a priors search looks at): attributes the source
    filters on at study level, and series attributes a study must have a series matching."""

    study: Mapping[str, str]
    series: Mapping[str, tuple[str, ...]]

    @classmethod
    def parse(cls, text: str) -> StudyQuery:
        """``Modality=CT&StudyDate=20261101-20261130&BodyPartExamined=CHEST``: DICOM keywords;
        ``Modality`` is asked as ModalitiesInStudy and also picks the series; a series
        attribute with ``,`` means any of the values. InvalidQuery names what is wrong."""
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
        if not pairs:
            raise InvalidQuery(f"query {text!r} names no attribute (e.g. 'Modality=CT')")
        values: dict[str, str] = {}
        for key, value in pairs:
            if key in values:
                raise InvalidQuery(f"query {text!r} names {key} twice")
            values[key] = value
        return cls.of(values)

    @classmethod
    def of(cls, values: Mapping[str, str | Sequence[str]]) -> StudyQuery:
        try:
            check_query_keys(list(values), "query")
        except ValueError as exc:
            raise InvalidQuery(str(exc)) from None
        study: dict[str, str] = {}
        series: dict[str, tuple[str, ...]] = {}
        for key, value in values.items():
            options = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
            options = tuple(o.strip() for o in options if o.strip())
            if key in SERIES_QUERY_KEYS:
                series[key] = options
                if key == "Modality" and len(options) == 1 and not _wild(options[0]):
                    study["ModalitiesInStudy"] = options[0]
            elif key in ("StudyDate", "StudyTime"):
                text = options[0] if options else ""
                if not _RANGE.match(text.replace(":", "")):
                    raise InvalidQuery(f"{key} {text!r} is not a date or range (20261101-20261130)")
                study[key] = text
            else:
                study[key] = options[0] if len(options) == 1 else "\\".join(options)
        return cls(study, series)

    def series_match(self, series: SeriesMatch) -> bool:
        """Whether the series has every series attribute asked (any of its values)."""
        return all(
            any(value_matches(series.attribute(key), wanted) for wanted in options)
            for key, options in self.series.items()
        )


def _wild(text: str) -> bool:
    return any(c in text for c in "*?")


def most_recent(studies: Iterable[StudyMatch], count: int) -> list[StudyMatch]:
    """The ``count`` most recent studies, most recent first."""
    return sorted(studies, key=lambda s: s.when, reverse=True)[:count]


def text_of(ds: Dataset, keyword: str) -> str:
    """An attribute of a query answer as text ("" when absent or empty)."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def values_of(ds: Dataset, keyword: str) -> list[str]:
    """A multi-valued attribute (ModalitiesInStudy) as a list of texts."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def int_of(ds: Dataset, keyword: str) -> int | None:
    """A count (NumberOf...) of a query answer; None when absent or not a number."""
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None
