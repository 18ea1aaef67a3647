"""When is a series, or a study, complete? Pure decisions over snapshots of what arrived.

A series is complete, in this order of evidence:

1. its expected count arrived: Images in Acquisition instances, or one multi-frame instance of an
   enhanced or ophthalmic class (its frames are the whole series);
2. it came whole in one association from a sender the site declared to send whole series per
   association (``whole_series_senders``), and that association was released;
3. it came whole in one association, that association was released, and its slices (more than
   one) form one gapless stack by the rules that later load it (:mod:`dicomnode.imaging`):
   complete at once;
4. the association that last delivered to it was released ``release_grace_s`` ago (senders that
   open one association per instance keep extending this);
5. nothing arrived for ``quiet_s``.

Rules 1 and 2 are proof. Rules 3 to 5 are evidence a split transfer can fool: a scanner that
forwards while it reconstructs, a PACS that splits a large series, a load balancer in front of
several receivers all send one series in several associations, and each part is a released,
contiguous stack. So their verdict is *provisional*: the job starts at once (the fast path keeps
its speed), but its results are held until ``confirm_s`` after the series' last instance has
passed with nothing new (:func:`confirm_after`). An instance that arrives inside that window
supersedes the run (it is cancelled before anything is sent) and the whole series is analysed
again; a job started on a partial stack never sends.

A study-level route waits for its required series (recognised by regular expressions on the
Series Description, Protocol Name and Sequence Name, plus the word "contrast" when a contrast
agent is recorded), each complete, until ``study_timeout_s`` after the study's first instance;
then it runs with what is there or fails naming what is missing, as the route says. Its job is
held until every input series is confirmed, and superseded as theirs are.

Late instances: an instance received after the confirmation window (the series then already
declared complete and confirmed) opens a new generation of that series; the next sweep creates
a new job for it, which waits for completion again and runs on the whole series. Its result UIDs
differ (they derive from the input), so the PACS keeps both results; an earlier job still
``queued`` is cancelled as superseded.
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
    #: the calling AE title of the association that last delivered to the series
    last_calling_aet: str = ""


@dataclass(frozen=True)
class Verdict:
    """Complete or not, why, and when to look again."""

    complete: bool
    reason: str
    check_again_at: datetime | None = None
    #: complete by evidence a split transfer can fool: results wait for :func:`confirm_after`
    provisional: bool = False


def series_verdict(series: SeriesSnapshot, rules: CompletionSettings, now: datetime) -> Verdict:
    """Decide whether a series is complete (see the module docstring for the order)."""
    released_whole = series.released_at is not None and series.whole_in_last_association
    if rules.expected_counts:
        expected = series.expected_instances
        if expected and series.instances >= expected:
            return Verdict(True, f"all {expected} instances of Images in Acquisition arrived")
        if series.single_multiframe:
            return Verdict(True, "one multi-frame instance holds the whole series")
    if released_whole and series.last_calling_aet in rules.whole_series_senders:
        return Verdict(
            True, f"sent whole in one released association by {series.last_calling_aet}, "
            "a sender declared to send whole series"
        )  # fmt: skip
    # One instance is a gapless "stack" of one, which proves nothing: a sender that opens an
    # association per instance (or splits a series) would have it complete after the first.
    if rules.expected_counts and released_whole and series.instances > 1 and series.contiguous:
        return Verdict(
            True, "sent whole in one released association, slices contiguous", provisional=True
        )
    due = [series.last_received_at + timedelta(seconds=rules.quiet_s)]
    if series.released_at is not None:
        release_due = series.released_at + timedelta(seconds=rules.release_grace_s)
        if now >= release_due:
            return Verdict(
                True, f"association released {rules.release_grace_s:g} s ago", provisional=True
            )
        due.append(release_due)
    if now >= due[0]:
        return Verdict(True, f"no new instance for {rules.quiet_s:g} s", provisional=True)
    return Verdict(False, "instances may still arrive", min(due))


def confirm_after(
    series: SeriesSnapshot, verdict: Verdict, rules: CompletionSettings, now: datetime
) -> datetime | None:
    """When a complete series' results may be sent: ``confirm_s`` after its last instance for a
    provisional verdict, None when that has passed already or the verdict is proof."""
    if not verdict.provisional:
        return None
    due = series.last_received_at + timedelta(seconds=rules.confirm_s)
    return due if due > now else None


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
