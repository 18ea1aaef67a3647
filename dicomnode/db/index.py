"""Writes and reads of the instance index (patients, studies, series, instances, associations)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db.models import Association, Instance, Patient, Series, Study
from dicomnode.domain import InstanceHeader, Peer, StudySummary


def open_association(session: Session, peer: Peer, opened_at: datetime) -> int:
    row = Association(
        calling_aet=peer.calling_aet,
        called_aet=peer.called_aet,
        host=peer.host,
        port=peer.port,
        opened_at=opened_at,
        stored=0,
        refused=0,
    )
    session.add(row)
    session.flush()
    return row.id


def close_association(
    session: Session, pk: int, *, outcome: str, closed_at: datetime, stored: int, refused: int
) -> None:
    row = session.get(Association, pk)
    if row is not None:
        row.outcome, row.closed_at, row.stored, row.refused = outcome, closed_at, stored, refused


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def record_instance(
    session: Session,
    header: InstanceHeader,
    *,
    path: str,
    size_bytes: int,
    peer: Peer,
    association_pk: int | None,
    received_at: datetime,
) -> Instance:
    """Insert or update the rows for one stored instance; the caller commits."""
    series = _series(session, header, received_at)
    instance = find_instance(session, header.sop_instance_uid)
    if instance is None:
        instance = Instance(sop_instance_uid=header.sop_instance_uid)
        session.add(instance)
    instance.series = series
    instance.sop_class_uid = header.sop_class_uid
    instance.transfer_syntax_uid = header.transfer_syntax_uid
    instance.instance_number = header.instance_number
    instance.number_of_frames = header.number_of_frames
    instance.rows, instance.columns = header.rows, header.columns
    instance.path, instance.size_bytes = path, size_bytes
    instance.association_pk = association_pk
    instance.calling_aet, instance.calling_host = peer.calling_aet, peer.host
    instance.received_at = received_at
    return instance


def _patient(session: Session, header: InstanceHeader) -> Patient:
    patient = session.scalar(
        select(Patient).where(
            Patient.patient_id == header.patient_id,
            Patient.issuer_of_patient_id == header.issuer_of_patient_id,
        )
    )
    if patient is None:
        patient = Patient(
            patient_id=header.patient_id, issuer_of_patient_id=header.issuer_of_patient_id
        )
        session.add(patient)
    # The latest instance wins for demographics, as a PACS shows the latest correction.
    patient.patient_name = header.patient_name
    patient.birth_date = header.patient_birth_date
    patient.sex = header.patient_sex
    return patient


def _study(session: Session, header: InstanceHeader, now: datetime) -> Study:
    # The patient first: a query would autoflush a new study that has no patient yet.
    patient = _patient(session, header)
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == header.study_instance_uid)
    )
    if study is None:
        study = Study(study_instance_uid=header.study_instance_uid, first_received_at=now)
        session.add(study)
    study.patient = patient  # the latest instance may correct the patient
    study.study_date, study.study_time = header.study_date, header.study_time
    study.study_id = header.study_id
    study.accession_number = header.accession_number
    study.study_description = header.study_description
    study.referring_physician_name = header.referring_physician_name
    study.last_received_at = now
    return study


def _series(session: Session, header: InstanceHeader, now: datetime) -> Series:
    study = _study(session, header, now)
    series = session.scalar(
        select(Series).where(Series.series_instance_uid == header.series_instance_uid)
    )
    if series is None:
        series = Series(
            series_instance_uid=header.series_instance_uid, study=study, first_received_at=now
        )
        session.add(series)
    series.modality = header.modality
    series.series_number = header.series_number
    series.series_description = header.series_description
    series.body_part_examined = header.body_part_examined
    series.frame_of_reference_uid = header.frame_of_reference_uid
    series.last_received_at = now
    return series


def list_studies(session: Session, *, limit: int = 100, offset: int = 0) -> list[StudySummary]:
    """Studies, most recently received first, with their counts."""
    counts = (
        select(
            Series.study_pk.label("study_pk"),
            func.count(func.distinct(Series.id)).label("series_count"),
            func.count(Instance.id).label("instance_count"),
            func.coalesce(func.sum(Instance.size_bytes), 0).label("size_bytes"),
        )
        .join(Instance, Instance.series_pk == Series.id)
        .group_by(Series.study_pk)
        .subquery()
    )
    rows = session.execute(
        select(Study, Patient, counts.c.series_count, counts.c.instance_count, counts.c.size_bytes)
        .join(Patient, Study.patient_pk == Patient.id)
        .join(counts, counts.c.study_pk == Study.id)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    modalities = _modalities(session, [row[0].id for row in rows])
    return [
        StudySummary(
            study_instance_uid=study.study_instance_uid,
            patient_id=patient.patient_id,
            patient_name=patient.patient_name,
            study_date=study.study_date,
            accession_number=study.accession_number,
            study_description=study.study_description,
            modalities=modalities.get(study.id, ()),
            series_count=series_count,
            instance_count=instance_count,
            size_bytes=int(size_bytes),
            first_received_at=study.first_received_at,
            last_received_at=study.last_received_at,
        )
        for study, patient, series_count, instance_count, size_bytes in rows
    ]


def _modalities(session: Session, study_pks: list[int]) -> dict[int, tuple[str, ...]]:
    found: dict[int, set[str]] = {}
    if study_pks:
        for study_pk, modality in session.execute(
            select(Series.study_pk, Series.modality)
            .where(Series.study_pk.in_(study_pks))
            .distinct()
        ):
            if modality:
                found.setdefault(study_pk, set()).add(modality)
    return {pk: tuple(sorted(values)) for pk, values in found.items()}
