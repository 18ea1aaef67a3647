"""Growth since a prior CT: each nodule found now matched to the prior's nearest nodule, and
its change in diameter and volume reported (with the volume doubling time when it grew).

The two scans are compared in patient coordinates, unregistered: a nodule matches the prior's
nodule whose centre is nearest, within ``max(MATCH_MM, the larger diameter)``, each prior
nodule matched at most once (nearest pairs first). That holds for scans of one patient in a
similar position (supine, head first, the table's origin alike); a patient positioned
differently matches nothing, and each nodule is then reported new.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from dicomnode.domain import Finding, Findings
from dicomnode.inference.protocol import Prior

#: the least distance within which two centres are one nodule, mm
MATCH_MM = 10.0


def match(now: Sequence[Finding], before: Sequence[Finding]) -> dict[int, tuple[int, float]]:
    """Index of a finding now -> (index of its prior finding, centre distance in mm)."""
    pairs = []
    for i, current in enumerate(now):
        for j, prior in enumerate(before):
            if current.centre_mm is None or prior.centre_mm is None:
                continue
            distance = float(np.linalg.norm(np.subtract(current.centre_mm, prior.centre_mm)))
            limit = max(MATCH_MM, current.diameter_mm or 0.0, prior.diameter_mm or 0.0)
            if distance <= limit:
                pairs.append((distance, i, j))
    matched: dict[int, tuple[int, float]] = {}
    taken: set[int] = set()
    for distance, i, j in sorted(pairs):
        if i not in matched and j not in taken:
            matched[i] = (j, distance)
            taken.add(j)
    return matched


def growth(
    current: Finding, prior: Finding, distance_mm: float, days: int | None
) -> dict[str, Any]:
    """The change from ``prior`` to ``current``: diameter and volume, absolute and relative,
    and the volume doubling time (days) when both volumes and the interval are known."""
    out: dict[str, Any] = {"distance_mm": round(distance_mm, 1), "interval_days": days}
    if current.diameter_mm is not None and prior.diameter_mm:
        out["prior_diameter_mm"] = prior.diameter_mm
        out["diameter_change_mm"] = round(current.diameter_mm - prior.diameter_mm, 2)
        out["diameter_change_percent"] = round(
            100 * (current.diameter_mm - prior.diameter_mm) / prior.diameter_mm, 1
        )
    if current.volume_mm3 is not None and prior.volume_mm3:
        out["prior_volume_mm3"] = prior.volume_mm3
        out["volume_change_mm3"] = round(current.volume_mm3 - prior.volume_mm3, 1)
        out["volume_change_percent"] = round(
            100 * (current.volume_mm3 - prior.volume_mm3) / prior.volume_mm3, 1
        )
        if days and days > 0 and current.volume_mm3 > prior.volume_mm3:
            doubling = days * math.log(2) / math.log(current.volume_mm3 / prior.volume_mm3)
            out["volume_doubling_days"] = round(doubling)
    return out


def compare(now: Findings, before: Findings, prior: Prior) -> Findings:
    """``now`` with each nodule's growth since ``prior`` (``attributes["growth"]``, or
    ``attributes["new"]``), ``summary["prior"]``, and the comparison in words
    (``summary["comments"]``, which the SR carries)."""
    pairs = match(now.findings, before.findings)
    when = _date(prior.study_date)
    since = f"the prior CT of {when}" if when else "the prior CT"
    if prior.interval_days is not None:
        since += f" ({prior.interval_days} days earlier)"
    comments = [f"Compared with {since}: {len(before.findings)} nodules then, "
                f"{len(now.findings)} now."]  # fmt: skip
    findings = []
    several = len(now.findings) > 1
    for index, finding in enumerate(now.findings):
        name = f"Nodule {index + 1}" if several else "Nodule"
        attributes = dict(finding.attributes or {})
        if index in pairs:
            j, distance = pairs[index]
            change = growth(finding, before.findings[j], distance, prior.interval_days)
            attributes["growth"] = change
            comments.append(f"{name}: {_sentence(finding, change)}")
        else:
            attributes["new"] = True
            comments.append(f"{name}: new since {since.split(' (')[0]}.")
        findings.append(replace(finding, attributes=attributes))
    gone = len(before.findings) - len(pairs)
    if gone:
        comments.append(f"{gone} nodule{'s' if gone > 1 else ''} of the prior not found now.")
    summary = {
        **dict(now.summary or {}),
        "prior": {
            "study_instance_uid": prior.study_instance_uid,
            "series_instance_uid": prior.series_instance_uid,
            "study_date": prior.study_date,
            "interval_days": prior.interval_days,
            "nodules": len(before.findings),
            "matched": len(pairs),
            "new": len(now.findings) - len(pairs),
            "not_found_now": gone,
        },
        "comments": [*(now.summary or {}).get("comments", ()), *comments],
    }
    return replace(now, findings=tuple(findings), summary=summary)


def _sentence(finding: Finding, change: dict[str, Any]) -> str:
    parts = []
    if "diameter_change_mm" in change:
        parts.append(
            f"diameter {finding.diameter_mm:.1f} mm, was {change['prior_diameter_mm']:.1f} mm "
            f"({change['diameter_change_mm']:+.1f} mm, {change['diameter_change_percent']:+.0f}%)"
        )
    if "volume_change_mm3" in change:
        parts.append(
            f"volume {finding.volume_mm3:.0f} mm3, was {change['prior_volume_mm3']:.0f} mm3 "
            f"({change['volume_change_percent']:+.0f}%)"
        )
    if "volume_doubling_days" in change:
        parts.append(f"volume doubling time {change['volume_doubling_days']} days")
    return "; ".join(parts) + "." if parts else "matched to a nodule of the prior."


def _date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else ""
