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

from dicomnode.domain import Findings
from dicomnode.errors import ResultsError
from dicomnode.results.common import DEMO_NOTE, Producer
from dicomnode.results.regions import KeyRegion
from dicomnode.results.render import WARNING, Line, Outline, colour_of, key_image
from dicomnode.results.sc import display_pixels, secondary_capture
from dicomnode.results.source import SourceImages
from dicomnode.results.uids import ResultUIDs
from dicomnode.results.wording import finding_names, finding_text

if TYPE_CHECKING:
    from dicomnode.results.sr import FindingClass

#: the warning line of every key image made with demo weights
DEMO_WARNING = DEMO_NOTE.upper()


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
