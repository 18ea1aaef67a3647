"""The requests table: studies asked of a source, what arrived of them, and the jobs they made.

Each method is one short transaction and returns frozen values, as the job repository does. A
client's ``transaction_id`` names one request: asked again, the same request comes back (and a
different ask under the same id is a conflict), so a client may repeat a POST it is unsure of.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Self, cast

from sqlalchemy import Row, Table, case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import audit
from dicomnode.db.models import Instance, Series, StudyRequest
from dicomnode.db.session import insert_unless_present, rowcount
from dicomnode.domain import Priority, RequestState
from dicomnode.errors import ConfigError, InvalidQuery, RequestConflict, RequestNotFound
from dicomnode.queue.delivery import utc_now

if TYPE_CHECKING:
    from dicomnode.config import RouteSettings, Settings

logger = logging.getLogger(__name__)

requests_table = cast(Table, StudyRequest.__table__)
#: states a request is worked on in (by the runner), or waits in for its next attempt
DUE_STATES = (RequestState.PENDING, RequestState.PARTIAL)
MAX_ERROR_CHARS = 4000
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_ACCESSION = re.compile(r"^[^\x00-\x1f\x7f\\*?]{1,64}$")
PRIORITIES = {p.name.lower(): p for p in Priority}


@dataclass(frozen=True)
class RequestRecord:
    """One row of the requests table, as values."""

    id: int
    client: str
    transaction_id: str | None
    purpose: str
    source: str
    study_instance_uid: str | None
    accession_number: str | None
    route: str | None
    model: str | None
    priority: int
    state: RequestState
    progress: dict[str, Any] | None
    query: dict[str, Any] | None
    error: str | None
    job_ids: tuple[int, ...]
    for_job: int | None
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    retrieved_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> Self:
        values = {field.name: row._mapping[field.name] for field in fields(cls)}
        values["state"] = RequestState(values["state"])
        values["job_ids"] = tuple(values["job_ids"] or ())
        return cls(**values)

    def as_json(self) -> dict[str, Any]:
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        values["state"] = self.state.value
        values["priority"] = Priority(self.priority).name.lower()
        values["job_ids"] = list(self.job_ids)
        for key, value in values.items():
            if isinstance(value, datetime):
                values[key] = value.isoformat()
        return values


@dataclass(frozen=True)
class RequestSpec:
    """What a client asks: a study (by UID or accession number) on a source, analysed by a
    route, by a model, or by the node's routes (neither), at a priority."""

    source: str
    study_instance_uid: str | None = None
    accession_number: str | None = None
    route: str | None = None
    model: str | None = None
    priority: Priority | None = None
    transaction_id: str | None = None
    purpose: str = "analyze"

    def checked(self, settings: Settings, models: Sequence[str] | None = None) -> RequestSpec:
        """This ask against the configuration: InvalidQuery naming what is wrong (no study,
        both route and model, an unknown source, route or model); the priority resolved
        (given, else the route's, else routine)."""
        if (self.study_instance_uid is None) == (self.accession_number is None):
            raise InvalidQuery("give exactly one of a Study Instance UID and an accession number")
        uid = self.study_instance_uid
        if uid is not None and (len(uid) > 64 or not _UID.match(uid)):
            raise InvalidQuery(
                f"Study Instance UID {self.study_instance_uid!r} is not digits and dots, at most "
                "64 characters"
            )
        if self.accession_number is not None and not _ACCESSION.match(self.accession_number):
            raise InvalidQuery(
                "the accession number must be 1 to 64 printable characters without a wildcard "
                "(*, ?) or a backslash"
            )
        route = check_analysis(settings, self.source, self.route, self.model, models)
        priority = self.priority
        if priority is None:
            priority = Priority[route.priority.upper()] if route is not None else Priority.ROUTINE
        return RequestSpec(
            self.source, self.study_instance_uid, self.accession_number, self.route,
            self.model, priority, self.transaction_id, self.purpose,
        )  # fmt: skip


def check_analysis(
    settings: Settings,
    source: str,
    route: str | None,
    model: str | None,
    models: Sequence[str] | None = None,
) -> RouteSettings | None:
    """InvalidQuery naming an unknown source, route or model, or both a route and a model;
    the route's settings when one is named."""
    if route is not None and model is not None:
        raise InvalidQuery("give a route or a model, not both")
    try:
        settings.source(source)
        found = settings.route(route) if route is not None else None
    except ConfigError as exc:
        raise InvalidQuery(exc.message) from None
    if model is not None and models is not None and model not in models:
        raise InvalidQuery(f"no model {model!r} is available (models: {', '.join(sorted(models))})")
    return found


def default_source(settings: Settings) -> str:
    """The one configured source; InvalidQuery when there are none or several."""
    names = [s.name for s in settings.sources]
    if len(names) != 1:
        raise InvalidQuery(
            f"name the source (sources: {', '.join(names)})"
            if names
            else "no [[sources]] is configured: the node has no PACS to ask"
        )
    return names[0]


