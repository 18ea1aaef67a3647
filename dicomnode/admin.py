"""What admins read about the node, shared by the CLI and the HTTP API: a job with its stages,
its sends and its audit trail; the models and where they run; throughput per model.

Everything here is a read over the database or the settings, returned as frozen values or
JSON-ready dicts, so the CLI's ``--json`` and the API answer the same thing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import Job
from dicomnode.domain import JobState
from dicomnode.errors import InvalidQuery, ValueOutOfRange
from dicomnode.queue.listing import JobFilter

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

    from dicomnode.config import CommandModelSettings, RouteSettings, Settings
    from dicomnode.fetch.requests import RequestRecord
    from dicomnode.inference.protocol import ModelSpec
    from dicomnode.queue.repository import JobRecord, JobRepository

#: A job's stages in order: the column that records each, as ``jobs show`` names them.
STAGES: tuple[tuple[str, str], ...] = (
    ("received", "received_at"),
    ("completed", "completed_at"),
    ("queued", "queued_at"),
    ("started", "started_at"),
    ("finished", "finished_at"),
    ("sent", "sent_at"),
)
#: The spans between stages that /metrics reports as histograms (name, from, to).
SPANS: tuple[tuple[str, str, str], ...] = (
    ("completion", "received_at", "completed_at"),  # waiting for the series to be whole
    ("queue", "queued_at", "started_at"),
    ("run", "started_at", "finished_at"),
    ("send", "finished_at", "sent_at"),
    ("total", "received_at", "sent_at"),
)
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
#: Job states that ran to the end of their run (finished_at is the run's end).
RAN = tuple(
    s.value
    for s in (
        JobState.CONFIRMING,
        JobState.REVIEW,
        JobState.SENDING,
        JobState.DONE,
        JobState.REJECTED,
    )
)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``3d``, ``1w`` before ``now``, or an ISO 8601 date or date-time (UTC when
    it names no zone). InvalidQuery names the text and what was expected."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text)
    try:
        if match:
            amount, unit = float(match.group(1)), match.group(2).lower()
            return now - timedelta(**{_UNITS[unit]: amount})
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise InvalidQuery(
                f"since {text!r} is neither a duration like 2h, 30m, 3d, 1w nor an ISO 8601 "
                "date or date-time like 2026-11-21 or 2026-11-21T08:00"
            ) from None
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (OverflowError, ValueError) as exc:  # 999999999w; year 1 at +01:00
        raise ValueOutOfRange(
            f"since {text!r} is out of range ({exc}): name a time between the years 1 and 9999"
        ) from None


def parse_states(text: str | Sequence[str] | None) -> list[str] | None:
    """Comma-separated job states, checked; InvalidQuery lists the states there are."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [part.strip() for part in parts if part.strip()]
    known = [state.value for state in JobState]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidQuery(f"unknown job state(s) {unknown}; expected some of {known}")
    return names or None


@dataclass(frozen=True)
class Stage:
    """One stage a job went through, and when (None: not yet, or skipped)."""

    name: str
    at: datetime | None


def job_stages(job: JobRecord) -> list[Stage]:
    return [Stage(name, getattr(job, column)) for name, column in STAGES]


def request_detail(jobs: JobRepository, record: RequestRecord) -> dict[str, Any]:
    """A request as the API and ``analyze --json`` show it: its columns (progress per series,
    the instances still missing) and a summary of each job it made."""
    from dicomnode.domain import RequestState
    from dicomnode.fetch.requests import live_progress

    values = record.as_json()
    values.pop("query", None)
    if record.state in (RequestState.PENDING, RequestState.RETRIEVING, RequestState.PARTIAL,
                        RequestState.FAILED):  # fmt: skip
        with jobs.sessions() as session:
            values["progress"] = live_progress(session, record.progress)
    values["jobs"] = [
        job_summary(job) for job in (jobs.get(job_id) for job_id in record.job_ids) if job
    ]
    return values


def job_summary(job: JobRecord) -> dict[str, Any]:
    """A job for a listing: its values without the (possibly large) result, its stages."""
    values = job.as_json()
    values.pop("result", None)
    values["stages"] = {stage.name: _iso(stage.at) for stage in job_stages(job)}
    return values


