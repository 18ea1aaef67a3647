"""From stored series to jobs: route each new series, decide completion, queue the job.

The database is the record: a sweep reads what the index holds, so a restart loses nothing and
picks up where it stopped. The receiver only wakes the sweep (an association released), so the
C-STORE path does no routing work. Each sweep:

1. routes every series not yet routed in its current generation (a ``waiting`` job per matched
   route, or a ``skipped`` one saying no route matched);
2. decides, with :mod:`dicomnode.completion`, whether each open series is complete; a complete
   series' waiting jobs are routed again with the final slice count and queued (or skipped);
3. decides each waiting study-level job: run on the required series, wait, or fail;
4. confirms the jobs whose inputs' confirmation window passed with nothing new, so their held
   results go out (a new instance inside the window instead re-routes the series in step 1 of
   the next sweep, which supersedes them).

Several processes may sweep one database at once (the node wires a cross-process lock around
the sweep, and every write here is also safe without it: jobs are deduplicated by key, the
series' intake row is inserted unless present, each state change is a conditional update).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from pydicom import dcmread
from sqlalchemy import Table, and_, func, or_, select, true, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import audit
from dicomnode.completion import (
    SeriesSnapshot,
    StudySeries,
    confirm_after,
    recognition_text,
    series_verdict,
    study_verdict,
)
from dicomnode.config import CompletionSettings
from dicomnode.db.models import (
    Association,
    Instance,
    Job,
    Series,
    SeriesIntake,
    Study,
    StudyRequest,
)
from dicomnode.db.session import insert_unless_present
from dicomnode.domain import JobState, RequestState
from dicomnode.errors import JobStateError, SeriesNotVolume
from dicomnode.imaging.frames import read_dataset
from dicomnode.queue.listing import JobFilter
from dicomnode.queue.records import JobRecord
from dicomnode.queue.repository import JobRepository
from dicomnode.routing import Outcome, Router, SeriesFacts

logger = logging.getLogger(__name__)

intakes = cast(Table, SeriesIntake.__table__)
MIN_CONTIGUOUS_SLICES = 3
#: states of a job that a newer generation of its input makes moot: not started, or started on
#: inputs still inside their confirmation window (nothing of it has been sent)
SUPERSEDABLE = (JobState.QUEUED, JobState.RUNNING, JobState.CONFIRMING)
#: and, of a series' earlier generation, a job still waiting (held for its priors)
SUPERSEDABLE_HELD = (JobState.WAITING, *SUPERSEDABLE)
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
    confirmed: int = 0


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
        hold: Callable[[JobRecord], bool] | None = None,
    ) -> None:
        self.sessions = sessions
        #: asked of each series job about to be queued: True when it waits for something first
        #: (its route's priors, fetched by the request runner, which then queues it)
        self.hold = hold
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
            confirmed = self._confirm_jobs(now)
        report = SweepReport(routed, completed, queued + study_queued, skipped, failed, confirmed)
        if routed or completed or report.queued or failed or confirmed:
            logger.info(
                "sweep: %d series routed, %d complete, %d jobs queued, %d skipped, %d failed, "
                "%d confirmed",
                routed, completed, report.queued, skipped, failed, confirmed,
                extra={"action": "intake_sweep"},
            )  # fmt: skip
        return report

    # -- 1. routing --------------------------------------------------------------------------

    def _route_new_series(self, now: datetime, since: datetime | None) -> int:
        recent = true() if since is None else Series.last_received_at >= since
        # a requested study is the request's: its jobs come once all of it is retrieved, and
        # it marks the series routed (a failed request's half-received study stays unrouted)
        requested = select(StudyRequest.study_instance_uid).where(
            StudyRequest.study_instance_uid.is_not(None),
            StudyRequest.state != RequestState.DONE.value,
        )
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
                    Study.study_instance_uid.not_in(requested),
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
            read_dataset(self.storage_dir / first.path, pixels=False),
            calling_aet=first.calling_aet,
        )
        decision = self.router.route(facts, partial=True)
        if generation > 1:
            self._supersede(series_uid, study_uid)
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
                # a shadow job never sends: it carries no destination at all
                destinations=route.destinations if route.mode == "live" else (),
                level=route.level,
                mode=route.mode,
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
        routed = {
            "generation": generation, "rules_route": rules_route, "routed_at": now,
            "completed_at": None, "complete_reason": None, "covered_until": None,
            "confirm_after": None,
        }  # fmt: skip
        with self.sessions.begin() as session:  # another process may be routing it too
            row = {"series_instance_uid": series_uid, "study_instance_uid": study_uid, **routed}
            if not insert_unless_present(session, intakes, row, ["series_instance_uid"]):
                session.execute(
                    update(intakes).where(intakes.c.series_instance_uid == series_uid)
                    .values(**routed)
                )  # fmt: skip

    def _supersede(self, series_uid: str, study_uid: str) -> None:
        """New instances of a series already declared complete: the earlier generation's jobs
        that have not started, or that ran on inputs still inside their confirmation window
        (so sent nothing), are moot; the series' next job runs on all of it. Study-level jobs
        that took the series as an input likewise."""
        candidates = self.jobs.list(JobFilter(state=SUPERSEDABLE_HELD, study=study_uid), limit=1000)
        for job in candidates:
            if series_uid not in (job.series_instance_uid, *job.inputs):
                continue
            if job.state is JobState.WAITING and job.level != "series":
                continue  # a study job waiting for its series: it takes the new generation
            if job.state not in (JobState.QUEUED, JobState.WAITING) and job.confirm_after is None:
                continue  # confirmed: it sends, and the new generation's job runs as well
            within = "inside the confirmation window" if job.confirm_after else "late"
            try:
                self.jobs.cancel(
                    job.id,
                    actor=audit.NODE,
                    reason=f"superseded: new instances of its input arrived ({within})",
                )
            except JobStateError:
                continue  # it ended meanwhile
            logger.info(
                "job %s superseded: new instances of series input arrived (%s)",
                job.id,
                within,
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
            confirm = confirm_after(snapshot, verdict, rules, now)
            completed += 1
            with self.sessions.begin() as session:
                intake = session.get(SeriesIntake, series.intake_id)
                if intake is None or intake.completed_at is not None:
                    continue  # another process got there first
                intake.completed_at, intake.complete_reason = now, verdict.reason[:255]
                intake.covered_until = snapshot.last_received_at
                intake.confirm_after = confirm
            logger.info(
                "series complete (%s): %s%s",
                series.rules_route or "no route",
                verdict.reason,
                "" if confirm is None else f"; results held until {confirm:%H:%M:%S} (confirming)",
                extra={"action": "series_complete"},
            )
            q, s = self._queue_series_jobs(series, snapshot, now, confirm)
            queued, skipped = queued + q, skipped + s
        return completed, queued, skipped

    def _queue_series_jobs(
        self,
        series: _OpenSeries,
        snapshot: SeriesSnapshot,
        now: datetime,
        confirm: datetime | None,
    ) -> tuple[int, int]:
        """Route again with the final slice count; queue the routes that still match."""
        waiting = self.jobs.list(
            JobFilter(state=JobState.WAITING, series=series.series_instance_uid), limit=1000
        )
        if not waiting:
            return 0, 0
        first = self._first_instance(series.series_pk)
        facts = SeriesFacts.from_dataset(
            read_dataset(self.storage_dir / first.path, pixels=False),
            slices=snapshot.instances,
            calling_aet=first.calling_aet,
        )
        still = {route.name for route in self.router.route(facts).routes}
        queued = skipped = 0
        for job in waiting:
            if job.level != "series":
                continue
            if job.route in still:
                if self.hold is not None and self.hold(job):
                    continue  # queued once what it waits for is in
                queued += self.jobs.mark_queued(job.id, completed_at=now, confirm_after=confirm)
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
            released_at, whole, calling_aet = None, False, ""
            if last.association_pk is not None:
                association = session.get(Association, last.association_pk)
                if association is not None and association.outcome == "released":
                    released_at = association.closed_at
                    calling_aet = association.calling_aet
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
            last_calling_aet=calling_aet,
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
                inputs = list(verdict.inputs.values())
                queued += self.jobs.mark_queued(
                    job.id,
                    completed_at=now,
                    inputs=inputs,
                    confirm_after=self._inputs_confirm_after(inputs, now),
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

    def _inputs_confirm_after(self, series_uids: list[str], now: datetime) -> datetime | None:
        """The latest confirmation window among a study job's input series (None: all passed)."""
        with self.sessions() as session:
            latest = session.scalar(
                select(func.max(SeriesIntake.confirm_after)).where(
                    SeriesIntake.series_instance_uid.in_(series_uids)
                )
            )
        return latest if latest is not None and latest > now else None

    # -- 4. confirmation ---------------------------------------------------------------------

    def _confirm_jobs(self, now: datetime) -> int:
        """Release the results of jobs whose inputs' windows passed with nothing new."""
        confirmed = 0
        for job in self.jobs.held_past(now):
            inputs = job.inputs or ((job.series_instance_uid,) if job.series_instance_uid else ())
            if not all(self._unchanged(uid) for uid in inputs):
                continue  # step 1 of the next sweep re-routes the series and supersedes the job
            confirmed += self.jobs.confirm(job.id) is not None
        return confirmed

    def _unchanged(self, series_uid: str) -> bool:
        """Nothing arrived for the series since the verdict that completed it."""
        with self.sessions() as session:
            row = session.execute(
                select(SeriesIntake.covered_until, Series.last_received_at)
                .join(Series, Series.series_instance_uid == SeriesIntake.series_instance_uid)
                .where(SeriesIntake.series_instance_uid == series_uid)
            ).first()
        if row is None or row.covered_until is None:
            return False  # being routed again, or not complete
        return bool(row.last_received_at <= row.covered_until)

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
            ds = read_dataset(self.storage_dir / firsts[series.id].path, pixels=False)
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