def known_models(settings: Settings, builtins: Sequence[str] = ()) -> list[str]:
    """Every model a request may name: packages, bundles, command models, ``builtins``."""
    from dicomnode.inference.registry import ModelRegistry

    names = ModelRegistry.from_settings(settings).names()
    return sorted({*names, *builtins, *settings.models.commands})


def parse_priority(text: str) -> Priority:
    try:
        return PRIORITIES[text.lower()]
    except KeyError:
        raise InvalidQuery(f"priority {text!r} is not one of {', '.join(PRIORITIES)}") from None


class RequestRepository:
    """The requests table over the node's session factory."""

    def __init__(
        self, sessions: sessionmaker[Session], *, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.sessions = sessions
        self._clock = clock

    def now(self) -> datetime:
        return self._clock().astimezone(UTC)

    # -- asking ------------------------------------------------------------------------------

    def submit(
        self,
        spec: RequestSpec,
        *,
        client: str,
        max_attempts: int,
        query: Mapping[str, Any] | None = None,
        for_job: int | None = None,
    ) -> tuple[RequestRecord, bool]:
        """Record the ask; (the request, True) when new, (the one ``transaction_id`` already
        names, False) when asked before. RequestConflict when that one asked otherwise."""
        now = self.now()
        values: dict[str, Any] = {
            "client": client[:128],
            "transaction_id": spec.transaction_id,
            "purpose": spec.purpose,
            "source": spec.source,
            "study_instance_uid": spec.study_instance_uid,
            "accession_number": spec.accession_number,
            "route": spec.route,
            "model": spec.model,
            "priority": int(spec.priority or Priority.ROUTINE),
            "state": RequestState.PENDING.value,
            "query": dict(query) if query is not None else None,
            "job_ids": [],
            "for_job": for_job,
            "attempts": 0,
            "max_attempts": max_attempts,
            "created_at": now,
            "updated_at": now,
        }
        with self.sessions.begin() as session:
            if spec.transaction_id is None:
                pk = session.execute(
                    requests_table.insert().values(**values).returning(requests_table.c.id)
                ).scalar_one()
                row = session.execute(select(requests_table).where(requests_table.c.id == pk)).one()
                created = True
            else:
                created = insert_unless_present(
                    session, requests_table, values, ["client", "transaction_id"]
                )
                row = session.execute(
                    select(requests_table).where(
                        requests_table.c.client == values["client"],
                        requests_table.c.transaction_id == spec.transaction_id,
                    )
                ).one()
            record = RequestRecord.from_row(row)
            if created:
                audit.add_event(
                    session, client, "requested", study_instance_uid=spec.study_instance_uid,
                    detail=f"request {record.id}: {spec.purpose} from {spec.source}", at=now,
                )  # fmt: skip
        if not created:
            asked = (spec.source, spec.study_instance_uid, spec.accession_number, spec.route,
                     spec.model, spec.purpose)  # fmt: skip
            held = (record.source, record.study_instance_uid, record.accession_number,
                    record.route, record.model, record.purpose)  # fmt: skip
            if asked != held:
                raise RequestConflict(
                    f"transaction id {spec.transaction_id!r} already names request {record.id}, "
                    "which asks for another study, source or analysis"
                )
            return record, False
        logger.info(
            "request %s: %s from %s (%s)",
            record.id,
            spec.purpose,
            spec.source,
            "by study UID" if spec.study_instance_uid else "by accession number",
            extra={"action": "request_submitted", "request_id": record.id},
        )
        return record, True

    # -- reading ------------------------------------------------------------------------------

    def get(self, request_id: int) -> RequestRecord:
        with self.sessions() as session:
            row = session.execute(
                select(requests_table).where(requests_table.c.id == request_id)
            ).first()
        if row is None:
            raise RequestNotFound(f"no request {request_id}")
        return RequestRecord.from_row(row)

    def find(self, client: str, transaction_id: str) -> RequestRecord | None:
        """The request ``client`` made under ``transaction_id``, if any."""
        with self.sessions() as session:
            row = session.execute(
                select(requests_table).where(
                    requests_table.c.client == client,
                    requests_table.c.transaction_id == transaction_id,
                )
            ).first()
        return None if row is None else RequestRecord.from_row(row)

    def last_made(self, client: str, source: str) -> datetime | None:
        """When ``client`` last made a request of ``source`` (a backfill's pace across runs)."""
        with self.sessions() as session:
            return session.scalar(
                select(func.max(requests_table.c.created_at)).where(
                    requests_table.c.client == client, requests_table.c.source == source
                )
            )

    def due(self, *, limit: int = 100) -> list[RequestRecord]:
        """Requests to work on now: pending, or partial and past their backoff; most urgent
        first, a backfill's after the others of its priority, then oldest."""
        now = self.now()
        due = requests_table.c.next_attempt_at.is_(None) | (requests_table.c.next_attempt_at <= now)
        with self.sessions() as session:
            rows = session.execute(
                select(requests_table)
                .where(requests_table.c.state.in_([s.value for s in DUE_STATES]), due)
                .order_by(
                    requests_table.c.priority.desc(),
                    case((requests_table.c.purpose == "backfill", 1), else_=0),
                    requests_table.c.id,
                )
                .limit(limit)
            ).all()
        return [RequestRecord.from_row(row) for row in rows]

    def in_state(self, state: RequestState, *, limit: int = 1000) -> list[RequestRecord]:
        with self.sessions() as session:
            rows = session.execute(
                select(requests_table).where(requests_table.c.state == state.value)
                .order_by(requests_table.c.id).limit(limit)
            ).all()  # fmt: skip
        return [RequestRecord.from_row(row) for row in rows]

    def for_job(self, job_id: int, purpose: str) -> list[RequestRecord]:
        with self.sessions() as session:
            rows = session.execute(
                select(requests_table).where(
                    requests_table.c.for_job == job_id, requests_table.c.purpose == purpose
                ).order_by(requests_table.c.id)
            ).all()  # fmt: skip
        return [RequestRecord.from_row(row) for row in rows]

    # -- changing -----------------------------------------------------------------------------

    def start(self, request_id: int) -> bool:
        """A due request taken to work on: retrieving, one attempt more. False when another
        runner took it (or it is no longer due)."""
        now = self.now()
        with self.sessions.begin() as session:
            taken = rowcount(
                session,
                update(requests_table)
                .where(
                    requests_table.c.id == request_id,
                    requests_table.c.state.in_([s.value for s in DUE_STATES]),
                )
                .values(
                    state=RequestState.RETRIEVING.value,
                    attempts=requests_table.c.attempts + 1,
                    next_attempt_at=None,
                    updated_at=now,
                ),
            )
        return bool(taken)

    def set(self, request_id: int, **values: Any) -> RequestRecord:
        """Change a request's columns (``state`` as a RequestState; ``error`` clipped)."""
        now = self.now()
        if isinstance(values.get("state"), RequestState):
            values["state"] = values["state"].value
            if values["state"] in (RequestState.DONE.value, RequestState.FAILED.value):
                values.setdefault("finished_at", now)
        if values.get("error"):
            values["error"] = str(values["error"])[:MAX_ERROR_CHARS]
        with self.sessions.begin() as session:
            session.execute(
                update(requests_table)
                .where(requests_table.c.id == request_id)
                .values(updated_at=now, **values)
            )
        return self.get(request_id)

    def retry(self, request_id: int, *, actor: str) -> RequestRecord:
        """A failed or partial request tried again at once, with its attempts anew; what
        arrived stays (only what is missing is asked for)."""
        record = self.get(request_id)
        if record.state not in (RequestState.FAILED, RequestState.PARTIAL):
            from dicomnode.errors import JobStateError

            raise JobStateError(
                f"request {request_id} is {record.state.value}: only a failed or partial "
                "request is tried again"
            )
        audit.record_event(self.sessions, actor, "request_retry", detail=f"request {request_id}")
        return self.set(
            request_id, state=RequestState.PARTIAL, attempts=0, next_attempt_at=None,
            finished_at=None,
        )  # fmt: skip

    def backoff(self, record: RequestRecord, backoff_s: float, max_backoff_s: float) -> datetime:
        """When the next attempt of ``record`` (after its ``attempts``-th) is due."""
        wait = min(max_backoff_s, backoff_s * 2 ** min(max(record.attempts - 1, 0), 30))
        return self.now() + timedelta(seconds=wait)


def indexed_counts(session: Session, series_uids: Sequence[str]) -> dict[str, int]:
    """Series UID -> instances the index holds of it (absent: none)."""
    if not series_uids:
        return {}
    rows = session.execute(
        select(Series.series_instance_uid, func.count(Instance.id))
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.series_instance_uid.in_(list(series_uids)))
        .group_by(Series.series_instance_uid)
    ).all()
    return {str(uid): int(count) for uid, count in rows}


def indexed_instances(session: Session, series_uid: str) -> set[str]:
    """The SOP Instance UIDs the index holds of one series."""
    return set(
        session.scalars(
            select(Instance.sop_instance_uid)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
        )
    )


def live_progress(session: Session, progress: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A request's progress as the index has it now: instances that arrived since it was
    recorded (a C-MOVE sub-operation the source sent as it went down) count as received."""
    if not progress or "series" not in progress:
        return dict(progress) if progress else None
    series = []
    for entry in progress["series"]:
        entry = dict(entry)
        missing = entry.get("missing_instances") or []
        if missing:
            have = indexed_instances(session, entry["series_instance_uid"])
            entry["missing_instances"] = [sop for sop in missing if sop not in have]
            entry["received"] = int(entry["expected"] or 0) - len(entry["missing_instances"])
        series.append(entry)
    return {
        **progress,
        "series": series,
        "received": sum(int(e["received"] or 0) for e in series),
    }
