"""Which jobs a listing shows: the filters of ``jobs list``, ``GET /api/jobs`` and the intake's
reads, as one value that becomes the query's WHERE clauses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, select

from dicomnode.db.models import Job, Patient, Study
from dicomnode.domain import JobState

jobs = cast(Table, Job.__table__)


@dataclass(frozen=True)
class JobFilter:
    """Jobs in ``state`` (one or several), of ``model``, of a study or series (by instance
    UID), of the studies with an accession number or patient ID, received ``since``; each
    criterion left as None matches every job."""

    state: str | Iterable[str] | None = None
    model: str | None = None
    study: str | None = None
    series: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    since: datetime | None = None

    def clauses(self) -> list[Any]:
        """The WHERE clauses; the accession number and patient ID are indexed lookups in the
        index of received studies."""
        where: list[Any] = []
        if self.state is not None:
            states = [self.state] if isinstance(self.state, str) else self.state
            where.append(jobs.c.state.in_([JobState(s).value for s in states]))
        if self.model is not None:
            where.append(jobs.c.model == self.model)
        if self.study is not None:
            where.append(jobs.c.study_instance_uid == self.study)
        if self.series is not None:
            where.append(jobs.c.series_instance_uid == self.series)
        if self.accession is not None or self.patient_id is not None:
            studies = select(Study.study_instance_uid)
            if self.accession is not None:
                studies = studies.where(Study.accession_number == self.accession)
            if self.patient_id is not None:
                patients = select(Patient.id).where(Patient.patient_id == self.patient_id)
                studies = studies.where(Study.patient_pk.in_(patients))
            where.append(jobs.c.study_instance_uid.in_(studies))
        if self.since is not None:
            where.append(jobs.c.received_at >= self.since.astimezone(UTC))
        return where


#: The filter that matches every job.
EVERY_JOB = JobFilter()
