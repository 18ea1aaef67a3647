"""From stored series to jobs: route each new series, decide completion, queue the job.

The database is the record: a sweep reads what the index holds, so a restart loses nothing and
picks up where it stopped. The receiver only wakes the sweep (an association released), so the
C-STORE path does no routing work. Each sweep:

1. routes every series not yet routed in its current generation (a ``waiting`` job per matched
   route, or a ``skipped`` one saying no route matched);
2. decides, with :mod:`dicomnode.completion`, whether each open series is complete; a complete
   series' waiting jobs are routed again with the final slice count and queued (or skipped);
3. decides each waiting study-level job: run on the required series, wait, or fail.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import and_, func, or_, select, true
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import audit
from dicomnode.completion import (
    SeriesSnapshot,
    StudySeries,
    recognition_text,
    series_verdict,
    study_verdict,
)
from dicomnode.config import CompletionSettings
from dicomnode.db.models import Association, Instance, Job, Series, SeriesIntake, Study
from dicomnode.domain import JobState
from dicomnode.errors import JobStateError, SeriesNotVolume
from dicomnode.queue.listing import JobFilter
from dicomnode.queue.repository import JobRepository
from dicomnode.routing import Outcome, Router, SeriesFacts

logger = logging.getLogger(__name__)

MIN_CONTIGUOUS_SLICES = 3
#: how far before the previous sweep to look for new series: receivers on other hosts write
#: their own clocks' times, and a slow transaction may commit after the sweep began
RECENT_MARGIN = timedelta(seconds=60)


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    routed: int = 0
    completed: int = 0
    queued: int = 0
    skipped: int = 0
    failed: int = 0


@dataclass(frozen=True)
class _OpenSeries:
    intake_id: int
    series_pk: int
    series_instance_uid: str
    study_instance_uid: str
    rules_route: str | None


class Intake:
    """Turns what the receiver stored into jobs; safe to run in several processes at once
    (jobs are deduplicated by key, and each state change is a conditional update)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        storage_dir: Path,
        router: Router,
        jobs: JobRepository,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.sessions = sessions
        self.storage_dir = storage_dir.resolve()
        self.router = router
        self.jobs = jobs
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()  # one sweep at a time in this process
        #: after the first (full) sweep, look only at series received since the previous one
        self._since: datetime | None = None
        self._rules = {rule.name: rule.completion for rule in router.rules}

    def sweep(self) -> SweepReport:
        """Run the three steps once."""
        with self._lock:
            now = self._clock()
            routed = self._route_new_series(now, since=self._since)
            self._since = now - RECENT_MARGIN
            completed, queued, skipped = self._complete_series(now)
            study_queued, failed = self._decide_studies(now)
        report = SweepReport(routed, completed, queued + study_queued, skipped, failed)
        if routed or completed or report.queued or failed:
            logger.info(
                "sweep: %d series routed, %d complete, %d jobs queued, %d skipped, %d failed",
                routed, completed, report.queued, skipped, failed,
                extra={"action": "intake_sweep"},
            )  # fmt: skip
        return report

    # -- 1. routing --------------------------------------------------------------------------

    def _route_new_series(self, now: datetime, since: datetime | None) -> int:
        recent = true() if since is None else Series.last_received_at >= since
        with self.sessions() as session:
            rows = session.execute(
                select(Series, Study.study_instance_uid, SeriesIntake)
                .join(Study, Series.study_pk == Study.id)
                .outerjoin(
                    SeriesIntake,
                    SeriesIntake.series_instance_uid == Series.series_instance_uid,
                )
                .where(
                    recent,
                    or_(
                        SeriesIntake.id.is_(None),
                        and_(
                            SeriesIntake.covered_until.is_not(None),
                            Series.last_received_at > SeriesIntake.covered_until,
                        ),
                    ),
                )
                .order_by(Series.first_received_at)
            ).all()
            work = [
                (series.id, series.series_instance_uid, study_uid, series.first_received_at,
                 intake.generation if intake else 0)
                for series, study_uid, intake in rows
            ]  # fmt: skip
        for series_pk, series_uid, study_uid, first_received, generation in work:
            self._route_series(
                series_pk, series_uid, study_uid, first_received, generation + 1, now
            )
        return len(work)

    def _route_series(
        self,
        series_pk: int,
        series_uid: str,
        study_uid: str,
        first_received: datetime,
        generation: int,
        now: datetime,
    ) -> None:
        first = self._first_instance(series_pk)
        facts = SeriesFacts.from_dataset(
            dcmread(self.storage_dir / first.path, stop_before_pixels=True),
            calling_aet=first.calling_aet,
        )
        decision = self.router.route(facts, partial=True)
        if generation > 1:
            self._supersede(series_uid)
        if decision.skipped:
            self.jobs.enqueue(
                dedupe_key=f"-|{series_uid}|{generation}",
                route="",
                model="",
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                inputs=[series_uid],
                state=JobState.SKIPPED,
                received_at=first_received,
                error="no route matched (see `dicomnode route explain`)",
                actor=audit.NODE,
            )
        for route in decision.routes:
            enqueue = functools.partial(
                self.jobs.enqueue,
                route=route.name,
                model=route.model,
                study_instance_uid=study_uid,
                destinations=route.destinations,
                level=route.level,
                priority=int(route.priority),
                received_at=first_received,
                actor=audit.NODE,
            )
            if route.level == "series":
                enqueue(
                    dedupe_key=f"{route.name}|{series_uid}|{generation}",
                    series_instance_uid=series_uid,
                    inputs=[series_uid],
                )
            elif not self._study_job_waiting(route.name, study_uid):
                number = self._study_jobs(route.name, study_uid) + 1
                enqueue(dedupe_key=f"{route.name}|{study_uid}|{number}")
        rules_route = decision.routes[0].name if decision.routes else None
        with self.sessions.begin() as session:
            intake = session.scalar(
                select(SeriesIntake).where(SeriesIntake.series_instance_uid == series_uid)
            )
            if intake is None:
                intake = SeriesIntake(series_instance_uid=series_uid, study_instance_uid=study_uid)
                session.add(intake)
            intake.generation, intake.rules_route = generation, rules_route
            intake.routed_at, intake.completed_at, intake.complete_reason = now, None, None
            intake.covered_until = None

    def _supersede(self, series_uid: str) -> None:
        """A late instance: a job of the earlier generation that has not started yet is moot."""
        for job in self.jobs.list(JobFilter(state=JobState.QUEUED, series=series_uid), limit=1000):
            try:
                self.jobs.cancel(job.id, actor=audit.NODE, reason="superseded by a late instance")
            except JobStateError:
                continue  # a worker took it meanwhile: it runs, and the new generation too
            logger.info(
                "job %s superseded by a late instance",
                job.id,
                extra={"action": "job_superseded", "job_id": job.id},
            )

    def _study_job_waiting(self, route: str, study_uid: str) -> bool:
        with self.sessions() as session:
            return bool(session.scalar(
                select(func.count(Job.id)).where(
                    Job.route == route, Job.study_instance_uid == study_uid,
                    Job.level == "study", Job.state == JobState.WAITING.value)
            ))  # fmt: skip

    def _study_jobs(self, route: str, study_uid: str) -> int:
        with self.sessions() as session:
            return int(session.scalar(
                select(func.count(Job.id)).where(
                    Job.route == route, Job.study_instance_uid == study_uid, Job.level == "study")
            ) or 0)  # fmt: skip

    # -- 2. series completion ----------------------------------------------------------------

    def _complete_series(self, now: datetime) -> tuple[int, int, int]:
        with self.sessions() as session:
            open_series = [
                _OpenSeries(intake.id, series.id, series.series_instance_uid,
                            intake.study_instance_uid, intake.rules_route)
                for intake, series in session.execute(
                    select(SeriesIntake, Series)
                    .join(Series, Series.series_instance_uid == SeriesIntake.series_instance_uid)
                    .where(SeriesIntake.completed_at.is_(None))
                )
            ]  # fmt: skip
        completed = queued = skipped = 0
        for series in open_series:
            rules = self._rules.get(series.rules_route or "", CompletionSettings())
            snapshot = self.snapshot(series.series_pk, series.series_instance_uid, rules)
            verdict = series_verdict(snapshot, rules, now)
            if not verdict.complete:
                continue
            completed += 1
            with self.sessions.begin() as session:
                intake = session.get(SeriesIntake, series.intake_id)
                if intake is None or intake.completed_at is not None:
                    continue  # another process got there first
                intake.completed_at, intake.complete_reason = now, verdict.reason[:255]
                intake.covered_until = snapshot.last_received_at
            logger.info(
                "series complete (%s): %s",
                series.rules_route or "no route",
                verdict.reason,
                extra={"action": "series_complete"},
            )
            q, s = self._queue_series_jobs(series, snapshot, now)
            queued, skipped = queued + q, skipped + s
        return completed, queued, skipped

    def _queue_series_jobs(
        self, series: _OpenSeries, snapshot: SeriesSnapshot, now: datetime
    ) -> tuple[int, int]:
        """Route again with the final slice count; queue the routes that still match."""
        waiting = self.jobs.list(
            JobFilter(state=JobState.WAITING, series=series.series_instance_uid), limit=1000
        )
        if not waiting:
            return 0, 0
        first = self._first_instance(series.series_pk)
        facts = SeriesFacts.from_dataset(
            dcmread(self.storage_dir / first.path, stop_before_pixels=True),
            slices=snapshot.instances,
            calling_aet=first.calling_aet,
        )
        still = {route.name for route in self.router.route(facts).routes}
        queued = skipped = 0
        for job in waiting:
            if job.level != "series":
                continue
            if job.route in still:
                queued += self.jobs.mark_queued(job.id, completed_at=now)
            else:
                reasons = [
                    check.text
                    for rule in self.router.explain(facts)
                    if rule.route == job.route
                    for check in rule.conditions
                    if check.outcome is not Outcome.MATCH
                ]
                skipped += self.jobs.mark_skipped(
                    job.id, "route no longer matches the complete series: " + "; ".join(reasons)
                )
        return queued, skipped

    def snapshot(
        self, series_pk: int, series_uid: str, rules: CompletionSettings
    ) -> SeriesSnapshot:
        """What the index and the files say about a series now."""
        with self.sessions() as session:
            count, first_at, last_at = session.execute(
                select(func.count(Instance.id), func.min(Instance.received_at),
                       func.max(Instance.received_at)).where(Instance.series_pk == series_pk)
            ).one()  # fmt: skip
            last = session.execute(
                select(Instance.association_pk, Instance.number_of_frames, Instance.path)
                .where(Instance.series_pk == series_pk)
                .order_by(Instance.received_at.desc(), Instance.id.desc())
                .limit(1)
            ).one()
            released_at, whole = None, False
            if last.association_pk is not None:
                association = session.get(Association, last.association_pk)
                if association is not None and association.outcome == "released":
                    released_at = association.closed_at
                from_last = session.scalar(
                    select(func.count(Instance.id)).where(
                        Instance.series_pk == series_pk,
                        Instance.association_pk == last.association_pk,
                    )
                )
                whole = from_last == count
            paths = [] if not (released_at and whole) else list(session.scalars(
                select(Instance.path).where(Instance.series_pk == series_pk)))  # fmt: skip
        header = dcmread(self.storage_dir / last.path, stop_before_pixels=True,
                         specific_tags=[0x00201002])  # Images in Acquisition  # fmt: skip
        expected = _int(header.get("ImagesInAcquisition"))
        single_multiframe = count == 1 and (last.number_of_frames or 1) > 1
        return SeriesSnapshot(
            series_instance_uid=series_uid,
            instances=int(count),
            first_received_at=first_at,
            last_received_at=last_at,
            released_at=released_at,
            whole_in_last_association=whole,
            expected_instances=expected,
            single_multiframe=single_multiframe,
            contiguous=self._contiguous(paths) if paths and rules.expected_counts else None,
        )

    def _contiguous(self, paths: list[str]) -> bool:
        """Whether the slices form one gapless stack, by the rules that later load it."""
        from dicomnode.imaging.frames import read_frames
        from dicomnode.imaging.stack import StackRules, plan_one

        if len(paths) < MIN_CONTIGUOUS_SLICES:
            return False  # two slices prove nothing about the ones still to come
        try:
            _, frames = read_frames([self.storage_dir / path for path in paths], pixels=False)
            plan_one(frames, StackRules())
        except SeriesNotVolume:
            return False
        return True

    # -- 3. study-level routes ---------------------------------------------------------------

    def _decide_studies(self, now: datetime) -> tuple[int, int]:
        queued = failed = 0
        for job in self.jobs.list(JobFilter(state=JobState.WAITING), limit=10_000):
            if job.level != "study":
                continue
            rules = self._rules.get(job.route)
            if rules is None:
                failed += self.jobs.mark_failed(
                    job.id, f"route {job.route!r} is no longer configured"
                )
                continue
            series, first_received = self._study_series(job.study_instance_uid)
            verdict = study_verdict(series, rules, first_received, now)
            if verdict.action == "run":
                queued += self.jobs.mark_queued(
                    job.id, completed_at=now, inputs=list(verdict.inputs.values())
                )
                logger.info(
                    "job %s: %s",
                    job.id,
                    verdict.reason,
                    extra={"action": "study_ready", "job_id": job.id},
                )
            elif verdict.action == "fail":
                failed += self.jobs.mark_failed(job.id, verdict.reason)
        return queued, failed

    def _study_series(self, study_uid: str) -> tuple[list[StudySeries], datetime]:
        with self.sessions() as session:
            rows = session.execute(
                select(Series, SeriesIntake.completed_at)
                .join(Study, Series.study_pk == Study.id)
                .outerjoin(SeriesIntake,
                           SeriesIntake.series_instance_uid == Series.series_instance_uid)
                .where(Study.study_instance_uid == study_uid)
            ).all()  # fmt: skip
            firsts = {series.id: self._first_instance(series.id, session) for series, _ in rows}
        result = []
        for series, completed_at in rows:
            ds = dcmread(self.storage_dir / firsts[series.id].path, stop_before_pixels=True)
            text = recognition_text(
                str(ds.get("SeriesDescription", "")),
                str(ds.get("ProtocolName", "")),
                str(ds.get("SequenceName", "")),
                contrast=bool(str(ds.get("ContrastBolusAgent", "")).strip()),
            )
            result.append(StudySeries(series.series_instance_uid, text, completed_at is not None,
                                      series.last_received_at))  # fmt: skip
        first = min((series.first_received_at for series, _ in rows), default=self._clock())
        return result, first

    def _first_instance(self, series_pk: int, session: Session | None = None) -> Instance:
        if session is None:
            with self.sessions() as own:
                return self._first_instance(series_pk, own)
        instance = session.scalar(
            select(Instance).where(Instance.series_pk == series_pk)
            .order_by(Instance.received_at, Instance.id).limit(1)
        )  # fmt: skip
        if instance is None:
            raise LookupError(f"series row {series_pk} has no instances")
        session.expunge(instance)
        return instance


def _int(value: str | int | None) -> int | None:
    """An IS attribute's value; None when absent or not a number."""
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None
