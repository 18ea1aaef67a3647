"""Plain values shared by every layer; no I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Any


@dataclass(frozen=True)
class Peer:
    """The remote end of an association, as the receiver saw it."""

    calling_aet: str
    called_aet: str
    host: str
    port: int


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that the index keeps; read before it is stored."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    study_description: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    frame_of_reference_uid: str = ""
    instance_number: int | None = None
    number_of_frames: int | None = None
    rows: int | None = None
    columns: int | None = None


@dataclass(frozen=True)
class StoredInstance:
    """An instance that is on disk and in the index."""

    header: InstanceHeader
    path: str  # relative to the storage directory
    size_bytes: int
    received_at: datetime
    duplicate: bool = False  # True when an earlier copy was kept (keep_first)


@dataclass(frozen=True)
class StudySummary:
    """One row of ``dicomnode studies list``."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    accession_number: str
    study_description: str
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    size_bytes: int
    first_received_at: datetime
    last_received_at: datetime


class JobState(StrEnum):
    """Where a job is (DESIGN.md): waiting -> queued -> running (-> confirming) (-> review) ->
    sending -> done, or an end."""

    WAITING = "waiting"  # its series or study is not complete yet
    QUEUED = "queued"
    RUNNING = "running"
    #: results made from inputs still inside their confirmation window: held, not sent, until
    #: intake confirms nothing new arrived (then ``sending`` or ``done``), or superseded
    CONFIRMING = "confirming"
    #: results of a route with ``review = true``, held (nothing sent, no one notified) until a
    #: reviewer approves them (then ``sending`` or ``done``) or rejects them (``rejected``)
    REVIEW = "review"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # no route matched, a count-based condition failed at completion, or the route refused the
    # input (outside its model's envelope: the job ran up to that check)
    SKIPPED = "skipped"
    REJECTED = "rejected"  # a reviewer refused its results: kept, never sent


#: States a job never leaves.
FINAL_STATES = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED, JobState.REJECTED}
)


class RequestState(StrEnum):
    """Where a request for a study on a source is: pending -> retrieving (-> partial, retried
    for what is missing) -> retrieved -> queued (its jobs made) -> done, or failed."""

    PENDING = "pending"
    RETRIEVING = "retrieving"
    #: part of the study arrived and the source stopped answering: tried again for the rest
    PARTIAL = "partial"
    RETRIEVED = "retrieved"
    QUEUED = "queued"
    DONE = "done"
    FAILED = "failed"


class Priority(IntEnum):
    """Higher runs first: a stat study overtakes every routine one in the queue."""

    ROUTINE = 0
    URGENT = 1
    STAT = 2


@dataclass(frozen=True)
class Code:
    """A coded concept, as in a DICOM code sequence item: e.g. ``Code("27925004", "SCT",
    "Nodule")`` (SNOMED CT, scheme designator ``SCT``)."""

    value: str
    scheme: str
    meaning: str

    def __str__(self) -> str:
        return f'({self.value}, {self.scheme}, "{self.meaning}")'


@dataclass(frozen=True)
class MaskRef:
    """Where a finding's voxels are: the label ``value`` in the mask ``name`` of its
    :class:`Findings` (a label map on the grid of the input volume the findings refer to)."""

    name: str
    value: int = 1


#: the attribute that marks a finding indeterminate (``attributes["indeterminate"] = True``)
INDETERMINATE = "indeterminate"


@dataclass(frozen=True)
class Finding:
    """One thing a model found: what and where, how big, and how sure.

    Positions are patient coordinates (DICOM LPS, millimetres). Sizes a model does not measure
    stay None. ``attributes`` holds further JSON-ready values (e.g. ``{"texture": "solid"}``).
    """

    label: str  # the model's label name (model.toml [[labels]] name)
    finding_type: Code  # e.g. SNOMED CT 27925004 "Nodule"
    probability: float
    finding_site: Code | None = None  # e.g. SNOMED CT 39607008 "Lung structure"
    centre_mm: tuple[float, float, float] | None = None
    diameter_mm: float | None = None
    volume_mm3: float | None = None
    mask: MaskRef | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    #: "anatomy" or "lesion": the SEG segment's category; None: from ``finding_type``
    category: str | None = None

    @property
    def indeterminate(self) -> bool:
        """The model could not decide (its probability in the model's indeterminate band, or
        too little evidence for absent): reported as indeterminate, never as absent."""
        return bool((self.attributes or {}).get(INDETERMINATE))


@dataclass(frozen=True)
class Findings:
    """What one model run found, and which model (and weights) found it.

    ``masks`` maps a name to a label map (a numpy integer array ``[slice, row, column]``) on the
    grid of the input volume ``reference`` (None: the only input). ``summary`` holds JSON-ready
    values about the whole input (e.g. a classification's scores).
    """

    model: str
    version: str
    demo: bool  # True when the weights are demo weights (trained on phantoms)
    findings: tuple[Finding, ...] = ()
    masks: Mapping[str, Any] = field(default_factory=dict)
    reference: str | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResultObject:
    """One DICOM object a job wrote: an entry of its result's ``objects``, which the send
    queue delivers."""

    kind: str  # SEG, SR, SC or KO
    path: str  # relative to the storage directory
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str = ""
    study_instance_uid: str = ""

    def as_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "path": self.path,
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid,
        }

    @classmethod
    def listed_in(cls, result: Mapping[str, Any] | None) -> list[ResultObject]:
        """The objects a job's JSON result lists; ValueError naming the entry that is bad."""
        objects = []
        for index, entry in enumerate((result or {}).get("objects") or ()):
            try:
                objects.append(
                    cls(
                        str(entry["kind"]),
                        str(entry["path"]),
                        str(entry["sop_class_uid"]),
                        str(entry["sop_instance_uid"]),
                        str(entry.get("series_instance_uid", "")),
                        str(entry.get("study_instance_uid", "")),
                    )
                )
            except (KeyError, TypeError, AttributeError) as exc:
                raise ValueError(
                    f"result object {index} ({entry!r}) lacks kind, path, sop_class_uid or "
                    f"sop_instance_uid: {exc}"
                ) from exc
        return objects
