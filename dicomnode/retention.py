"""Retention: studies older than the configured age leave the spool and the index.

A study is old when nothing arrived for it for ``node.retention_days``; it stays while any of
its jobs is unfinished (waiting, queued, running or sending), since those still read its files.
Files go first, then the rows, so a crash in between leaves rows whose files are gone (a later
run removes them) and never files nobody knows about.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Job, Patient, Send, Series, SeriesIntake, Study
from dicomnode.domain import FINAL_STATES
from dicomnode.receive.spool import Spool

logger = logging.getLogger(__name__)

BATCH = 100  # studies a transaction


def purge_studies(sessions: sessionmaker[Session], spool: Spool, older_than: datetime) -> int:
    """Remove studies last received before ``older_than`` with no unfinished job; return how
    many."""
    removed = 0
    while studies := _old_studies(sessions, older_than):
        for study_pk, study_uid in studies:
            _remove(sessions, spool, study_pk, study_uid)
        removed += len(studies)
    if removed:
        logger.info("Retention removed %d studies", removed, extra={"action": "retention"})
    return removed


def _old_studies(sessions: sessionmaker[Session], older_than: datetime) -> list[tuple[int, str]]:
    unfinished = exists().where(
        Job.study_instance_uid == Study.study_instance_uid,
        Job.state.not_in([state.value for state in FINAL_STATES]),
    )
    with sessions() as session:
        rows = session.execute(
            select(Study.id, Study.study_instance_uid)
            .where(Study.last_received_at < older_than, ~unfinished)
            .limit(BATCH)
        ).all()
    return [(int(pk), str(uid)) for pk, uid in rows]


def _remove(sessions: sessionmaker[Session], spool: Spool, study_pk: int, study_uid: str) -> None:
    with sessions() as session:
        paths = list(session.scalars(
            select(Instance.path).join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk)
        ))  # fmt: skip
    for path in paths:
        spool.remove(path)
    with sessions.begin() as session:
        series_pks = select(Series.id).where(Series.study_pk == study_pk)
        series_uids = select(Series.series_instance_uid).where(Series.study_pk == study_pk)
        session.execute(delete(Instance).where(Instance.series_pk.in_(series_pks)))
        session.execute(
            delete(SeriesIntake).where(SeriesIntake.series_instance_uid.in_(series_uids))
        )
        session.execute(delete(Series).where(Series.study_pk == study_pk))
        patient_pk = session.scalar(select(Study.patient_pk).where(Study.id == study_pk))
        session.execute(delete(Study).where(Study.id == study_pk))
        if patient_pk is not None and not session.scalar(
            select(exists().where(Study.patient_pk == patient_pk))
        ):
            session.execute(delete(Patient).where(Patient.id == patient_pk))
    spool.remove_empty_folders(f"spool/{study_uid}")


def purge_results(sessions: sessionmaker[Session], storage_dir: Path, older_than: datetime) -> int:
    """Remove ``results/<job id>/`` folders of jobs that are final, last changed before
    ``older_than``, and owe no destination an object (no ``pending`` send), and the folders of
    jobs no longer in the table. Results a destination still waits for stay. Returns how many.
    Staging folders no live run can publish (a worker killed mid-write) go too."""
    from dicomnode.inference.findings import RESULTS_DIR
    from dicomnode.queue.sends import PENDING
    from dicomnode.queue.staging import clean_staging

    clean_staging(Path(storage_dir), sessions)

    root = Path(storage_dir) / RESULTS_DIR
    if not root.is_dir():
        return 0
    folders = {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}
    if not folders:
        return 0
    pending = exists().where(Send.job_id == Job.id, Send.state == PENDING)
    with sessions() as session:
        known = set(session.scalars(select(Job.id).where(Job.id.in_(folders))))
        removable = set(
            session.scalars(
                select(Job.id).where(
                    Job.id.in_(folders),
                    Job.state.in_([state.value for state in FINAL_STATES]),
                    Job.updated_at < older_than,
                    ~pending,
                )
            )
        )
    removed = 0
    for job_id, folder in sorted(folders.items()):
        if job_id in removable or job_id not in known:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        logger.info(
            "Retention removed the results of %d jobs", removed, extra={"action": "retention"}
        )
    return removed
