"""The request runner: takes due requests, retrieves what each study still lacks, and only once
every instance the source listed is in the index, makes the study's jobs.

One attempt: find the study (an accession number is resolved to its Study Instance UID first,
and the UID recorded before anything is retrieved, so the intake leaves the study to the
request); list each incomplete series' instances on the source; retrieve what the index does
not hold (a whole series when none of it is there, else just the missing instances); count
again. A study still incomplete (the source stopped answering, refused sub-operations) is
``partial``, with the missing instances listed per series, and tried again after the source's
backoff for what is still missing, never what is already indexed; after ``max_attempts`` it is
``failed``, missing list kept. Nothing of a study is analysed before all of it is in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.domain import FINAL_STATES, RequestState
from dicomnode.errors import ConfigError, SourceError, StudyNotFound
from dicomnode.fetch.analysis import Analysis
from dicomnode.fetch.priors import SEARCH, PriorsProgress
from dicomnode.fetch.requests import (
    RequestRecord,
    RequestRepository,
    indexed_counts,
    indexed_instances,
    utc_now,
)
from dicomnode.fetch.sources import open_source

if TYPE_CHECKING:
    from dicomnode.config import Settings
    from dicomnode.fetch.query import SeriesMatch, Source
    from dicomnode.queue.repository import JobRepository
    from dicomnode.receive.store import InstanceStore

logger = logging.getLogger(__name__)

#: instances named in one image-level retrieve (C-MOVE / C-GET identifier)
RETRIEVE_CHUNK = 100
#: one tick works on requests for at most this long (then the next tick goes on), so a stop
#: waits at most this and one study's retrieve
TICK_BUDGET_S = 30.0


class RequestRunner:
    """Works on the requests table: one request at a time, most urgent first."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        jobs: JobRepository,
        store: InstanceStore,
        *,
        analysis: Analysis | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.jobs = jobs
        self.store = store
        self.requests = RequestRepository(sessions, clock=clock)
        self.analysis = analysis or Analysis(settings, sessions, jobs, store.spool.root)
        self.priors = PriorsProgress(settings, sessions, jobs, self.requests)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: what the thread runs each turn: run_once, or it wrapped so that one process of
        #: several sharing the database runs it at a time (the node's TaskLocks)
        self.task: Callable[[], object] = self.run_once

    def run_once(self) -> int:
        """Settle the requests whose jobs ended, then work on due requests one at a time, the
        most urgent first each time (a stat request made meanwhile goes before a backfill's
        next), for up to TICK_BUDGET_S; returns how many were worked on."""
        with self._lock:
            self.settle()
            worked = 0
            deadline = time.monotonic() + TICK_BUDGET_S
            while not self._stop.is_set() and time.monotonic() < deadline:
                due = self.requests.due(limit=1)
                if not due:
                    break
                if self.requests.start(due[0].id):
                    self.process(self.requests.get(due[0].id))
                    worked += 1
            return worked

    # -- the thread ---------------------------------------------------------------------------

    def start(self, poll_s: float = 1.0) -> threading.Thread:
        """Work on the requests in a thread of its own (a retrieve takes seconds: it holds up
        no periodic task), every ``poll_s`` or at once when woken."""
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.task()
                except Exception:
                    logger.exception(
                        "the request runner failed; it tries again", extra={"action": "requests"}
                    )
                self._wake.wait(poll_s)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="requests", daemon=True)
        self._thread.start()
        return self._thread

    def wake(self) -> None:
        """A request was made: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Take no further request; the one in hand is finished (joined up to ``timeout``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- one request --------------------------------------------------------------------------

    def process(self, record: RequestRecord) -> RequestRecord:
        """One attempt at a request taken to work on (``retrieving``)."""
        try:
            source = open_source(self.settings, record.source, self.store)
        except ConfigError as exc:
            return self._fail(record, exc.message)
        if record.purpose == SEARCH:
            try:
                return self.priors.search(record, source)
            except SourceError as exc:
                return self._later(record, exc.message)
        try:
            study_uid = record.study_instance_uid or self._resolve(record, source)
            series = source.find_series(study_uid)
            if not series:
                raise StudyNotFound(f"{source} has no study {study_uid}")
        except StudyNotFound as exc:
            return self._fail(record, exc.message)
        except SourceError as exc:
            return self._later(record, exc.message)
        progress, error = self._retrieve(record, source, study_uid, series)
        record = self.requests.set(record.id, progress=progress)
        if progress["received"] < progress["expected"]:
            missing = progress["expected"] - progress["received"]
            why = error or "the source sent fewer instances than it listed"
            return self._later(
                record, f"{missing} of {progress['expected']} instances missing: {why}"
            )
        return self._retrieved(record, study_uid)

    def _resolve(self, record: RequestRecord, source: Source) -> str:
        """The Study Instance UID of the request's accession number, recorded before anything
        is retrieved (the intake leaves a requested study alone)."""
        accession = record.accession_number or ""
        found = source.find_studies({"AccessionNumber": accession})
        uids = sorted({s.study_instance_uid for s in found if s.accession_number == accession})
        if not uids:
            raise StudyNotFound(f"{source} has no study with the request's accession number")
        if len(uids) > 1:
            raise StudyNotFound(
                f"the request's accession number names {len(uids)} studies on {source}; ask "
                "for one by its Study Instance UID"
            )
        self.requests.set(record.id, study_instance_uid=uids[0])
        return uids[0]

    def _retrieve(
        self, record: RequestRecord, source: Source, study_uid: str, series: Sequence[SeriesMatch]
    ) -> tuple[dict[str, Any], str]:
        """Bring what the index lacks of each series; the progress after it, and the first
        error met (empty when none)."""
        with self.sessions() as session:
            counts = indexed_counts(session, [s.series_instance_uid for s in series])
        entries: dict[str, dict[str, Any]] = {}
        wanted: dict[str, list[str]] = {}
        error = ""
        for item in series:
            uid = item.series_instance_uid
            held = counts.get(uid, 0)
            entry: dict[str, Any] = {
                "series_instance_uid": uid,
                "modality": item.modality,
                "expected": item.expected,
                "received": held,
                "missing_instances": [],
            }
            entries[uid] = entry
            if item.expected is not None and held >= item.expected:
                continue
            try:
                listed = source.find_instances(study_uid, uid)
            except SourceError as exc:
                error = error or exc.message
                continue
            with self.sessions() as session:
                have = indexed_instances(session, uid)
            entry["expected"] = len(listed)
            wanted[uid] = [sop for sop in listed if sop not in have]
            entry["missing_instances"] = wanted[uid]
        # what is missing is on record before the retrieve: a source that goes down in the
        # middle leaves the request saying so
        self.requests.set(record.id, progress=_totals(list(entries.values())))
        for uid, sops in wanted.items():
            if not sops or error:
                continue
            whole = len(sops) == entries[uid]["expected"]
            chunks = [[]] if whole else [sops[i : i + RETRIEVE_CHUNK]
                                         for i in range(0, len(sops), RETRIEVE_CHUNK)]  # fmt: skip
            for chunk in chunks:
                try:
                    outcome = source.retrieve(study_uid, uid, chunk)
                except SourceError as exc:
                    error = exc.message
                    break
                if outcome.error:
                    error = outcome.error
                    break
            logger.info(
                "request %s: series retrieved from %s (%s)",
                record.id,
                record.source,
                "whole" if whole else f"{len(sops)} missing instances",
                extra={"action": "request_retrieve", "request_id": record.id},
            )
        with self.sessions() as session:
            for uid, sops in wanted.items():
                have = indexed_instances(session, uid)
                entry = entries[uid]
                entry["missing_instances"] = [sop for sop in sops if sop not in have]
                entry["received"] = entry["expected"] - len(entry["missing_instances"])
        return _totals(list(entries.values())), error

    def _retrieved(self, record: RequestRecord, study_uid: str) -> RequestRecord:
        now = self.requests.now()
        record = self.requests.set(
            record.id, state=RequestState.RETRIEVED, retrieved_at=now, error=None,
            study_instance_uid=study_uid,
        )  # fmt: skip
        logger.info(
            "request %s: study retrieved whole (%d instances)",
            record.id,
            (record.progress or {}).get("expected", 0),
            extra={"action": "request_retrieved", "request_id": record.id},
        )
        if record.purpose == "prior":  # for a job's priors: kept, not analysed
            self.analysis.mark_study_routed(record, study_uid)
            return self.requests.set(record.id, state=RequestState.DONE)
        plan = self.analysis.plan(record, study_uid, actor=record.client)
        if not plan.jobs:
            return self._fail(record, plan.reason)
        return self.requests.set(
            record.id, state=RequestState.QUEUED, job_ids=[job.id for job in plan.jobs]
        )

    def _later(self, record: RequestRecord, error: str) -> RequestRecord:
        """An attempt that left the study incomplete: partial (some of it is in) or pending
        (none), tried again after the source's backoff; failed once its attempts are used."""
        source = next((s for s in self.settings.sources if s.name == record.source), None)
        record = self.requests.get(record.id)
        if source is None or record.attempts >= record.max_attempts:
            return self._fail(record, f"{error} (gave up after {record.attempts} attempts)")
        received = (record.progress or {}).get("received", 0)
        state = RequestState.PARTIAL if received else RequestState.PENDING
        due = self.requests.backoff(record, source.backoff_s, source.max_backoff_s)
        logger.warning(
            "request %s: attempt %d of %d incomplete, next at %s: %s",
            record.id,
            record.attempts,
            record.max_attempts,
            f"{due:%H:%M:%S}",
            error,
            extra={"action": "request_incomplete", "request_id": record.id},
        )
        return self.requests.set(record.id, state=state, error=error, next_attempt_at=due)

    def _fail(self, record: RequestRecord, error: str) -> RequestRecord:
        logger.warning(
            "request %s failed: %s",
            record.id,
            error,
            extra={"action": "request_failed", "request_id": record.id},
        )
        record = self.requests.set(record.id, state=RequestState.FAILED, error=error)
        if record.purpose == SEARCH:  # no priors to be had: the job runs without them
            return self.priors.finish(record)
        return record

    # -- requests whose jobs run --------------------------------------------------------------

    def settle(self) -> int:
        """Requests whose every job ended are done, and jobs whose priors are all in (or
        failed) queued; returns how many requests ended."""
        settled = 0
        for record in self.requests.in_state(RequestState.QUEUED):
            if record.purpose == SEARCH:
                settled += self.priors.settle(record).state is not RequestState.QUEUED
                continue
            jobs = [self.jobs.get(job_id) for job_id in record.job_ids]
            if all(job is None or job.state in FINAL_STATES for job in jobs):
                self.requests.set(record.id, state=RequestState.DONE)
                settled += 1
        return settled


def _totals(series: list[dict[str, Any]]) -> dict[str, Any]:
    expected = sum(int(entry["expected"] or 0) for entry in series)
    received = sum(int(entry["received"] or 0) for entry in series)
    return {"expected": expected, "received": received, "series": series}
