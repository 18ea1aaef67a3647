"""Routing: ordered, declarative rules from the config decide which model gets a series.

A route's ``match`` table maps keys to conditions, and every key must hold (an empty table matches
every series). Nothing in the config is evaluated as code; the rules are compiled once, at start,
into the frozen values below, and a mistake in them is a :class:`ConfigError` naming the route.

Keys:

- any DICOM keyword pydicom's dictionary knows (``Modality``, ``BodyPartExamined``,
  ``SeriesDescription``, ``SOPClassUID``, ``StudyDescription``, ``ImageType``, ...), matched on the
  series' representative instance;
- ``slices``: the number of instances in the series (a multi-frame object is one instance: match
  ``NumberOfFrames`` for its frames); ``rows`` and ``columns``: ``Rows`` and ``Columns``;
  ``calling_aet``: the AE title that sent the series.

Values:

- a string: equal, ignoring case and surrounding spaces (``Modality = "ct"``); a UID attribute
  also matches the UID's name or keyword (``SOPClassUID = "CT Image Storage"``);
- ``"re:..."``: a Python regular expression found anywhere in the value (``re.search``); add
  ``(?i)`` to ignore case: ``SeriesDescription = "re:(?i)chest|thorax"``;
- a number: numerically equal (``Rows = 512``);
- a list: any one of its items (``Modality = ["CT", "PT"]``);
- a table ``{min = .., max = ..}``, either bound optional, inclusive: ``slices = {min = 50}``.

An attribute with several values (``ImageType``) holds when any of its values does. An attribute
the series lacks fails every condition.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from dicomnode.config import (
    CompletionSettings,
    MatchValue,
    RouteSettings,
    RoutingSettings,
    Settings,
)
from dicomnode.domain import Priority
from dicomnode.errors import ConfigError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

Scalar = str | int | float
#: An attribute value as routing sees it: several values become a tuple.
Value = Scalar | tuple[Scalar, ...]

SLICES = "slices"
CALLING_AET = "calling_aet"
#: Keys that are not DICOM keywords, and the attribute those that are aliases stand for.
SPECIAL_KEYS: Mapping[str, str] = MappingProxyType(
    {SLICES: SLICES, "rows": "Rows", "columns": "Columns", CALLING_AET: CALLING_AET}
)
# Values routing never compares: sequences and bulk binary data.
_UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Values a {min, max} range makes sense for (dates and times compare as numbers: 20260101).
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "DS", "IS", "DA", "TM"})


class Outcome(StrEnum):
    """Whether a condition (or a whole rule) holds for a series."""

    MATCH = "match"
    NO_MATCH = "no_match"
    PENDING = "pending"  # hangs on a value not known yet (partial routing)


class Basis(StrEnum):
    """Why a decision chose what it chose."""

    FIRST = "first"  # routing.mode = first: the first route that matches
    ALL = "all"  # routing.mode = all: every route that matches
    FALLBACK = "fallback"  # no route matched; routing.fallback did
    PENDING = "pending"  # partial routing: nothing matched yet, but some route may at completion
    NONE = "none"  # nothing matched and there is no fallback (or it did not match either)


# --- the facts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesFacts:
    """What routing knows about one series.

    ``attributes`` maps DICOM keywords to plain values (str, int, float, or a tuple of them) from
    one representative instance. ``slices`` (instances in the series) and ``calling_aet`` are
    ``None`` when not known: a series still arriving has no final slice count yet.
    """

    attributes: Mapping[str, Value] = field(default_factory=dict, hash=False)
    slices: int | None = None
    calling_aet: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, object],
        *,
        slices: int | None = None,
        calling_aet: str | None = None,
    ) -> SeriesFacts:
        """Facts from keyword -> value (pydicom values, or plain ones); None values are absent."""
        attributes = {}
        for keyword, raw in values.items():
            value = _plain(raw)
            if value is not None:
                attributes[keyword] = value
        return cls(attributes, slices, calling_aet)

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        *,
        slices: int | None = None,
        calling_aet: str | None = None,
    ) -> SeriesFacts:
        """Facts from a series' representative instance (read with ``stop_before_pixels``).

        Its top-level attributes and File Meta are kept; sequences, binary data, private
        elements and values pydicom cannot convert are left out (they match nothing).
        """
        values: dict[str, object] = {}
        for source in (getattr(dataset, "file_meta", None), dataset):
            if source is None:
                continue
            for tag in list(source.keys()):
                keyword = keyword_for_tag(tag)
                if not keyword or _unmatchable(tag):
                    continue
                try:
                    values[keyword] = source[tag].value
                except (ValueError, TypeError, KeyError, OverflowError):
                    continue  # an invalid value (strict pydicom) is simply not matchable
        return cls.from_mapping(values, slices=slices, calling_aet=calling_aet)

    @classmethod
    def from_datasets(
        cls, datasets: Sequence[Dataset], *, calling_aet: str | None = None
    ) -> SeriesFacts:
        """Facts from every instance of one complete series: the first is representative and
        ``slices`` is how many there are."""
        if not datasets:
            raise ValueError("a series has at least one instance")
        uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
        if len(uids) > 1:
            raise ValueError(f"datasets of {len(uids)} series given, expected one: {sorted(uids)}")
        return cls.from_dataset(datasets[0], slices=len(datasets), calling_aet=calling_aet)


def value_matches(value: str, wanted: str) -> bool:
    """An attribute against a query's value, as C-FIND matches it: case-insensitive, ``*``
    and ``?`` wildcards; an empty value asked (or ``*``) matches anything (a source's series
    for a backfill query, a prior's series for a route's ``priors.match``)."""
    if not wanted or wanted == "*":
        return True
    return fnmatch.fnmatchcase(value.strip().upper(), wanted.strip().upper())


def _unmatchable(tag: int) -> bool:
    try:
        vrs = set(dictionary_VR(tag).split(" or "))
    except KeyError:
        return True
    return bool(vrs & _UNMATCHABLE_VRS)


def _plain(value: object) -> Value | None:
    """A pydicom value as str/int/float, a tuple of them for several values; None: not usable."""
    if value is None or isinstance(value, bytes | bytearray):
        return None
    if isinstance(value, int):  # IS and bool too
        return int(value)
    if isinstance(value, float | Decimal):  # DSfloat, DSdecimal
        return float(value)
    if isinstance(value, str | PersonName):  # UID too
        return str(value).strip()
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = [_plain(item) for item in value]
        if any(item is None or isinstance(item, tuple) for item in items):
            return None  # a sequence of datasets, or nested values: not comparable
        return tuple(item for item in items if isinstance(item, str | int | float))
    return None


# --- conditions -------------------------------------------------------------------------------


def _number(value: Scalar) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return None


def _show_number(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _text(value: Scalar) -> str:
    return value if isinstance(value, str) else _show_number(value)


def show(value: Value | None) -> str:
    """A value as explanations print it: strings quoted, numbers bare, lists in brackets."""
    if value is None:
        return "absent"
    if isinstance(value, tuple):
        return "[" + ", ".join(show(item) for item in value) + "]"
    return repr(value) if isinstance(value, str) else _show_number(value)


@dataclass(frozen=True)
class TextIs:
    """Equal as text, ignoring case and surrounding spaces (UIDs: also their name or keyword)."""

    text: str
    uid_names: bool = False

    def holds(self, value: Scalar) -> bool:
        wanted = self.text.strip().casefold()
        actual = _text(value).strip()
        if actual.casefold() == wanted:
            return True
        if self.uid_names and isinstance(value, str):
            uid = UID(actual)
            return wanted in (uid.name.casefold(), uid.keyword.casefold())
        return False

    def describe(self) -> str:
        return repr(self.text)

    def phrase(self, held: bool) -> str:
        return f"{'matches' if held else 'does not match'} {self.describe()}"


@dataclass(frozen=True)
class NumberIs:
    """Numerically equal."""

    number: float

    def holds(self, value: Scalar) -> bool:
        return _number(value) == self.number

    def describe(self) -> str:
        return _show_number(self.number)

    def phrase(self, held: bool) -> str:
        return f"{'equals' if held else 'does not equal'} {self.describe()}"


@dataclass(frozen=True)
class Regex:
    """A regular expression found anywhere in the value (``re.search``)."""

    pattern: re.Pattern[str]

    def holds(self, value: Scalar) -> bool:
        return self.pattern.search(_text(value)) is not None

    def describe(self) -> str:
        return f"re:{self.pattern.pattern}"

    def phrase(self, held: bool) -> str:
        return f"{'matches' if held else 'does not match'} {self.describe()}"


@dataclass(frozen=True)
class InRange:
    """An inclusive numeric range; either bound may be open."""

    low: float | None = None
    high: float | None = None

    def holds(self, value: Scalar) -> bool:
        number = _number(value)
        if number is None:
            return False
        return (self.low is None or number >= self.low) and (
            self.high is None or number <= self.high
        )

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{_show_number(self.low)}..{_show_number(self.high)}"
        if self.low is not None:
            return f">= {_show_number(self.low)}"
        return f"<= {_show_number(self.high or 0.0)}"

    def phrase(self, held: bool) -> str:
        verb = "in" if self.low is not None and self.high is not None else ""
        return " ".join(filter(None, ["is" if held else "is not", verb, self.describe()]))


Test = TextIs | NumberIs | Regex | InRange


@dataclass(frozen=True)
class Condition:
    """One key of a route's ``match`` table: any one of ``tests`` must hold."""

    key: str  # as written in the config
    source: str  # the DICOM keyword, or "slices" / "calling_aet"
    tests: tuple[Test, ...]

    @property
    def expected(self) -> str:
        if len(self.tests) == 1:
            return self.tests[0].describe()
        return "any of " + ", ".join(test.describe() for test in self.tests)

    def holds(self, value: Value) -> bool:
        items = value if isinstance(value, tuple) else (value,)
        return any(test.holds(item) for test in self.tests for item in items)

    def phrase(self, held: bool) -> str:
        if len(self.tests) == 1:
            return self.tests[0].phrase(held)
        return f"{'matches any of' if held else 'matches none of'} " + ", ".join(
            test.describe() for test in self.tests
        )

    def actual(self, facts: SeriesFacts) -> tuple[bool, Value | None]:
        """(known, value) for this key; a value is unknown only when the facts say so (None)."""
        if self.source == SLICES:
            return facts.slices is not None, facts.slices
        if self.source == CALLING_AET:
            return facts.calling_aet is not None, facts.calling_aet
        return True, facts.attributes.get(self.source)


