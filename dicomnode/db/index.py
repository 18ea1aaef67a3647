"""Reads of the instance index, and the association rows the receiver keeps.

The per-instance writes live in :mod:`dicomnode.db.writer`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicomnode.db.models import Association, Instance, Patient, Series, Study
from dicomnode.db.session import rowcount
from dicomnode.domain import Peer, StudySummary

#: the outcome of an association its receiver died holding (closed by the receiver's next run);
#: not "released": the sender never said it had sent everything
LOST = "lost"


def open_association(
    session: Session, peer: Peer, opened_at: datetime, *, receiver_id: str | None = None
) -> int:
    row = Association(
        receiver_id=receiver_id,
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


def close_lost_associations(session: Session, receiver_id: str, closed_at: datetime) -> int:
    """Close the associations ``receiver_id`` still holds open, as ``lost``; return how many.

    Called as a receiver starts: whatever it held open died with its previous run. One UPDATE,
    on ix_associations_receiver_open.
    """
    return rowcount(
        session,
        update(Association)
        .where(Association.receiver_id == receiver_id, Association.outcome.is_(None))
        .values(outcome=LOST, closed_at=closed_at),
    )


# -- reads ---------------------------------------------------------------------------------------


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