def job_detail(sessions: sessionmaker[Session], job: JobRecord) -> dict[str, Any]:
    """Everything ``jobs show`` prints: the job, its stages, what was sent where, who was told
    (its notifications, without their content), its audit."""
    from dicomnode.audit import list_events
    from dicomnode.queue.notifications import NotificationQueue
    from dicomnode.queue.sends import SendQueue

    values = job.as_json()
    values["stages"] = {stage.name: _iso(stage.at) for stage in job_stages(job)}
    values["sends"] = [
        {
            "destination": send.destination,
            "kind": send.kind,
            "state": send.state,
            "attempts": send.attempts,
            "last_error": send.last_error,
            "sop_instance_uid": send.sop_instance_uid,
            "sent_at": _iso(send.sent_at),
        }
        for send in SendQueue(sessions).for_job(job.id)
    ]
    values["notifications"] = [
        {
            "notification": n.notification,
            "kind": n.kind,
            "event": n.event,
            "state": n.state,
            "attempts": n.attempts,
            "last_error": n.last_error,
            "delivery_id": n.delivery_key,
            "sent_at": _iso(n.sent_at),
        }
        for n in NotificationQueue(sessions).for_job(job.id)
    ]
    with sessions() as session:
        events, _ = list_events(session, job_id=job.id, limit=200)
    values["audit"] = [{**asdict(e), "at": _iso(e.at)} for e in reversed(events)]
    return values


def list_jobs(
    jobs: JobRepository,
    *,
    state: str | Sequence[str] | None = None,
    model: str | None = None,
    study: str | None = None,
    accession: str | None = None,
    patient_id: str | None = None,
    since: str | datetime | None = None,
    limit: int = 50,
    offset: int = 0,
    with_total: bool = True,
) -> tuple[list[JobRecord], int | None]:
    """One page of jobs, newest first, and how many match the filters in all (None without
    ``with_total``: the count is a second query, which the CLI's listing does not print)."""
    if limit < 1 or limit > 1000 or offset < 0:
        raise InvalidQuery(f"limit {limit} / offset {offset}: expected 1..1000 and >= 0")
    where = JobFilter(
        state=parse_states(state),
        model=model or None,
        study=study or None,
        accession=accession or None,
        patient_id=patient_id or None,
        since=parse_since(since) if isinstance(since, str) and since else since or None,
    )
    page = jobs.list(where, limit=limit, offset=offset)
    if not with_total:
        return page, None
    if len(page) < limit and (page or not offset):  # the last page: no need to count
        return page, offset + len(page)
    return page, jobs.count(where)


# -- models ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSummary:
    """One row of ``models list``: what a model is, what it accepts and where it runs."""

    name: str
    version: str
    demo: bool
    level: str
    modalities: tuple[str, ...]
    min_slices: int
    inputs: tuple[str, ...]  # study level: the series it takes by name
    labels: tuple[str, ...]
    devices: tuple[str, ...]  # the configured workers that run it
    source: str  # "package", "bundle", "command" or "builtin"
    description: str
    #: what runs: "package", "bundle" (a package whose network a MONAI bundle replaces, or a
    #: bundle alone), "command" or "builtin"
    kind: str = "package"
    #: sha256 of what the model runs: its weights (packages: the sha256s model.toml names,
    #: which the registry checks before every load; bundles: their weights file), or of its
    #: command (argv, environment, contract); None for builtins and packages without weights
    digest: str | None = None