def _compile_condition(route: str, key: str, value: MatchValue) -> Condition:
    where = f"route {route!r}: match.{key}"
    source = SPECIAL_KEYS.get(key, key)
    if source not in SPECIAL_KEYS.values() and source not in keyword_dict:
        near = difflib.get_close_matches(key, [*keyword_dict, *SPECIAL_KEYS], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"route {route!r}: match key {key!r} is not a DICOM keyword nor one of "
            f"{', '.join(SPECIAL_KEYS)}{hint}"
        )
    vr = "" if source in (SLICES, CALLING_AET) else dictionary_VR(keyword_dict[source])
    if set(vr.split(" or ")) & _UNMATCHABLE_VRS:
        raise ConfigError(
            f"{where}: {source} has VR {vr}; only text and number attributes can be matched"
        )
    numeric = source == SLICES or bool(set(vr.split(" or ")) & _NUMERIC_VRS)

    def one(item: object) -> Test:
        if isinstance(item, str):
            if item.startswith("re:"):
                try:
                    return Regex(re.compile(item[3:]))
                except re.error as exc:
                    raise ConfigError(
                        f"{where}: {item!r} is not a valid regular expression: {exc}"
                    ) from exc
            return TextIs(item, uid_names=vr == "UI")
        if isinstance(item, int | float):
            return NumberIs(float(item))
        raise ConfigError(
            f"{where}: {item!r} is not a string, number, list or {{min, max}} table, "
            'expected e.g. "CT", "re:(?i)chest", 512, ["CT", "PT"] or {min = 50}'
        )

    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"min", "max"})
        if unknown or not value:
            raise ConfigError(f"{where}: a range table takes min and/or max, got {dict(value)!r}")
        if not numeric:
            raise ConfigError(
                f"{where}: a {{min, max}} range needs a number, but {source} has VR {vr}"
            )
        low, high = value.get("min"), value.get("max")
        if low is not None and high is not None and low > high:
            raise ConfigError(f"{where}: min {low} is greater than max {high}")
        tests: tuple[Test, ...] = (InRange(low, high),)
    elif isinstance(value, list | tuple):
        if not value:
            raise ConfigError(f"{where}: an empty list matches nothing; give at least one value")
        tests = tuple(one(item) for item in value)
    else:
        tests = (one(value),)
    return Condition(key, source, tests)


