"""A finished run's outcome, decided on its findings: whether a finding is positive or critical
(its route's ``critical`` rules), whether the route's destinations get the results (its
``send_if``), and which ``[[notifications]]`` are told, and of what.

The job repository asks this at the one moment a run's results may go out (the run's finish,
or its confirmation, or a reviewer's approval), in the transaction that records it: a route
with ``review = true`` holds them before this point, sends and notifications alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomnode.config import (
    EVENT_ORDER,
    CriticalRule,
    NotificationSettings,
    NotifyEvent,
    RouteSettings,
    SendIf,
    Settings,
)


def positive(finding: Mapping[str, Any]) -> bool:
    """A finding that says something is there: not indeterminate, not a grade 0, not one a
    model marks ``"positive": false``."""
    attributes = finding.get("attributes") or {}
    if attributes.get("indeterminate") is True or attributes.get("positive") is False:
        return False
    return attributes.get("grade") != 0


def _named(finding: Mapping[str, Any], label: str) -> bool:
    """The finding's label or its finding type's meaning is ``label`` (in any case)."""
    wanted = label.casefold()
    meaning = (finding.get("finding_type") or {}).get("meaning") or ""
    return wanted in (str(finding.get("label") or "").casefold(), str(meaning).casefold())


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def rule_reasons(rule: CriticalRule, finding: Mapping[str, Any]) -> list[str] | None:
    """Why ``finding`` is critical by ``rule`` (each condition met, in words), or None when a
    condition fails or the finding is not positive."""
    if not positive(finding):
        return None
    reasons = []
    if rule.label is not None:
        if not _named(finding, rule.label):
            return None
        reasons.append(f"label {rule.label}")
    attributes = finding.get("attributes") or {}
    measured = (
        ("probability", rule.min_probability, finding.get("probability"), ""),
        ("diameter", rule.min_diameter_mm, finding.get("diameter_mm"), " mm"),
        ("volume", rule.min_volume_mm3, finding.get("volume_mm3"), " mm3"),
        ("grade", rule.min_grade, attributes.get("grade"), ""),
    )
    for name, least, got, unit in measured:
        if least is None:
            continue
        value = _number(got)
        if value is None or value < least:
            return None
        reasons.append(f"{name} {value:g}{unit} >= {least:g}{unit}")
    return reasons


@dataclass(frozen=True)
class CriticalFinding:
    """A finding its route's rules make critical: its index in the result's findings."""

    index: int
    label: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What a run's findings decide."""

    positive: bool
    critical: tuple[CriticalFinding, ...] = ()
    send: bool = True
    #: why the route's destinations get nothing (empty when they do)
    held_because: str = ""
    send_if: SendIf = "always"

    @property
    def events(self) -> set[NotifyEvent]:
        """The events this outcome raises (``done`` always; ``failed`` never)."""
        found: set[NotifyEvent] = {"done"}
        if self.positive:
            found.add("finding")
        if self.critical:
            found.add("critical")
        return found

    def as_json(self) -> dict[str, Any]:
        """As kept in the job's result (``outcome``)."""
        return {
            "positive": self.positive,
            "critical": [
                {"finding": c.index, "label": c.label, "reasons": list(c.reasons)}
                for c in self.critical
            ],
            "send_if": self.send_if if isinstance(self.send_if, str) else list(self.send_if),
            "send": self.send,
            **({"held_because": self.held_because} if self.held_because else {}),
        }


def findings_of(result: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The findings a job's JSON result lists (none when it lists none or is not a result)."""
    listed = (result or {}).get("findings") or ()
    return [f for f in listed if isinstance(f, Mapping)]


def decide(route: RouteSettings | None, result: Mapping[str, Any] | None) -> Outcome:
    """The outcome of a run of ``route`` (None: a route no longer configured, which sends as it
    always did and has no critical rules) that produced ``result``."""
    findings = findings_of(result)
    critical = []
    for index, finding in enumerate(findings):
        for rule in route.critical if route is not None else ():
            reasons = rule_reasons(rule, finding)
            if reasons is not None:
                critical.append(
                    CriticalFinding(index, str(finding.get("label") or ""), tuple(reasons))
                )
                break
    found = [f for f in findings if positive(f)]
    send_if: SendIf = route.send_if if route is not None else "always"
    held = ""
    if send_if == "positive" and not found:
        held = "send_if positive: no positive finding"
    elif isinstance(send_if, tuple) and not any(
        _named(f, label) for f in found for label in send_if
    ):
        held = f"send_if {list(send_if)}: no positive finding of these labels"
    return Outcome(bool(found), tuple(critical), not held, held, send_if)


@dataclass(frozen=True)
class Notice:
    """One message a release owes: to the notification ``name`` (of ``kind``), for ``event``."""

    name: str
    kind: str
    event: NotifyEvent


@dataclass(frozen=True)
class ReleasePolicy:
    """The routes' rules on findings and the notifications, as the repository applies them."""

    routes: Mapping[str, RouteSettings] = field(default_factory=dict)
    notifications: Sequence[NotificationSettings] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> ReleasePolicy:
        return cls({route.name: route for route in settings.routes}, settings.notifications)

    def route(self, name: str) -> RouteSettings | None:
        """The route a job names (a trial's ``route?...`` suffix aside), if configured."""
        return self.routes.get(name.partition("?")[0])

    def review(self, route: str) -> bool:
        """Whether the route holds its jobs' results for a person's review (``review = true``)."""
        found = self.route(route)
        return found is not None and found.review

    def decide(self, route: str, result: Mapping[str, Any] | None) -> Outcome:
        return decide(self.route(route), result)

    def notices(self, route: str, events: Iterable[NotifyEvent]) -> list[Notice]:
        """One notice per notification that listens to the route and to one of ``events``:
        for the most specific of them (critical, then finding, done, failed)."""
        happened = set(events)
        name = route.partition("?")[0]
        notices = []
        for notification in self.notifications:
            if notification.routes and name not in notification.routes:
                continue
            wanted = [e for e in EVENT_ORDER if e in happened and e in notification.events]
            if wanted:
                notices.append(Notice(notification.name, notification.kind, wanted[0]))
        return notices