def model_summaries(settings: Settings, builtins: Iterable[str] = ()) -> list[ModelSummary]:
    """The models the settings' folders, bundles and commands provide, and the ``builtins``
    (job models without a package: the tests'); reads model.toml files (and hashes a bundle's
    weights file once per change)."""
    from dicomnode.inference.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    commands = settings.models.commands
    out = []
    for name in sorted({*registry.names(), *builtins, *commands}):
        devices = tuple(
            dict.fromkeys(w.device for w in settings.workers if not w.models or name in w.models)
        )
        spec = registry.packages.get(name)
        if name in commands and spec is None:
            command = commands[name]
            out.append(
                ModelSummary(name, command.version, False, "series", (), 1, (), (), devices,
                             "command", f"{_runs(command)} ({command.contract} contract)",
                             kind="command", digest=command_digest(command))
            )  # fmt: skip
            continue
        if spec is None:
            out.append(
                ModelSummary(name, "builtin", False, "series", (), 1, (), (), devices,
                             "builtin", "test model: runs without the inference runtime",
                             kind="builtin")
            )  # fmt: skip
            continue
        info, accepts = spec.info, spec.info.accepts
        kind = "bundle" if spec.bundle is not None else "package"
        out.append(
            ModelSummary(
                name=name,
                version=info.version,
                demo=info.demo and spec.bundle is None,
                level=accepts.level,
                modalities=tuple(accepts.modalities),
                min_slices=accepts.min_slices,
                inputs=tuple(accepts.inputs),
                labels=tuple(label.name for label in info.labels),
                devices=devices,
                source=kind,
                description=info.description,
                kind=kind,
                digest=package_digest(spec),
            )
        )
    return out