# --- rules and decisions ----------------------------------------------------------------------


@dataclass(frozen=True)
class MatchedRoute:
    """Where a matched route sends a series: its model, destinations, priority and level."""

    name: str
    model: str
    destinations: tuple[str, ...]
    priority: Priority
    level: Literal["series", "study"]
    completion: CompletionSettings
    #: Partial routing only: this route may run, decided when the series is complete.
    pending: bool = False
    #: "shadow": run and keep the results, never send them (RouteSettings.mode)
    mode: Literal["live", "shadow"] = "live"


@dataclass(frozen=True)
class Rule:
    """A compiled route: its conditions, and where it sends what it matches."""

    name: str
    conditions: tuple[Condition, ...]
    model: str
    destinations: tuple[str, ...] = ()
    priority: Priority = Priority.ROUTINE
    level: Literal["series", "study"] = "series"
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    mode: Literal["live", "shadow"] = "live"

    @classmethod
    def from_settings(cls, route: RouteSettings) -> Rule:
        return cls(
            name=route.name,
            conditions=tuple(
                _compile_condition(route.name, key, value) for key, value in route.match.items()
            ),
            model=route.model,
            destinations=route.destinations,
            priority=Priority[route.priority.upper()],
            level=route.level,
            completion=route.completion,
            mode=route.mode,
        )

    def target(self, *, pending: bool = False) -> MatchedRoute:
        return MatchedRoute(
            self.name,
            self.model,
            self.destinations,
            self.priority,
            self.level,
            self.completion,
            pending,
            self.mode,
        )


