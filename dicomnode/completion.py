"""When is a series, or a study, complete? Pure decisions over snapshots of what arrived.

A series is complete, in this order of evidence:

1. its expected count arrived: Images in Acquisition instances, or one multi-frame instance of an
   enhanced or ophthalmic class (its frames are the whole series);
2. it came whole in one association, that association was released, and its slices (more than
   one) form one gapless stack by the rules that later load it (:mod:`dicomnode.imaging`):
   complete at once;
3. the association that last delivered to it was released ``release_grace_s`` ago (senders that
   open one association per instance keep extending this);
4. nothing arrived for ``quiet_s``.

A study-level route waits for its required series (recognised by regular expressions on the
Series Description, Protocol Name and Sequence Name, plus the word "contrast" when a contrast
agent is recorded), each complete, until ``study_timeout_s`` after the study's first instance;
then it runs with what is there or fails naming what is missing, as the route says.

Late instances: an instance received after the newest one the completing verdict saw (the
series then already declared complete) opens a new generation of that series; the next sweep
creates a new job for it, which waits for completion again and runs on the whole series. Its
result UIDs differ (they derive from the input), so the PACS keeps both results; an earlier job
still ``queued`` is cancelled as superseded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from dicomnode.config import CompletionSettings


@dataclass(frozen=True)
class SeriesSnapshot:
    """What the index and the files say about a series at one moment."""

    series_instance_uid: str
    instances: int
    first_received_at: datetime
    last_received_at: datetime
    #: when the association that last delivered to the series was released (None: still open,
    #: aborted, or unknown)
    released_at: datetime | None = None
    #: every instance of the series came in that last association
    whole_in_last_association: bool = False
    expected_instances: int | None = None  # Images in Acquisition, when stated
    single_multiframe: bool = False
    contiguous: bool | None = None  # None: not known (no positions read, or not an image stack)


@dataclass(frozen=True)
class Verdict:
    """Complete or not, why, and when to look again."""

    complete: bool
    reason: str
    check_again_at: datetime | None = None


def series_verdict(series: SeriesSnapshot, rules: CompletionSettings, now: datetime) -> Verdict:
    """Decide whether a series is complete (see the module docstring for the order)."""
    if rules.expected_counts:
        expected = series.expected_instances
        if expected and series.instances >= expected:
            return Verdict(True, f"all {expected} instances of Images in Acquisition arrived")
        if series.single_multiframe:
            return Verdict(True, "one multi-frame instance holds the whole series")
        # One instance is a gapless "stack" of one, which proves nothing: a sender that opens an
        # association per instance (or splits a series) would have it complete after the first.
        if (
            series.released_at is not None
            and series.whole_in_last_association
            and series.instances > 1
            and series.contiguous
        ):
            return Verdict(True, "sent whole in one released association, slices contiguous")
    due = [series.last_received_at + timedelta(seconds=rules.quiet_s)]
    if series.released_at is not None:
        release_due = series.released_at + timedelta(seconds=rules.release_grace_s)
        if now >= release_due:
            return Verdict(True, f"association released {rules.release_grace_s:g} s ago")
        due.append(release_due)
    if now >= due[0]:
        return Verdict(True, f"no new instance for {rules.quiet_s:g} s")
    return Verdict(False, "instances may still arrive", min(due))


@dataclass(frozen=True)
class StudySeries:
    """A series of a study, as a study-level route sees it."""

    series_instance_uid: str
    text: str  # Series Description | Protocol Name | Sequence Name [| contrast]
    complete: bool
    last_received_at: datetime


@dataclass(frozen=True)
class StudyVerdict:
    """What a study-level route should do now."""

    action: str  # "wait", "run" or "fail"
    inputs: Mapping[str, str]  # required name -> series UID found
    missing: tuple[str, ...]
    reason: str
    check_again_at: datetime | None = None


def recognition_text(
    series_description: str,
    protocol_name: str = "",
    sequence_name: str = "",
    contrast: bool = False,
) -> str:
    """The text a required-series pattern is matched against."""
    parts = [series_description, protocol_name, sequence_name]
    if contrast:
        parts.append("contrast")
    return " | ".join(part for part in parts if part)


def recognise(series: Sequence[StudySeries], patterns: Mapping[str, str]) -> dict[str, str]:
    """Each required name -> the newest series whose text matches it (one series serves one
    name; names are taken in the order given, so list the more specific first, e.g. T1c
    before T1)."""
    compiled = {name: re.compile(pattern) for name, pattern in patterns.items()}
    taken: set[str] = set()
    found: dict[str, str] = {}
    newest_first = sorted(series, key=lambda s: s.last_received_at, reverse=True)
    for name, pattern in compiled.items():
        for candidate in newest_first:
            if candidate.series_instance_uid not in taken and pattern.search(candidate.text):
                found[name] = candidate.series_instance_uid
                taken.add(candidate.series_instance_uid)
                break
    return found


def study_verdict(
    series: Sequence[StudySeries],
    rules: CompletionSettings,
    first_received_at: datetime,
    now: datetime,
) -> StudyVerdict:
    """Decide whether a study-level route runs, waits, or fails."""
    found = recognise(series, rules.required_series)
    missing = tuple(name for name in rules.required_series if name not in found)
    complete = {s.series_instance_uid: s.complete for s in series}
    pending = tuple(name for name, uid in found.items() if not complete[uid])
    deadline = first_received_at + timedelta(seconds=rules.study_timeout_s)
    if not missing and not pending:
        return StudyVerdict("run", found, (), "every required series is complete")
    if now < deadline:
        waiting_for = ", ".join((*missing, *pending))
        return StudyVerdict("wait", found, missing, f"waiting for {waiting_for}", deadline)
    ready = {name: uid for name, uid in found.items() if complete[uid]}
    absent = tuple(name for name in rules.required_series if name not in ready)
    reason = (
        f"study timeout ({rules.study_timeout_s:g} s) with {', '.join(absent)} missing or "
        "incomplete"
    )
    if rules.on_missing == "run" and ready:
        return StudyVerdict("run", ready, absent, reason + "; running with what is there")
    return StudyVerdict("fail", ready, absent, reason)
