"""A retrieved study's jobs: by the request's route (its match picks the series, as for a
pushed study), by a model (what the model accepts picks them), or by the node's own routes.

The jobs are made queued at once, every instance the source listed being in: a retrieved study
needs no completion rule. Its series get their intake rows here too, complete, so the intake
never routes them again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.completion import StudySeries, recognise, recognition_text
from dicomnode.config import CompletionSettings, RouteSettings
from dicomnode.db.models import Instance, Series, SeriesIntake, Study
from dicomnode.db.session import insert_unless_present
from dicomnode.domain import JobState, Priority
from dicomnode.errors import ConfigError
from dicomnode.imaging.frames import read_dataset
from dicomnode.routing import MatchedRoute, Outcome, Router, SeriesFacts

if TYPE_CHECKING:
    from dicomnode.config import Settings
    from dicomnode.fetch.requests import RequestRecord
    from dicomnode.queue.records import JobRecord
    from dicomnode.queue.repository import JobRepository

logger = logging.getLogger(__name__)

intakes = cast(Table, SeriesIntake.__table__)
#: the route name of the jobs of a request that names a model rather than a route
MODEL_ROUTE = "request"


@dataclass(frozen=True)
class _Series:
    uid: str
    instances: int
    first_received_at: datetime
    last_received_at: datetime
    path: str  # its first instance, relative to the storage directory
    calling_aet: str


@dataclass(frozen=True)
class Plan:
    """The jobs a retrieved study made; ``reason`` says why none, when none."""

    jobs: tuple[JobRecord, ...]
    reason: str = ""


def model_route(settings: Settings, model: str) -> RouteSettings:
    """A route for a request that names a model: its series are those the model accepts
    (modality, body part, slices), at the model's level."""
    match: dict[str, Any] = {}
    level = "series"
    inputs: Mapping[str, str] = {}
    accepts: Any = None
    if model in settings.models.commands:
        accepts = settings.models.commands[model].accepts
    else:
        from dicomnode.inference.registry import ModelRegistry

        registry = ModelRegistry.from_settings(settings)
        if model in registry:
            accepts = registry.spec(model).info.accepts
            level, inputs = accepts.level, accepts.inputs
    if accepts is not None:
        if accepts.modalities:
            match["Modality"] = list(accepts.modalities)
        if accepts.body_parts:
            match["BodyPartExamined"] = list(accepts.body_parts)
        if accepts.min_slices > 1:
            match["slices"] = {"min": accepts.min_slices}
    return RouteSettings(
        name=MODEL_ROUTE, model=model, match=match, level=level,
        completion=CompletionSettings(required_series=dict(inputs)),
    )  # fmt: skip