@dataclass(frozen=True)
class RoutingDecision:
    """The routes a series goes to, in config order; empty: skip it (no route matched)."""

    routes: tuple[MatchedRoute, ...]
    basis: Basis

    @property
    def skipped(self) -> bool:
        return not self.routes

    @property
    def settled(self) -> bool:
        """False when some route hangs on a value not known yet: route again at completion."""
        return not any(route.pending for route in self.routes)


@dataclass(frozen=True)
class ConditionExplanation:
    """One condition of one rule, checked against a series."""

    key: str
    expected: str  # as the config gives it, e.g. "re:(?i)chest", "50..1000", "any of 'CT', 'PT'"
    actual: Value | None  # None: absent (or not known)
    outcome: Outcome
    text: str  # e.g. "SeriesDescription 'AX T2' does not match re:(?i)chest"


@dataclass(frozen=True)
class RuleExplanation:
    """One rule checked against a series: each condition, and whether and why it was chosen."""

    route: str
    model: str
    fallback: bool
    outcome: Outcome
    chosen: bool
    reason: str
    conditions: tuple[ConditionExplanation, ...]


def _check(condition: Condition, facts: SeriesFacts, partial: bool) -> ConditionExplanation:
    known, value = condition.actual(facts)
    key, expected = condition.key, condition.expected
    if not known:
        if partial:
            text = f"{key} is not known yet (expected {expected})"
            return ConditionExplanation(key, expected, None, Outcome.PENDING, text)
        text = f"{key} is unknown (expected {expected})"
        return ConditionExplanation(key, expected, None, Outcome.NO_MATCH, text)
    if value is None:
        text = f"{key} is absent (expected {expected})"
        return ConditionExplanation(key, expected, None, Outcome.NO_MATCH, text)
    held = condition.holds(value)
    text = f"{key} {show(value)} {condition.phrase(held)}"
    return ConditionExplanation(
        key, expected, value, Outcome.MATCH if held else Outcome.NO_MATCH, text
    )


