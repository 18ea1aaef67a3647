"""A small, known job history for admin tests (CLI, API, metrics, dashboard): patients and
studies in the index, and jobs driven through the real repository transitions on a clock the
test controls, so every stage time, and so every duration, is known.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Association, Patient, Send, Study
from dicomnode.domain import JobState
from dicomnode.queue.repository import JobRepository

if TYPE_CHECKING:
    from dicomnode.api import ApiServer
    from dicomnode.config import Settings

ROOT = "1.2.826.0.1.3680043.99.700"
#: the history's start: an hour ago, so it falls in the dashboard's 24-hour throughput window
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


class Clock:
    """A settable clock for the repository."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> Clock:
        self.now = T0 + timedelta(seconds=seconds)
        return self

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass(frozen=True)
class History:
    """What :func:`make_history` made, by name."""

    jobs: dict[str, int]  # "done_lung", "failed_lung", ... -> job id
    studies: dict[str, str]  # "a", "b", "c" -> Study Instance UID
    #: patient and accession of each study key
    patients: dict[str, str]
    accessions: dict[str, str]


def add_study(
    session: Session, key: str, patient_id: str, accession: str, name: str, at: datetime
) -> str:
    """A patient (if new) and a study in the index; returns the Study Instance UID."""
    patient = session.query(Patient).filter_by(patient_id=patient_id).one_or_none()
    if patient is None:
        patient = Patient(
            patient_id=patient_id,
            issuer_of_patient_id="",
            patient_name=name,
            birth_date="19600101",
            sex="O",
        )
        session.add(patient)
        session.flush()
    uid = f"{ROOT}.{ord(key)}"
    session.add(
        Study(
            study_instance_uid=uid,
            patient_pk=patient.id,
            study_date="20261120",
            study_time="080000",
            study_id="1",
            accession_number=accession,
            study_description="admin test",
            referring_physician_name="",
            first_received_at=at,
            last_received_at=at,
        )
    )
    return uid


def make_history(sessions: sessionmaker[Session], clock: Clock | None = None) -> History:
    """Three studies of two patients, and jobs that ran through known stage times:

    - ``done_lung`` (study a): received 0 s, complete 10 s, queued 10 s, started 12 s,
      finished 42 s (run 30 s), sending with two objects to PACS: one sent, one dead
      after 3 attempts; then done at 50 s;
    - ``failed_lung`` (study b): ran twice (starts 100 s and 200 s, runs 5 s each), failed
      with "RuntimeError: out of memory";
    - ``done_brain`` (study c): received 300 s, queued 310 s, started 311 s, finished 371 s;
    - ``queued_lung`` (study c), ``waiting_brain`` (study c): not run yet.

    Plus two associations (released: 20 and 5 stored, 1 refused; aborted: 0 stored).
    """
    clock = clock or Clock()
    jobs = JobRepository(sessions, clock=clock)
    jobs.settings = jobs.settings.model_copy(update={"max_attempts": 2, "backoff_s": 0})
    patients = {"a": "PID-ALPHA", "b": "PID-ALPHA", "c": "PID-BRAVO"}
    accessions = {"a": "ACC-1", "b": "ACC-2", "c": "ACC-3"}
    names = {"a": "Alpha^Anna", "b": "Alpha^Anna", "c": "Bravo^Ben"}
    with sessions.begin() as session:
        studies = {
            key: add_study(session, key, patients[key], accessions[key], names[key], T0)
            for key in ("a", "b", "c")
        }
        session.add_all(
            [
                Association(calling_aet="CT1", called_aet="DICOMNODE", host="127.0.0.1",
                            port=40000, opened_at=T0, closed_at=T0, outcome="released",
                            stored=20, refused=1),
                Association(calling_aet="CT1", called_aet="DICOMNODE", host="127.0.0.1",
                            port=40001, opened_at=T0, closed_at=T0, outcome="released",
                            stored=5, refused=0),
                Association(calling_aet="MR1", called_aet="DICOMNODE", host="127.0.0.1",
                            port=40002, opened_at=T0, closed_at=T0, outcome="aborted",
                            stored=0, refused=0),
            ]
        )  # fmt: skip
    ids: dict[str, int] = {}

    def enqueue(name: str, study: str, model: str, *, at: float, **kw: Any) -> int:
        clock.at(at)
        job = jobs.enqueue(
            dedupe_key=name,
            route=f"{model}-route",
            model=model,
            study_instance_uid=studies[study],
            series_instance_uid=f"{studies[study]}.{len(ids) + 1}",
            received_at=T0 + timedelta(seconds=at),
            **kw,
        )
        ids[name] = job.id
        return job.id

    def run(job_id: int, model: str, start: float, end: float, error: str | None = None) -> None:
        clock.at(start)
        claimed = jobs.claim("test-worker", {model})
        assert claimed is not None and claimed.id == job_id, (claimed, job_id)
        clock.at(end)
        if error is None:
            jobs.finish(job_id, "test-worker", {"objects": []})
        else:
            jobs.fail(job_id, "test-worker", error)

    done = enqueue("done_lung", "a", "lung", at=0, destinations=["PACS"])
    clock.at(10)
    jobs.mark_queued(done, completed_at=clock.now)
    run(done, "lung", 12, 42)
    with sessions.begin() as session:
        for n, (state, attempts, error) in enumerate(
            (("sent", 1, None), ("dead", 3, "C-STORE status 0xA700"))
        ):
            session.add(
                Send(job_id=done, destination="PACS", kind=("SEG", "SR")[n],
                     path=f"results/{done}/dicom/{n}.dcm", sop_class_uid="1.2.3",
                     sop_instance_uid=f"{ROOT}.9.{n}", state=state, attempts=attempts,
                     last_error=error, created_at=clock.now, updated_at=clock.now,
                     sent_at=clock.now if state == "sent" else None)
            )  # fmt: skip
    clock.at(50)
    jobs.mark_sent(done)

    failed = enqueue("failed_lung", "b", "lung", at=90, state=JobState.QUEUED)
    run(failed, "lung", 100, 105, "RuntimeError: out of memory")
    run(failed, "lung", 200, 205, "RuntimeError: out of memory")

    brain = enqueue("done_brain", "c", "brain", at=300)
    clock.at(310)
    jobs.mark_queued(brain, completed_at=clock.now)
    run(brain, "brain", 311, 371)

    enqueue("queued_lung", "c", "lung", at=400, state=JobState.QUEUED)
    enqueue("waiting_brain", "c", "brain", at=410)
    clock.at(420)
    return History(ids, studies, patients, accessions)


@contextmanager
def api_server(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[ApiServer]:
    """The HTTP API over ``sessions``, served by uvicorn on ``[api] host/port`` (0: free)."""
    from dicomnode.api import ApiContext, ApiServer
    from dicomnode.queue.outcomes import ReleasePolicy
    from dicomnode.testing.models import MODELS

    jobs = JobRepository(sessions, settings.queue, policy=ReleasePolicy.from_settings(settings))
    server = ApiServer(ApiContext(settings, sessions, jobs, builtin_models=tuple(MODELS)))
    server.start()
    try:
        yield server
    finally:
        server.stop()