class Analysis:
    """Makes the jobs of retrieved studies, and marks their series routed."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        jobs: JobRepository,
        storage_dir: Path,
        *,
        hold: Callable[[JobRecord, str | None], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.jobs = jobs
        self.storage_dir = storage_dir.resolve()
        #: asked of a job whose route takes priors, with the request's source: True when it
        #: waits for them (queued once they are in: :mod:`.priors`), False to queue it at once
        self.hold = hold

    def router(self, record: RequestRecord) -> tuple[Router, dict[str, RouteSettings]]:
        if record.route is not None:
            route = self.settings.route(record.route)
            return Router.from_routes([route]), {route.name: route}
        if record.model is not None:
            route = model_route(self.settings, record.model)
            return Router.from_routes([route]), {route.name: route}
        router = Router.from_settings(self.settings)
        return router, {route.name: route for route in self.settings.routes}

    def plan(self, record: RequestRecord, study_uid: str, *, actor: str) -> Plan:
        """Jobs for the study's series (queued, or held for their priors) at the request's
        priority; the series marked routed."""
        try:
            router, routes = self.router(record)
        except ConfigError as exc:
            return Plan((), exc.message)
        series = self._series(study_uid)
        if not series:
            return Plan((), f"the index holds no series of study {study_uid}")
        matched: dict[str, list[tuple[_Series, MatchedRoute]]] = {}
        reasons: list[str] = []
        for item in series:
            facts = SeriesFacts.from_dataset(
                read_dataset(self.storage_dir / item.path, pixels=False),
                slices=item.instances,
                calling_aet=item.calling_aet,
            )
            decision = router.route(facts)
            for route in decision.routes:
                matched.setdefault(route.name, []).append((item, route))
            if decision.skipped:
                failed = [
                    check.text
                    for rule in router.explain(facts)
                    for check in rule.conditions
                    if check.outcome is not Outcome.MATCH
                ]
                reasons.append(f"series {item.uid}: " + ("; ".join(failed) or "no route"))
        made: list[JobRecord] = []
        for name, items in matched.items():
            made += self._jobs(record, routes[name], items, actor=actor)
        self._mark_routed(series, record)
        if not made:
            what = (f"route {record.route!r}" if record.route else
                    f"model {record.model!r}" if record.model else "the node's routes")  # fmt: skip
            return Plan((), f"no series of the study matches {what}: " + " | ".join(reasons))
        return Plan(tuple(made))

    def _jobs(
        self,
        record: RequestRecord,
        route: RouteSettings,
        items: Sequence[tuple[_Series, MatchedRoute]],
        *,
        actor: str,
    ) -> list[JobRecord]:
        first = items[0][1]
        received = min(item.first_received_at for item, _ in items)
        enqueue = functools.partial(
            self.jobs.enqueue,
            route=route.name,
            model=route.model,
            study_instance_uid=record.study_instance_uid or "",
            destinations=first.destinations if first.mode == "live" else (),
            level=route.level,
            mode=first.mode,
            priority=int(record.priority if record.priority is not None else Priority.ROUTINE),
            received_at=received,
            actor=actor,
        )
        if route.level == "study":
            inputs = self._study_inputs(route, [item for item, _ in items])
            if not inputs:
                return []
            key = f"request:{record.id}|{route.name}|{record.study_instance_uid}"
            return [self._queue(enqueue(dedupe_key=key, inputs=inputs), route, record)]
        return [
            self._queue(
                enqueue(
                    dedupe_key=f"request:{record.id}|{route.name}|{item.uid}",
                    series_instance_uid=item.uid,
                    inputs=[item.uid],
                ),
                route,
                record,
            )
            for item, _ in items
        ]

    def _queue(self, job: JobRecord, route: RouteSettings, record: RequestRecord) -> JobRecord:
        """Enqueued waiting: queued now, unless its priors are to come first."""
        if job.state is not JobState.WAITING:
            return job  # made by an earlier run of this plan
        if route.priors is not None and self.hold is not None and self.hold(job, record.source):
            return job
        self.jobs.mark_queued(job.id)
        return self.jobs.get(job.id) or job

    def _study_inputs(self, route: RouteSettings, items: Sequence[_Series]) -> list[str]:
        patterns = route.completion.required_series
        if not patterns:
            return [item.uid for item in items]
        candidates = []
        for item in items:
            ds = read_dataset(self.storage_dir / item.path, pixels=False)
            text = recognition_text(
                str(ds.get("SeriesDescription", "")),
                str(ds.get("ProtocolName", "")),
                str(ds.get("SequenceName", "")),
                contrast=bool(str(ds.get("ContrastBolusAgent", "")).strip()),
            )
            candidates.append(StudySeries(item.uid, text, True, item.last_received_at))
        found = recognise(candidates, patterns)
        missing = [name for name in patterns if name not in found]
        if not found or (missing and route.completion.on_missing == "fail"):
            return []
        return list(found.values())

    def _series(self, study_uid: str) -> list[_Series]:
        with self.sessions() as session:
            rows = session.execute(
                select(Series).join(Study, Series.study_pk == Study.id)
                .where(Study.study_instance_uid == study_uid).order_by(Series.id)
            ).scalars().all()  # fmt: skip
            found = []
            for series in rows:
                instances = session.execute(
                    select(Instance.path, Instance.calling_aet)
                    .where(Instance.series_pk == series.id)
                    .order_by(Instance.received_at, Instance.id)
                ).all()
                if not instances:
                    continue
                found.append(
                    _Series(
                        series.series_instance_uid,
                        len(instances),
                        series.first_received_at,
                        series.last_received_at,
                        instances[0].path,
                        instances[0].calling_aet,
                    )
                )
        return found

    def mark_study_routed(self, record: RequestRecord, study_uid: str) -> None:
        """A study retrieved for no analysis (a prior): its series marked routed, no job."""
        self._mark_routed(self._series(study_uid), record)

    def _mark_routed(self, series: Sequence[_Series], record: RequestRecord) -> None:
        """Each series complete in the intake's eyes (what arrived is covered), so the intake
        neither routes it again nor takes a retrieved instance for a late one."""
        now = self.jobs.now()
        with self.sessions.begin() as session:
            for item in series:
                row = {
                    "series_instance_uid": item.uid,
                    "study_instance_uid": record.study_instance_uid or "",
                    "generation": 1,
                    "rules_route": record.route,
                    "routed_at": now,
                    "completed_at": now,
                    "complete_reason": f"retrieved by request {record.id}",
                    "covered_until": item.last_received_at,
                    "confirm_after": None,
                }
                if not insert_unless_present(session, intakes, row, ["series_instance_uid"]):
                    session.execute(
                        update(intakes)
                        .where(intakes.c.series_instance_uid == item.uid,
                               intakes.c.completed_at.is_not(None),
                               intakes.c.covered_until < item.last_received_at)
                        .values(covered_until=item.last_received_at)
                    )  # fmt: skip
