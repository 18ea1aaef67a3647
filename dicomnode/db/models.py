"""The index: patients, studies, series, instances, and the associations that brought them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    desc,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from dicomnode.db.types import UTCDateTime

UID = String(64)


class Base(DeclarativeBase):
    pass


class Association(Base):
    """One association a peer opened to the receiver."""

    __tablename__ = "associations"
    __table_args__ = (Index("ix_associations_receiver_open", "receiver_id", "outcome"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    called_aet: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: "released", "aborted", "lost" (its receiver died holding it; closed by the receiver's
    #: next start) or null while open.
    outcome: Mapped[str | None] = mapped_column(String(16))
    stored: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    #: the receiver that holds it ([node] receiver_id): on restart a receiver closes its own
    #: associations that its previous run left open (it died holding them)
    receiver_id: Mapped[str | None] = mapped_column(String(64))


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64))
    patient_name: Mapped[str] = mapped_column(String(324))
    birth_date: Mapped[str] = mapped_column(String(8))
    sex: Mapped[str] = mapped_column(String(16))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8))
    study_time: Mapped[str] = mapped_column(String(16))
    study_id: Mapped[str] = mapped_column(String(16))
    accession_number: Mapped[str] = mapped_column(String(16), index=True)
    study_description: Mapped[str] = mapped_column(String(64))
    referring_physician_name: Mapped[str] = mapped_column(String(324))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(String(64))
    body_part_examined: Mapped[str] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str] = mapped_column(UID)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_series_number", "series_pk", "instance_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    association_pk: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    calling_host: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One model run over one series (or the series of one study), with its stage times."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The claim query: runnable jobs by priority, oldest first.
        Index("ix_jobs_claim", "state", desc("priority"), "run_after", "id"),
        Index("ix_jobs_study", "study_instance_uid"),
        # The admin's listings: jobs received since (with their total), throughput per window.
        Index("ix_jobs_received", "received_at"),
        Index("ix_jobs_finished", "finished_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: one job per route and series/study generation: the guard that makes it run once
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    route: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64), index=True)
    level: Mapped[str] = mapped_column(String(8))  # "series" or "study"
    #: "live", or "shadow": the route's results are kept and never sent (models compare)
    mode: Mapped[str] = mapped_column(String(8), default="live", server_default="live")
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    inputs: Mapped[list[str]] = mapped_column(JSON, default=list)  # series UIDs
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # stage times (issue: latency broken down by stage)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)  # first instance
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: the job's inputs are provisional until then (completed by a release rule that a split
    #: transfer could fool): its results are held, not sent, until intake confirms that nothing
    #: new arrived; None once confirmed, or when the evidence needed no window
    confirm_after: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SeriesIntake(Base):
    """Which generation of a series has been routed, and when it was declared complete.

    A series is routed once per generation; an instance arriving after its generation was
    complete opens the next one (see dicomnode.completion on late instances).
    """

    __tablename__ = "series_intake"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    generation: Mapped[int] = mapped_column(Integer)
    #: the route whose completion settings decide when the series is complete (None: defaults)
    rules_route: Mapped[str | None] = mapped_column(String(64))
    routed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    complete_reason: Mapped[str | None] = mapped_column(String(255))
    #: the newest receive time the completing verdict saw: an instance received after it is late.
    #: Not ``completed_at``: a sweep reads its clock before it reads the series, so instances
    #: stored in between were seen, yet received after that clock.
    covered_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: the end of this generation's confirmation window (None: confirmed, or not needed)
    confirm_after: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Send(Base):
    """One result object owed to one destination: the send queue, one row per (job, destination,
    object). A row stays until the destination confirmed it (``sent``) or gave up (``dead``)."""

    __tablename__ = "sends"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_instance_uid"),
        # The sender's query: due sends of one destination, oldest first.
        Index("ix_sends_due", "destination", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # SEG, SR, SC
    path: Mapped[str] = mapped_column(String(1024))  # relative to the storage directory
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    state: Mapped[str] = mapped_column(String(16))  # pending, sent, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Notification(Base):
    """One message owed to one ``[[notifications]]`` target about one job's outcome: the
    notification queue. ``context`` is the outcome as it was when the job ended (job, study,
    findings), so every attempt sends the same message under the same ``delivery_key`` (the
    HL7 message control id, the FHIR identifier, the webhook's Idempotency-Key)."""

    __tablename__ = "notifications"
    __table_args__ = (
        # The notifier's query: due rows of one target, oldest first.
        Index("ix_notifications_due", "notification", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    notification: Mapped[str] = mapped_column(String(64))  # its [[notifications]] name
    kind: Mapped[str] = mapped_column(String(8))  # webhook, hl7, fhir
    event: Mapped[str] = mapped_column(String(16))  # done, failed, finding, critical
    delivery_key: Mapped[str] = mapped_column(String(32), unique=True)
    context: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))  # pending, sent, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Who did what, and when: received, routed, retried, cancelled, sent. No patient data."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # "aet:CT1@10.0.0.5", "token:admin", "node"
    action: Mapped[str] = mapped_column(String(32), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    detail: Mapped[str | None] = mapped_column(Text)


class StudyRequest(Base):
    """A study asked of a source (``[[sources]]``): retrieved, then analysed by a route or a
    model (``POST /api/requests``, ``dicomnode analyze``, ``backfill``), or retrieved as a
    prior for a job. One row per study; a client's ``transaction_id`` names it once."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("client", "transaction_id"),
        # The runner's query: due requests by state, then priority.
        Index("ix_requests_due", "state", "next_attempt_at"),
        Index("ix_requests_study", "study_instance_uid"),
        Index("ix_requests_for_job", "for_job"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: who asked ("token:ris", "cli", "backfill", "node"): a transaction id is unique per client
    client: Mapped[str] = mapped_column(String(128))
    transaction_id: Mapped[str | None] = mapped_column(String(192))
    #: "analyze", "backfill", "priors" (find a job's priors), "prior" (retrieve one)
    purpose: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: pending, retrieving, partial, retrieved, queued, done, failed
    state: Mapped[str] = mapped_column(String(16))
    #: per series: expected and received instance counts, and what is missing
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: a priors search: the patient, the study it is for and the route's match
    query: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    job_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    #: priors: the job that waits for them
    for_job: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    retrieved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