def _overall(checks: Sequence[ConditionExplanation]) -> Outcome:
    outcomes = {check.outcome for check in checks}
    if Outcome.NO_MATCH in outcomes:
        return Outcome.NO_MATCH
    return Outcome.PENDING if Outcome.PENDING in outcomes else Outcome.MATCH


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _verb(names: Sequence[str], singular: str) -> str:
    """``matches`` -> ``match`` and ``does`` -> ``do`` when several routes are named."""
    if len(names) == 1:
        return singular
    return singular[:-2] if singular.endswith("es") else singular[:-1]


@dataclass(frozen=True)
class Router:
    """The compiled routes, in config order (the fallback among them), and how they combine."""

    rules: tuple[Rule, ...]
    mode: Literal["first", "all"] = "first"
    fallback: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        return cls.from_routes(settings.routes, settings.routing)

    @classmethod
    def from_routes(
        cls, routes: Sequence[RouteSettings], routing: RoutingSettings | None = None
    ) -> Router:
        """Compile the routes once; a bad key, value or regular expression is a ConfigError."""
        routing = routing or RoutingSettings()
        rules = tuple(Rule.from_settings(route) for route in routes)
        names = [rule.name for rule in rules]
        if routing.fallback is not None and routing.fallback not in names:
            raise ConfigError(f"routing.fallback {routing.fallback!r} names no route ({names})")
        return cls(rules, routing.mode, routing.fallback)

    def route(self, facts: SeriesFacts, *, partial: bool = False) -> RoutingDecision:
        """The routes this series goes to.

        ``routing.mode = "first"``: the first route, in config order, whose conditions all hold;
        ``"all"``: every such route. When none holds, the fallback route (``routing.fallback``,
        never matched as an ordinary route; its own conditions, usually none, must hold). Empty
        when nothing matched: the caller records a ``skipped`` job. Shadow routes
        (``mode = "shadow"``) take no part in that choice: each that matches comes after the
        live routes, so a shadow route never takes a series from a live one.

        With ``partial=False`` (a complete series) a value the facts do not know (``slices`` or
        ``calling_aet`` is None) fails its condition. With ``partial=True`` (the first instances of
        a series still arriving) such a condition is *pending*, not failed: a route whose other
        conditions hold comes back with ``pending=True`` (in mode "first", pending routes before
        the first sure match come back too, as may the fallback), and the decision is not
        ``settled``. The caller creates waiting jobs, picks the completion rules of the routes
        returned, and routes again with the complete facts when the series is complete; only that
        decision counts. A partial decision that is ``skipped`` is final: no route can match.
        """
        return self._decide(self._checks(facts, partial))

    def explain(self, facts: SeriesFacts, *, partial: bool = False) -> list[RuleExplanation]:
        """Every rule in config order, matched or not: each condition with the actual and the
        expected value, whether the rule was chosen, and why (or why not)."""
        checks = self._checks(facts, partial)
        decision = self._decide(checks)
        chosen = {route.name for route in decision.routes}
        live = [r for r in decision.routes if r.mode == "live" and r.name != self.fallback]
        definite = [r.name for r in live if not r.pending]
        pending = [r.name for r in live if r.pending]
        explanations = []
        for rule in self.rules:
            outcome = _overall(checks[rule.name])
            failed = "; ".join(c.text for c in checks[rule.name] if c.outcome is Outcome.NO_MATCH)
            waiting = "; ".join(c.text for c in checks[rule.name] if c.outcome is Outcome.PENDING)
            if rule.mode == "shadow" and rule.name != self.fallback:
                reason = (
                    "shadow: runs beside the live routes, results kept, never sent"
                    if outcome is Outcome.MATCH
                    else f"shadow, pending: {waiting}"
                    if outcome is Outcome.PENDING
                    else f"shadow, does not match: {failed}"
                )
            elif rule.name == self.fallback:
                reason = self._fallback_reason(
                    outcome, rule.name in chosen, definite, pending, failed, waiting
                )
            elif outcome is Outcome.NO_MATCH:
                reason = f"does not match: {failed}"
            elif rule.name in chosen and outcome is Outcome.PENDING:
                reason = f"pending, decided when the series is complete: {waiting}"
            elif rule.name in chosen and self.mode == "all":
                reason = "chosen: it matches (routing.mode = all)"
            elif rule.name in chosen and pending:
                reason = (
                    f"matches; chosen unless {_names(pending)} {_verb(pending, 'matches')} "
                    "when the series is complete (routing.mode = first)"
                )
            elif rule.name in chosen:
                reason = "chosen: the first route that matches (routing.mode = first)"
            else:
                first = definite[0] if definite else "an earlier route"
                state = "matches" if outcome is Outcome.MATCH else "pending"
                reason = f"{state}, but {first!r} comes first (routing.mode = first)"
            if not rule.conditions and rule.name != self.fallback:
                reason += " (no conditions: matches every series)"
            explanations.append(
                RuleExplanation(
                    route=rule.name,
                    model=rule.model,
                    fallback=rule.name == self.fallback,
                    outcome=outcome,
                    chosen=rule.name in chosen,
                    reason=reason,
                    conditions=tuple(checks[rule.name]),
                )
            )
        return explanations

    def _fallback_reason(
        self,
        outcome: Outcome,
        chosen: bool,
        definite: list[str],
        pending: list[str],
        failed: str,
        waiting: str,
    ) -> str:
        if definite:
            return f"the fallback, not needed: {_names(definite)} matched"
        if outcome is Outcome.NO_MATCH:
            return f"the fallback, but it does not match: {failed}"
        if chosen and pending:
            return (
                f"the fallback, if {_names(pending)} {_verb(pending, 'does')} not match when the "
                "series is complete"
            )
        if chosen and outcome is Outcome.PENDING:
            return f"the fallback, pending, decided when the series is complete: {waiting}"
        return "chosen: the fallback (routing.fallback), as no other route matches"

    def _checks(self, facts: SeriesFacts, partial: bool) -> dict[str, list[ConditionExplanation]]:
        return {
            rule.name: [_check(condition, facts, partial) for condition in rule.conditions]
            for rule in self.rules
        }

    def _decide(self, checks: Mapping[str, Sequence[ConditionExplanation]]) -> RoutingDecision:
        """The live decision, then every shadow route that matches, whatever the live one."""
        live = self._decide_live(checks)
        shadows = tuple(
            rule.target(pending=outcome is Outcome.PENDING)
            for rule in self.rules
            if rule.mode == "shadow" and rule.name != self.fallback
            for outcome in (_overall(checks[rule.name]),)
            if outcome is not Outcome.NO_MATCH
        )
        if not shadows:
            return live
        basis = live.basis if live.routes else Basis(self.mode)
        return RoutingDecision(live.routes + shadows, basis)

    def _decide_live(self, checks: Mapping[str, Sequence[ConditionExplanation]]) -> RoutingDecision:
        chosen: list[MatchedRoute] = []
        for rule in self.rules:
            if rule.name == self.fallback or rule.mode == "shadow":
                continue
            outcome = _overall(checks[rule.name])
            if outcome is Outcome.NO_MATCH:
                continue
            chosen.append(rule.target(pending=outcome is Outcome.PENDING))
            if self.mode == "first" and outcome is Outcome.MATCH:
                break
        if any(not route.pending for route in chosen):
            return RoutingDecision(tuple(chosen), Basis(self.mode))
        fallback = next((r for r in self.rules if r.name == self.fallback), None)
        if fallback is not None:
            outcome = _overall(checks[fallback.name])
            if outcome is not Outcome.NO_MATCH:
                # With pending routes before it, the fallback applies only if they all fail.
                pending = bool(chosen) or outcome is Outcome.PENDING
                chosen.append(fallback.target(pending=pending))
                basis = Basis.PENDING if pending else Basis.FALLBACK
                return RoutingDecision(tuple(chosen), basis)
        return RoutingDecision(tuple(chosen), Basis.PENDING if chosen else Basis.NONE)
