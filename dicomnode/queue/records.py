"""A job as values: one row of the jobs table, frozen, so it crosses threads and processes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Self

from sqlalchemy import Row

from dicomnode.domain import FINAL_STATES, JobState, Priority


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table, as values."""

    id: int
    dedupe_key: str
    route: str
    model: str
    level: str
    state: JobState
    priority: int
    study_instance_uid: str
    series_instance_uid: str | None
    inputs: tuple[str, ...]
    destinations: tuple[str, ...]
    attempts: int
    max_attempts: int
    run_after: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    error: str | None
    result: dict[str, Any] | None
    received_at: datetime
    completed_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    sent_at: datetime | None
    updated_at: datetime
    #: results held until then, the inputs' confirmation window (None: confirmed)
    confirm_after: datetime | None = None
    #: "live", or "shadow": results kept, never sent
    mode: str = "live"

    @classmethod
    def from_row(cls, row: Row[Any]) -> Self:
        """The record of a row of the jobs table (every column, as the table returns them)."""
        values = {field.name: row._mapping[field.name] for field in fields(cls)}
        values["state"] = JobState(values["state"])
        values["inputs"] = tuple(values["inputs"] or ())
        values["destinations"] = tuple(values["destinations"] or ())
        return cls(**values)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def as_json(self) -> dict[str, Any]:
        """JSON-ready values: times in ISO 8601, tuples as lists, the priority by name too."""
        values: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, JobState):
                value = str(value)
            values[field.name] = value
        values["priority_name"] = priority_name(self.priority)
        return values


@dataclass(frozen=True)
class ClaimedJob(JobRecord):
    """A job this worker holds under a lease (state ``running``, ``attempts`` counts this run)."""


def priority_name(value: int) -> str:
    """``routine``, ``urgent`` or ``stat``; the number itself for a priority without a name."""
    try:
        return Priority(value).name.lower()
    except ValueError:
        return str(value)
