"""A route's priors: a job of a route with ``priors`` waits (``waiting``) while the node finds
the patient's earlier studies on the source and retrieves the most recent ones; then it is
queued, and the pipeline gives the retrieved studies to the model beside the job's input.

Three kinds of request carry it: one ``priors`` request per job (the search: same Patient ID,
acquired before the job's study, a series matching ``priors.match``), which makes one ``prior``
request per study chosen (each retrieved as any study, resumed when the source fails, never
analysed). When every ``prior`` request has ended, done or failed, the job is queued: a prior
that could not be had leaves the model without it, never the study unanalysed. The source is
``priors.source``, else the request's that brought the study, else the source whose AE title
sent it, else the only source configured; with none, the job runs without priors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Instance, Patient, Series, SeriesIntake, Study
from dicomnode.domain import JobState, Priority, RequestState
from dicomnode.fetch.query import StudyMatch, StudyQuery, most_recent
from dicomnode.fetch.requests import RequestRecord, RequestRepository, RequestSpec

if TYPE_CHECKING:
    from dicomnode.config import PriorsSettings, Settings
    from dicomnode.fetch.query import Source
    from dicomnode.queue.records import JobRecord
    from dicomnode.queue.repository import JobRepository

logger = logging.getLogger(__name__)

CLIENT = "node"
SEARCH = "priors"
PRIOR = "prior"


class PriorsHold:
    """Asked for each job about to be queued: True (it waits) when its route takes priors and
    a search for them is now on record; False to queue it at once."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        requests: RequestRepository | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.requests = requests or RequestRepository(sessions)
        self._routes = {r.name: r for r in settings.routes if r.priors is not None}

    def __call__(self, job: JobRecord, source: str | None = None) -> bool:
        route = self._routes.get(job.route)
        if route is None or route.priors is None:
            return False
        name = self._source(route.priors, source, job)
        if name is None:
            logger.info(
                "job %s: route %s takes priors, but no source is known to ask; it runs "
                "without them",
                job.id,
                route.name,
                extra={"action": "priors_no_source", "job_id": job.id},
            )
            return False
        study = self._study(job.study_instance_uid)
        if study is None or not study["patient_id"]:
            return False
        query = {
            **study,
            "count": route.priors.count,
            "match": dict(route.priors.match),
            "route": route.name,
        }
        record, created = self.requests.submit(
            RequestSpec(name, transaction_id=f"priors:{job.id}", purpose=SEARCH,
                        priority=Priority(job.priority)),
            client=CLIENT,
            max_attempts=self.settings.source(name).max_attempts,
            query=query,
            for_job=job.id,
        )  # fmt: skip
        if created:
            logger.info(
                "job %s waits for its priors (request %s, source %s)",
                job.id,
                record.id,
                name,
                extra={"action": "priors_wanted", "job_id": job.id},
            )
        return record.state not in (RequestState.DONE, RequestState.FAILED)

    def _source(self, priors: PriorsSettings, given: str | None, job: JobRecord) -> str | None:
        names = [s.name for s in self.settings.sources]
        if priors.source is not None:
            return priors.source
        if given is not None and given in names:
            return given
        with self.sessions() as session:
            sender = session.scalar(
                select(Instance.calling_aet)
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.series_instance_uid.in_(list(job.inputs) or [""]))
                .limit(1)
            )
        for source in self.settings.sources:
            if sender and source.ae_title == sender:
                return source.name
        return names[0] if len(names) == 1 else None

    def _study(self, study_uid: str) -> dict[str, Any] | None:
        with self.sessions() as session:
            row = session.execute(
                select(Patient.patient_id, Study.study_date, Study.study_time)
                .join(Study, Study.patient_pk == Patient.id)
                .where(Study.study_instance_uid == study_uid)
            ).first()
        if row is None:
            return None
        when = StudyMatch(study_uid, study_date=row.study_date, study_time=row.study_time).when
        return {
            "patient_id": row.patient_id,
            "study_instance_uid": study_uid,
            "before": when if row.study_date else "9" * 14,  # undated: any other study
        }


