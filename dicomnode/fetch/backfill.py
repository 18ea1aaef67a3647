"""Backfill: run a route (or a model) over a source's past studies without flooding it.

The query finds the studies (study attributes asked of the source; series attributes checked
per study), oldest first. Each becomes one request, with a transaction id derived from the
source, the analysis and the study, so a study is asked once however often the backfill runs:
a rerun (after an interruption, or to pick up new studies) skips what it asked before, without
waiting. New requests are made at most ``rate`` a minute and only inside the ``window`` (local
time of day; it may span midnight); outside it the backfill waits for it to open. The node's
runner then retrieves and analyses each as any request; a request made inside the window may
still be retrieving when it closes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time as time_module
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo

from dicomnode.errors import InvalidQuery
from dicomnode.fetch.query import Source, StudyMatch, StudyQuery
from dicomnode.fetch.requests import RequestRepository, RequestSpec

logger = logging.getLogger(__name__)

CLIENT = "backfill"
_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:/\s*(min|m|h|hour))?$")


@dataclass(frozen=True)
class Window:
    """A daily window of local time, ``20:00-06:00`` (ending the next morning) or
    ``09:00-17:00``; start == end is the whole day."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW.match(text.strip())
        if not match:
            raise InvalidQuery(f"window {text!r} is not HH:MM-HH:MM (e.g. 20:00-06:00)")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise InvalidQuery(f"window {text!r} names a time of day that does not exist")
        return cls(time(h1, m1), time(h2, m2))

    def contains(self, at: datetime) -> bool:
        now = at.time().replace(tzinfo=None)
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end  # across midnight

    def opens_after(self, at: datetime) -> datetime:
        """``at`` if inside, else when the window next opens (in ``at``'s time zone)."""
        if self.contains(at):
            return at
        opening = at.replace(hour=self.start.hour, minute=self.start.minute, second=0,
                             microsecond=0)  # fmt: skip
        return opening if opening > at else opening + timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_rate(text: str) -> float:
    """Requests a minute from ``N/min`` (or ``N``) or ``N/h``; InvalidQuery when not one."""
    match = _RATE.match(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise InvalidQuery(f"rate {text!r} is not a positive N/min or N/h (e.g. 2/min)")
    value = float(match.group(1))
    return value / 60 if match.group(2) in ("h", "hour") else value


@dataclass(frozen=True)
class BackfillReport:
    """What a backfill run did: studies found, requests made now, asked by an earlier run."""

    found: int
    asked: int
    already: int
    request_ids: tuple[int, ...] = ()


def transaction_id(source: str, analysis: str, study_uid: str) -> str:
    """The one id of a study's backfill request for one analysis on one source."""
    text = f"{source}|{analysis}|{study_uid}"
    return text if len(text) <= 128 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class Backfill:
    """One backfill: its query on a source, its analysis, its pace."""

    def __init__(
        self,
        requests: RequestRepository,
        source: Source,
        query: StudyQuery,
        *,
        route: str | None = None,
        model: str | None = None,
        rate_per_min: float | None = None,
        window: Window | None = None,
        max_attempts: int = 5,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], None] = time_module.sleep,
        timezone: tzinfo | None = None,
    ) -> None:
        self.requests = requests
        self.source = source
        self.query = query
        self.route, self.model = route, model
        self.interval_s = 60.0 / rate_per_min if rate_per_min else 0.0
        self.window = window
        self.max_attempts = max_attempts
        self._clock = clock or (lambda: datetime.now(UTC))
        self._sleep = sleep
        self._tz = timezone  # None: the host's local time
        self._last: datetime | None = None

    def studies(self) -> list[StudyMatch]:
        """The source's studies that match, oldest first (each once)."""
        found = {s.study_instance_uid: s for s in self.source.find_studies(self.query.study)}
        if self.query.series:
            found = {
                uid: study
                for uid, study in found.items()
                if any(self.query.series_match(s) for s in self.source.find_series(uid))
            }
        return sorted(found.values(), key=lambda s: (s.when, s.study_instance_uid))

    def run(self, on_request: Callable[[int, StudyMatch], None] | None = None) -> BackfillReport:
        studies = self.studies()
        # the pace holds across runs: a rerun waits out the rate from the last request made
        self._last = self.requests.last_made(CLIENT, self.source.name)
        analysis = self.route or (f"model:{self.model}" if self.model else "routes")
        asked = already = 0
        made: list[int] = []
        for study in studies:
            spec = RequestSpec(
                source=self.source.name,
                study_instance_uid=study.study_instance_uid,
                route=self.route,
                model=self.model,
                transaction_id=transaction_id(self.source.name, analysis, study.study_instance_uid),
                purpose="backfill",
            )
            if self.requests.find(CLIENT, spec.transaction_id or "") is not None:
                already += 1
                continue
            self._pace()
            record, created = self.requests.submit(
                spec, client=CLIENT, max_attempts=self.max_attempts
            )
            self._last = self._now()
            if created:
                asked += 1
                made.append(record.id)
                if on_request is not None:
                    on_request(record.id, study)
            else:
                already += 1
        logger.info(
            "backfill from %s: %d studies match, %d requests made, %d made before",
            self.source.name,
            len(studies),
            asked,
            already,
            extra={"action": "backfill"},
        )
        return BackfillReport(len(studies), asked, already, tuple(made))

    def _now(self) -> datetime:
        return self._clock().astimezone(self._tz)

    def _pace(self) -> None:
        """Wait for the rate's next slot, and for the window to be open."""
        while True:
            now = self._now()
            due = now
            if self._last is not None and self.interval_s:
                due = max(
                    due, self._last.astimezone(now.tzinfo) + timedelta(seconds=self.interval_s)
                )
            if self.window is not None:
                due = self.window.opens_after(due)
            wait = (due - now).total_seconds()
            if wait <= 0:
                return
            logger.info(
                "backfill waits %.0f s (%s)",
                wait,
                "window" if self.window and not self.window.contains(now) else "rate",
                extra={"action": "backfill_wait"},
            )
            self._sleep(wait)
