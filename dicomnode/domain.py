"""Plain values shared by every layer; no I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum


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
    """Where a job is (DESIGN.md): waiting -> queued -> running -> sending -> done, or an end."""

    WAITING = "waiting"  # its series or study is not complete yet
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # no route matched, or a count-based condition failed at completion


#: States a job never leaves.
FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED})


class Priority(IntEnum):
    """Higher runs first: a stat study overtakes every routine one in the queue."""

    ROUTINE = 0
    URGENT = 1
    STAT = 2