def package_digest(spec: ModelSpec) -> str | None:
    """The sha256 of a package's weights: of its bundle's weights file when a bundle replaces
    its network, else the one sha256 model.toml names (several files: the sha256 of their
    ``key=sha256`` lines, sorted); None without weights."""
    if spec.bundle is not None:
        from dicomnode.inference.bundle import bundle_layout

        return file_digest(bundle_layout(spec.bundle).weights)
    weights = spec.info.weights
    if not weights:
        return None
    if len(weights) == 1:
        return next(iter(weights.values())).sha256.lower()
    lines = "".join(f"{key}={w.sha256.lower()}\n" for key, w in sorted(weights.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _runs(command: CommandModelSettings) -> str:
    """What a command model runs, in a few words: its image, or its program."""
    if command.image:
        return f"image: {command.image}"
    return f"command: {command.command[0]}"


def command_digest(command: CommandModelSettings) -> str:
    """The sha256 of what a command model runs: its image or argv, environment and contract,
    as JSON."""
    text = json.dumps(
        {
            "image": command.image,
            "command": list(command.command),
            "environment": dict(sorted(command.environment.items())),
            "contract": command.contract,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """The sha256 of a file, remembered while its size and modification time stay the same."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, _size: int, _mtime_ns: int) -> str:
    from dicomnode.inference.weights import sha256_of

    return sha256_of(Path(path))


# -- throughput ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelThroughput:
    """Jobs per model that finished their run in a window, and how long their runs took."""

    model: str
    finished: int
    failed: int
    jobs_per_hour: float
    mean_run_s: float | None
    mean_total_s: float | None  # received to finished


def seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[float]:
    """``end - start`` in seconds, in SQL (SQLite keeps times as text, PostgreSQL as times)."""
    if dialect == "sqlite":  # julianday's doubles resolve ~50 us today: round to the ms
        return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)
    # SQLAlchemy types EXTRACT as an integer; the epoch of an interval has fractional seconds
    return cast("ColumnElement[float]", func.extract("epoch", end - start))


def throughput(
    session: Session, *, window: timedelta = timedelta(hours=24)
) -> list[ModelThroughput]:
    """Per model over the last ``window``: jobs that ran, jobs that failed, mean durations."""
    since = datetime.now(UTC) - window
    dialect = session.get_bind().dialect.name
    # The window's jobs first, found by the finish-time index (materialised: SQLite would
    # otherwise walk the model index for the GROUP BY, over every job ever run).
    recent = (
        select(Job.model, Job.state, Job.received_at, Job.started_at, Job.finished_at)
        .where(Job.finished_at >= since, Job.model != "")
        .cte("recent")
        .prefix_with("MATERIALIZED")
    )
    run = seconds_between(dialect, recent.c.started_at, recent.c.finished_at)
    total = seconds_between(dialect, recent.c.received_at, recent.c.finished_at)
    ran = recent.c.state.in_(RAN)
    rows = session.execute(
        select(
            recent.c.model,
            func.count().filter(ran),
            func.count().filter(recent.c.state == JobState.FAILED.value),
            func.avg(run).filter(ran),
            func.avg(total).filter(ran),
        )
        .group_by(recent.c.model)
        .order_by(recent.c.model)
    ).all()
    hours = window.total_seconds() / 3600
    return [
        ModelThroughput(
            model=model,
            finished=int(done),
            failed=int(failed),
            jobs_per_hour=round(done / hours, 3),
            mean_run_s=None if mean_run is None else round(float(mean_run), 3),
            mean_total_s=None if mean_total is None else round(float(mean_total), 3),
        )
        for model, done, failed, mean_run, mean_total in rows
    ]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- shadow routes: how a shadow model agrees with the live one ----------------------------------


def compare_routes(
    sessions: sessionmaker[Session],
    storage_dir: Path,
    live: str,
    shadow: str,
    since: str | datetime | None = None,
) -> dict[str, Any]:
    """``models compare LIVE SHADOW``: the two routes' finished jobs paired by input (the same
    study and series; the newest run of each side), and their agreement (see
    :mod:`dicomnode.results.agreement`). ``live`` and ``shadow`` are route names."""
    from dicomnode.inference.findings import read_mask
    from dicomnode.results.agreement import compare_results

    start = parse_since(since) if isinstance(since, str) and since else since or None
    runs: dict[str, dict[tuple[str, str], tuple[int, dict[str, Any]]]] = {live: {}, shadow: {}}
    query = select(
        Job.id, Job.route, Job.study_instance_uid, Job.series_instance_uid, Job.result
    ).where(Job.route.in_([live, shadow]), Job.state.in_(RAN))
    if start is not None:
        query = query.where(Job.finished_at >= start)
    with sessions() as session:
        for job_id, route, study, series, result in session.execute(query.order_by(Job.id)):
            if result:  # the newest run of an input wins (ids ascend)
                runs[route][(study, series or "")] = (job_id, result)
    shared = sorted(set(runs[live]) & set(runs[shadow]))
    masks: dict[str, Any] = {}

    def mask_of(finding: Any) -> Any:
        ref, entry = finding.get("mask") or {}, finding.get("_mask_entry")
        if not entry:
            return None
        path = storage_dir / entry["path"]
        if str(path) not in masks:
            masks[str(path)] = read_mask(path) if path.is_file() else None
        array = masks[str(path)]
        return None if array is None else array == int(ref.get("value", 1))

    def with_masks(result: dict[str, Any]) -> dict[str, Any]:
        """Each finding with the saved mask it refers to (``results/<job id>/<name>.npz``)."""
        entries = result.get("masks") or {}
        findings = [
            {**f, "_mask_entry": entries.get((f.get("mask") or {}).get("name", ""))}
            for f in result.get("findings") or ()
        ]
        return {**result, "findings": findings}

    pairs = [(with_masks(runs[live][key][1]), with_masks(runs[shadow][key][1])) for key in shared]
    numbers = compare_results(pairs, mask_of)
    return {
        "live": live,
        "shadow": shadow,
        "since": _iso(start),
        "live_jobs": len(runs[live]),
        "shadow_jobs": len(runs[shadow]),
        **numbers.as_json(),
        # job ids only: the inputs' UIDs are in the jobs, behind the API's phi role
        "pairs": [
            {"live_job": runs[live][key][0], "shadow_job": runs[shadow][key][0]} for key in shared
        ],
    }


def compare_shadow_routes(
    sessions: sessionmaker[Session],
    storage_dir: Path,
    routes: Sequence[RouteSettings],
    since: str | datetime | None = None,
) -> list[dict[str, Any]]:
    """Every shadow route of the config against every live route it shares inputs with (the
    dashboard's table): :func:`compare_routes` for each such pair, by route order."""
    shadows = [route.name for route in routes if route.mode == "shadow"]
    lives = [route.name for route in routes if route.mode == "live"]
    found = []
    for shadow in shadows:
        for live in lives:
            numbers = compare_routes(sessions, storage_dir, live, shadow, since)
            if numbers["inputs"]:
                found.append(numbers)
    return found