def choose_priors(source: Source, query: dict[str, Any]) -> list[StudyMatch]:
    """The patient's most recent ``count`` studies on ``source`` acquired before the job's,
    each with a series that matches (series attributes of ``match``)."""
    wanted = StudyQuery.of(query.get("match") or {})
    filters = {**wanted.study, "PatientID": query["patient_id"]}
    earlier = [
        study
        for study in source.find_studies(filters)
        if study.study_instance_uid != query["study_instance_uid"]
        and study.patient_id == query["patient_id"]
        and study.when < query["before"]
    ]
    chosen: list[StudyMatch] = []
    for study in most_recent(earlier, len(earlier)):
        if len(chosen) == int(query.get("count", 1)):
            break
        if not wanted.series or any(
            wanted.series_match(series) for series in source.find_series(study.study_instance_uid)
        ):
            chosen.append(study)
    return chosen


class PriorsProgress:
    """The runner's part: searching for a job's priors, and queuing the job when they are in."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        jobs: JobRepository,
        requests: RequestRepository,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.jobs = jobs
        self.requests = requests

    def search(self, record: RequestRecord, source: Source) -> RequestRecord:
        """Choose the priors and ask for each (a ``prior`` request); with none, queue the
        job now. SourceError propagates (the runner tries again later)."""
        chosen = choose_priors(source, record.query or {})
        ids = []
        for study in chosen:
            prior, _ = self.requests.submit(
                RequestSpec(record.source, study.study_instance_uid, purpose=PRIOR,
                            transaction_id=f"prior:{record.for_job}:{study.study_instance_uid}",
                            priority=Priority(record.priority)),
                client=CLIENT,
                max_attempts=record.max_attempts,
                for_job=record.for_job,
            )  # fmt: skip
            ids.append(prior.id)
        logger.info(
            "job %s: %d prior studies found on %s",
            record.for_job,
            len(ids),
            record.source,
            extra={"action": "priors_found", "job_id": record.for_job},
        )
        record = self.requests.set(
            record.id,
            state=RequestState.QUEUED,
            progress={"priors": ids},
            error=None if chosen else "no earlier study of the patient matches",
        )
        if not chosen:
            return self.finish(record)
        return record

    def settle(self, record: RequestRecord) -> RequestRecord:
        """A search whose prior requests all ended: its job queued."""
        ids = (record.progress or {}).get("priors", [])
        priors = [self.requests.get(int(i)) for i in ids]
        if any(p.state not in (RequestState.DONE, RequestState.FAILED) for p in priors):
            return record
        failed = [p.id for p in priors if p.state is RequestState.FAILED]
        if failed:
            record = self.requests.set(
                record.id, error=f"prior requests {failed} failed: the job runs without them"
            )
        return self.finish(record)

    def finish(self, record: RequestRecord) -> RequestRecord:
        """The search is over (found, none, or failed): queue its job if it still waits."""
        job_id = record.for_job
        job = self.jobs.get(job_id) if job_id is not None else None
        if job is not None and job.state is JobState.WAITING:
            self.jobs.mark_queued(job.id, confirm_after=self._confirm_after(job))
            logger.info(
                "job %s queued: its priors are in",
                job.id,
                extra={"action": "priors_ready", "job_id": job.id},
            )
        state = RequestState.FAILED if record.state is RequestState.FAILED else RequestState.DONE
        return self.requests.set(record.id, state=state)

    def _confirm_after(self, job: JobRecord) -> Any:
        """The confirmation window its inputs are still in (the intake's), if any."""
        now = self.jobs.now()
        with self.sessions() as session:
            latest = session.scalar(
                select(func.max(SeriesIntake.confirm_after)).where(
                    SeriesIntake.series_instance_uid.in_(list(job.inputs) or [""])
                )
            )
        return latest if latest is not None and latest > now else None


__all__ = ["CLIENT", "PriorsHold", "PriorsProgress", "choose_priors"]
