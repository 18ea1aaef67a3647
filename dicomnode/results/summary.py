"""Key images: each finding outlined on its key slice with its numbers burned in below, as a
Secondary Capture series a PACS viewer shows even where it renders neither SEG nor SR.

One image per key slice (findings whose regions share a slice share it); at most
``max_images``, the images of the most probable findings first, then in slice order. The
outlines are the SR's image regions (:mod:`dicomnode.results.regions`). No finding: one image of
the middle slice saying what was not found.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from dicomnode.domain import Finding, Findings
from dicomnode.errors import ResultsError
from dicomnode.results.common import DEMO_NOTE, Producer
from dicomnode.results.regions import KeyRegion
from dicomnode.results.render import WARNING, Line, Outline, colour_of, key_image
from dicomnode.results.sc import display_pixels, secondary_capture
from dicomnode.results.source import SourceImages
from dicomnode.results.uids import ResultUIDs

if TYPE_CHECKING:
    from dicomnode.results.sr import FindingClass

#: the warning line of every key image made with demo weights
DEMO_WARNING = DEMO_NOTE.upper()
#: ICDR grades, short
ICDR_SHORT = {0: "No DR", 1: "Mild NPDR", 2: "Moderate NPDR", 3: "Severe NPDR", 4: "PDR"}
#: at least this many mm3: shown in mL
ML_FROM_MM3 = 10_000.0


def finding_names(findings: Sequence[Finding]) -> list[str]:
    """Each finding's short name: its label in words, numbered where the label repeats
    (``Nodule 1``, ``Nodule 2``, ``Enhancing tumor``)."""
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.label] = counts.get(finding.label, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for finding in findings:
        words = finding.label.replace("_", " ").strip() or finding.finding_type.meaning
        if (finding.attributes or {}).get("grade") is not None:
            words = finding.finding_type.meaning  # "Diabetic retinopathy", not "dr grade"
        words = words[:1].upper() + words[1:]
        if counts[finding.label] > 1:
            seen[finding.label] = seen.get(finding.label, 0) + 1
            words = f"{words} {seen[finding.label]}"
        names.append(words)
    return names


def finding_text(finding: Finding, name: str) -> str:
    """One line of a finding's numbers, e.g. ``Nodule 1: 12.3 mm, 905 mm3, p=0.91``, ``Diabetic
    retinopathy grade 3 (Severe NPDR), p=0.85``."""
    probability = f"p={float(finding.probability):.2f}"
    attributes = finding.attributes or {}
    grade = attributes.get("grade")
    if grade is not None:
        scale = str(attributes.get("scale", "ICDR"))
        try:
            short = ICDR_SHORT.get(int(grade)) if scale.upper() == "ICDR" else None
        except (TypeError, ValueError):
            short = None
        words = f" ({short})" if short else ""
        return f"{finding.finding_type.meaning} grade {grade}{words}, {probability}"
    parts = []
    if finding.diameter_mm is not None:
        parts.append(f"{float(finding.diameter_mm):.1f} mm")
    if finding.volume_mm3 is not None:
        volume = float(finding.volume_mm3)
        parts.append(f"{volume / 1000:.1f} mL" if volume >= ML_FROM_MM3 else f"{volume:.0f} mm3")
    if not parts and finding.mask is None and finding.centre_mm is None:
        parts.append("present")
    return f"{name}: {', '.join([*parts, probability])}"


def not_found_text(classes: Sequence[FindingClass], model: str) -> str:
    labels = [c.label.replace("_", " ") for c in classes]
    return f"No {', '.join(labels)} found" if labels else f"{model}: no findings"


def key_slices(
    findings: Findings, regions: Sequence[KeyRegion], max_images: int
) -> list[tuple[int, list[int]]]:
    """The key images: (slice, indices of the findings on it), the slices of the most probable
    findings first, then in slice order; at most ``max_images``."""
    if len(regions) != len(findings.findings):
        raise ResultsError(
            f"{len(regions)} key regions for {len(findings.findings)} findings of {findings.model}"
        )
    on: dict[int, list[int]] = {}
    for index, region in enumerate(regions):
        on.setdefault(region.slice_index, []).append(index)
    best = {k: max(float(findings.findings[i].probability) for i in ids) for k, ids in on.items()}
    ranked = sorted(on, key=lambda k: (-best[k], k))[:max_images]
    return [(k, on[k]) for k in ranked]


def build_summary(
    findings: Findings,
    regions: Sequence[KeyRegion],
    source: SourceImages,
    producer: Producer,
    uids: ResultUIDs,
    when: datetime,
    *,
    series_number: int,
    series_description: str,
    max_images: int = 8,
    classes: Sequence[FindingClass] = (),
) -> list[Dataset]:
    """The key images of ``findings`` (``regions``: each finding's, from
    :func:`~dicomnode.results.regions.finding_regions`) as RGB Secondary Captures."""
    names = finding_names(findings.findings)
    texts = [finding_text(f, n) for f, n in zip(findings.findings, names, strict=True)]
    chosen = key_slices(findings, regions, max_images)
    warning = [Line(DEMO_WARNING, WARNING)] if producer.demo else []
    if not chosen:
        chosen = [(len(source.slices) // 2, [])]
    images: list[Dataset] = []
    for number, (k, indices) in enumerate(chosen, start=1):
        ds, frame = source.dataset_of(k)
        outlines = [Outline(regions[i], colour_of(i), names[i]) for i in indices]
        lines = [Line(texts[i], colour_of(i)) for i in indices]
        if not findings.findings:
            lines = [Line(not_found_text(classes, producer.model))]
        comments = "; ".join(line.text for line in lines)
        lines = [Line(f"{producer.model} {producer.version}"), *lines, *warning]
        rgb = key_image(display_pixels(ds, frame), outlines, lines)
        where = f"frame {frame} of " if frame is not None else ""
        note = (
            f"{producer.model} {producer.version} key image {number} of {len(chosen)}, "
            f"{where}{ds.SOPInstanceUID}: {comments}"
        )
        if producer.demo:
            note += f"; {DEMO_NOTE}"
        sc = secondary_capture(
            rgb, ds, frame, producer, when,
            series_instance_uid=uids.series("summary"),
            sop_instance_uid=uids.instance("summary", number),
            instance_number=number,
            series_number=series_number,
            series_description=series_description,
            comments=note,
            derivation=f"{producer.model} findings outlined on the source",
        )  # fmt: skip
        images.append(sc)
    return images


def summary_text(
    findings: Findings, producer: Producer, classes: Sequence[FindingClass] = ()
) -> str:
    """Every finding's line (or what was not found), and the demo warning: the key object
    description of the KOS."""
    names = finding_names(findings.findings)
    lines = [finding_text(f, n) for f, n in zip(findings.findings, names, strict=True)]
    if not lines:
        lines = [not_found_text(classes, producer.model)]
    text = f"{producer.model} {producer.version}: " + "; ".join(lines)
    return f"{text}. {DEMO_WARNING}" if producer.demo else text
