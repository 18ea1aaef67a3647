"""How well two models' findings on the same input agree: the numbers ``models compare`` shows
for a shadow route beside its live one.

Pure arithmetic over plain values (no database, no files): findings as their job-result JSON,
masks as arrays. Findings are paired one to one, label by label: by centre distance within
``max(radius, MIN_MATCH_MM)`` (the larger finding's radius), else by mask overlap, else (a
classification with neither) by label alone. Matched findings' masks give a Dice coefficient;
graded classifications (``attributes["grade"]``) give Cohen's kappa.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: two findings whose centres are closer than this (or than the larger radius) are one finding
MIN_MATCH_MM = 5.0

Finding = Mapping[str, Any]
#: a finding's mask as a boolean array, or None (no mask, or its file is gone)
MaskOf = Callable[[Finding], Any]


@dataclass(frozen=True)
class FindingMatch:
    """The findings of one input, paired: indexes into the live and the shadow lists."""

    matched: tuple[tuple[int, int], ...]
    only_live: tuple[int, ...]
    only_shadow: tuple[int, ...]


def centre_distance(a: Finding, b: Finding) -> float | None:
    """Millimetres between two findings' centres; None when either has none."""
    if a.get("centre_mm") is None or b.get("centre_mm") is None:
        return None
    return math.dist([float(v) for v in a["centre_mm"]], [float(v) for v in b["centre_mm"]])


def match_radius(a: Finding, b: Finding) -> float:
    """How far apart two centres may be for one finding: the larger radius, at least 5 mm."""
    diameters = [float(f["diameter_mm"]) for f in (a, b) if f.get("diameter_mm") is not None]
    return max([MIN_MATCH_MM, *(d / 2 for d in diameters)])


def dice(a: Any, b: Any) -> float | None:
    """Dice coefficient of two boolean masks on one grid: 2|A∩B| / (|A| + |B|); 1.0 when both
    are empty; None when their shapes differ (not on one grid)."""
    import numpy as np

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        return None
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def match_findings(
    live: Sequence[Finding],
    shadow: Sequence[Finding],
    mask_of: MaskOf | None = None,
) -> FindingMatch:
    """Pair the findings of one input, one to one, among findings of the same label: the
    closest centres first (within :func:`match_radius`); then, for findings without centres,
    the largest mask overlap; then findings with neither (classifications), by label alone."""
    candidates: list[tuple[float, float, int, int]] = []  # (distance, -dice, live, shadow)
    for i, a in enumerate(live):
        for j, b in enumerate(shadow):
            if a.get("label") != b.get("label"):
                continue
            distance = centre_distance(a, b)
            if distance is not None:
                if distance <= match_radius(a, b):
                    candidates.append((distance, 0.0, i, j))
                continue
            mask_a = mask_of(a) if mask_of and a.get("mask") else None
            mask_b = mask_of(b) if mask_of and b.get("mask") else None
            if mask_a is not None and mask_b is not None:
                overlap = dice(mask_a, mask_b)
                if overlap:
                    candidates.append((math.inf, -overlap, i, j))
            elif not a.get("mask") and not b.get("mask"):
                candidates.append((math.inf, 0.0, i, j))  # a classification: same label
    used_live: set[int] = set()
    used_shadow: set[int] = set()
    matched = []
    for _, _, i, j in sorted(candidates):
        if i in used_live or j in used_shadow:
            continue
        used_live.add(i)
        used_shadow.add(j)
        matched.append((i, j))
    return FindingMatch(
        tuple(sorted(matched)),
        tuple(i for i in range(len(live)) if i not in used_live),
        tuple(j for j in range(len(shadow)) if j not in used_shadow),
    )


def agreement(pairs: Sequence[tuple[int, int]]) -> float | None:
    """The share of pairs (live grade, shadow grade) that agree; None with no pair."""
    if not pairs:
        return None
    return sum(a == b for a, b in pairs) / len(pairs)


def cohen_kappa(pairs: Sequence[tuple[int, int]], *, weights: str = "none") -> float | None:
    """Cohen's kappa of paired grades (integers from 0): ``weights="quadratic"`` for ordinal
    grades (a 0-vs-4 disagreement costs 16 times a 0-vs-1). 1 - observed / expected
    disagreement; None with no pair, or when chance alone explains everything (one category
    only, both sides: kappa is undefined)."""
    if not pairs:
        return None
    if weights not in ("none", "quadratic"):
        raise ValueError(f"kappa weights are 'none' or 'quadratic', not {weights!r}")
    k = max(max(a, b) for a, b in pairs) + 1
    n = len(pairs)
    observed = [[0.0] * k for _ in range(k)]
    for a, b in pairs:
        observed[a][b] += 1.0 / n
    rows = [sum(observed[i]) for i in range(k)]
    columns = [sum(observed[i][j] for i in range(k)) for j in range(k)]

    def weight(i: int, j: int) -> float:
        if weights == "quadratic":
            return (i - j) ** 2 / (k - 1) ** 2 if k > 1 else 0.0
        return 0.0 if i == j else 1.0

    disagreement = sum(weight(i, j) * observed[i][j] for i in range(k) for j in range(k))
    chance = sum(weight(i, j) * rows[i] * columns[j] for i in range(k) for j in range(k))
    if chance == 0:
        return None
    return 1.0 - disagreement / chance


@dataclass(frozen=True)
class Agreement:
    """Agreement of a shadow model with a live one over the inputs both ran on."""

    inputs: int  # inputs with a finished live and a finished shadow job
    matched: int
    only_live: int
    only_shadow: int
    #: mean Dice of the matched findings whose masks both sides saved (None: none did)
    mean_dice: float | None
    dice_pairs: int
    #: graded classifications: how many inputs, plain agreement, kappa and weighted kappa
    graded: int
    grade_agreement: float | None
    kappa: float | None
    weighted_kappa: float | None

    def as_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def compare_results(
    pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
    mask_of: MaskOf | None = None,
) -> Agreement:
    """The agreement over (live result, shadow result) pairs, each a job's result JSON (its
    ``findings``); ``mask_of`` reads a finding's mask (None: no Dice, no overlap matching)."""
    matched = only_live = only_shadow = 0
    dices: list[float] = []
    grades: list[tuple[int, int]] = []
    for live, shadow in pairs:
        a, b = list(live.get("findings") or ()), list(shadow.get("findings") or ())
        match = match_findings(a, b, mask_of)
        matched += len(match.matched)
        only_live += len(match.only_live)
        only_shadow += len(match.only_shadow)
        for i, j in match.matched:
            grade_a = (a[i].get("attributes") or {}).get("grade")
            grade_b = (b[j].get("attributes") or {}).get("grade")
            if isinstance(grade_a, int) and isinstance(grade_b, int):
                grades.append((grade_a, grade_b))
            if mask_of is not None and a[i].get("mask") and b[j].get("mask"):
                mask_a, mask_b = mask_of(a[i]), mask_of(b[j])
                if mask_a is not None and mask_b is not None:
                    value = dice(mask_a, mask_b)
                    if value is not None:
                        dices.append(value)
    return Agreement(
        inputs=len(pairs),
        matched=matched,
        only_live=only_live,
        only_shadow=only_shadow,
        mean_dice=sum(dices) / len(dices) if dices else None,
        dice_pairs=len(dices),
        graded=len(grades),
        grade_agreement=agreement(grades),
        kappa=cohen_kappa(grades),
        weighted_kappa=cohen_kappa(grades, weights="quadratic"),
    )
