"""Findings' masks as a DICOM Segmentation (highdicom): one binary segment per finding class.

A model's masks are integer label maps on the grid of its input volume (``[slice k, row j,
column i]``); a finding names its voxels by ``MaskRef(name, value)``. Each finding class (the
model.toml label a finding carries) becomes one segment; the voxels of every finding of that
class are that segment's. Slice ``k`` is written as a frame at the position of the source frame
it came from (single-frame instance or frame of a multi-frame object), so the SEG references the
source images frame by frame with the same geometry. Empty slices are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.domain import Code, Findings
from dicomnode.errors import ResultsError
from dicomnode.results.common import Producer, lo, stamp
from dicomnode.results.regions import mask_of
from dicomnode.results.source import SourceImages
from dicomnode.results.uids import ResultUIDs

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Segmented property categories (CID 7150)
LESION = Code("49755003", "SCT", "Morphologically Abnormal Structure")
ANATOMY = Code("91723000", "SCT", "Anatomical Structure")
#: a finding's ``category`` -> its segments' category
CATEGORIES = {"anatomy": ANATOMY, "lesion": LESION}
#: Finding types that are anatomy rather than a lesion, for findings that name no category (the
#: model packages'): the category follows from the type
ANATOMICAL_TYPES = frozenset(
    {
        "123037004",  # Body structure
        "39607008",  # Lung structure
        "12738006",  # Brain structure
        "5665001",  # Retinal structure
        "10200004",  # Liver structure
    }
)
#: Recommended display colours, segment by segment
PALETTE = ("yellow", "red", "lime", "dodgerblue", "magenta", "cyan", "orange", "white")


@dataclass(frozen=True)
class Segment:
    """One segment: the finding class it holds."""

    number: int
    label: str
    finding_type: Code
    finding_site: Code | None
    category: str | None = None  # the finding's: "anatomy", "lesion", None (from the type)


@dataclass(frozen=True)
class SegResult:
    """The SEG, its segments, and each finding's segment number (None: not in the SEG)."""

    dataset: Dataset
    segments: tuple[Segment, ...]
    finding_segments: tuple[int | None, ...]


def plan_segments(
    findings: Findings, label_order: Mapping[str, int] | None = None
) -> tuple[tuple[Segment, ...], tuple[int | None, ...], dict[str, np.ndarray]]:
    """Segments (one per finding class with voxels), each finding's segment number, and per
    mask a lookup table from its label values to segment numbers (0: not segmented)."""
    order = dict(label_order or {})
    classes: dict[str, Any] = {}
    for finding in findings.findings:
        if finding.mask is not None and finding.label not in classes:
            classes[finding.label] = finding
    ranked = sorted(classes, key=lambda name: (order.get(name, 1 << 20), list(classes).index(name)))
    segments = tuple(
        Segment(
            n, name, classes[name].finding_type, classes[name].finding_site, classes[name].category
        )
        for n, name in enumerate(ranked, start=1)
    )
    number = {s.label: s.number for s in segments}
    luts: dict[str, np.ndarray] = {}
    finding_segments: list[int | None] = []
    for finding in findings.findings:
        ref = finding.mask
        if ref is None:
            finding_segments.append(None)
            continue
        mask = mask_of(findings, finding)
        lut = luts.get(ref.name)
        if lut is None:
            top = int(mask.max()) if mask.size else 0
            lut = luts[ref.name] = np.zeros(max(top, ref.value) + 1, dtype=np.uint8)
        elif ref.value >= len(lut):
            lut = luts[ref.name] = np.pad(lut, (0, ref.value + 1 - len(lut)))
        lut[ref.value] = number[finding.label]
        finding_segments.append(number[finding.label])
    return segments, tuple(finding_segments), luts


def build_seg(
    findings: Findings,
    source: SourceImages,
    producer: Producer,
    uids: ResultUIDs,
    when: datetime,
    *,
    series_number: int,
    series_description: str,
    label_order: Mapping[str, int] | None = None,
) -> SegResult | None:
    """The SEG of ``findings`` over ``source`` (None: no finding has voxels)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segments, finding_segments, luts = plan_segments(findings, label_order)
    if not segments:
        return None
    shape = (len(source.slices), int(source.first.Rows), int(source.first.Columns))
    for name in luts:
        got = tuple(np.shape(findings.masks[name]))
        if got != shape:
            raise ResultsError(
                f"mask {name!r} is {got}; the source series {source.series_instance_uid} is "
                f"{shape} (slices, rows, columns)"
            )
    pixels, planes = _frames(findings.masks, luts, len(segments))
    if pixels is None:
        return None  # findings refer to labels no voxel carries
    if source.multiframe and len(source.datasets) > 1:
        raise ResultsError(
            f"series {source.series_instance_uid} spreads its slices over "
            f"{len(source.datasets)} multi-frame objects; a SEG refers to one"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=producer.model,
        family=codes.cid7162.ArtificialIntelligence,
        version=producer.version,
        source=producer.manufacturer,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=segment.number,
            segment_label=lo(segment.label),
            segmented_property_category=_code(_category(segment)),
            segmented_property_type=_code(segment.finding_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=uids.uid("segment", segment.label),
            tracking_id=lo(f"{producer.model} {segment.label}"),
            anatomic_regions=(
                [_code(segment.finding_site)] if segment.finding_site is not None else None
            ),
            display_color=hd.color.CIELabColor.from_string(
                PALETTE[(segment.number - 1) % len(PALETTE)]
            ),
        )
        for segment in segments
    ]
    if source.multiframe:
        # the one multi-frame source: highdicom matches each frame's position to its frames
        images, positions = list(source.datasets), _plane_positions(source, planes)
    else:
        # single-frame sources: the images of the segmented slices, frame for frame (checking
        # all 300 images of a CT would cost most of a second and add nothing)
        images, positions = [source.datasets[source.slices[k][0]] for k in planes], None
    try:
        seg = hd.seg.Segmentation(
            source_images=images,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=uids.series("seg"),
            series_number=series_number,
            sop_instance_uid=uids.instance("seg"),
            instance_number=1,
            manufacturer=producer.manufacturer,
            manufacturer_model_name=lo(producer.model_name),
            software_versions=producer.software_versions,
            device_serial_number=producer.device_serial_number,
            content_description=lo(f"{producer.model} {producer.version} segmentation"),
            content_creator_name=None,
            content_label="SEGMENTATION",
            plane_positions=positions,
            omit_empty_frames=True,
            series_description=series_description,
            institution_name=producer.institution_name or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(
            f"SEG of series {source.series_instance_uid} could not be built: {exc}"
        ) from exc
    # highdicom draws a random Dimension Organization UID; the same job gets the same one
    organisation = uids.uid("seg", "dimension organization")
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = organisation
    stamp(seg, when)
    return SegResult(seg, segments, finding_segments)


def _frames(
    masks: Mapping[str, Any], luts: Mapping[str, np.ndarray], count: int
) -> tuple[np.ndarray | None, list[int]]:
    """The non-empty slices as frames: a segment-number label map (one mask), or stacked
    binary segments (several masks, which may overlap); and their slice indices."""
    per_mask = {}
    for name, lut in luts.items():
        mask = np.asarray(masks[name])
        if mask.dtype.kind not in "iub":
            raise ResultsError(f"mask {name!r} is {mask.dtype}; masks are integer label maps")
        flat = mask.reshape(mask.shape[0], -1)
        touched = np.flatnonzero(flat.any(axis=1))
        per_mask[name] = (mask, lut, touched)
    planes = sorted({int(k) for _, _, touched in per_mask.values() for k in touched})
    if not planes:
        return None, []
    rows, columns = next(iter(per_mask.values()))[0].shape[1:]
    if len(per_mask) == 1:
        mask, lut, _ = next(iter(per_mask.values()))
        values = np.clip(mask[planes], 0, len(lut) - 1)
        labels = lut[values]
        if not labels.any():
            return None, []
        return labels, planes
    stacked = np.zeros((len(planes), rows, columns, count), dtype=np.uint8)
    for mask, lut, _ in per_mask.values():
        labels = lut[np.clip(mask[planes], 0, len(lut) - 1)]
        for number in range(1, count + 1):
            stacked[..., number - 1] |= labels == number
    if not stacked.any():
        return None, []
    return stacked, planes


def _plane_positions(source: SourceImages, planes: Sequence[int]) -> list[Any]:
    """Each frame's Plane Position (Patient), copied from the source frame of its slice (the
    one multi-frame source's per-frame, else shared, functional groups)."""
    import highdicom as hd

    (ds,) = source.datasets
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    positions = []
    for k in planes:
        frame = source.slices[k][1]
        assert frame is not None  # a multi-frame source
        group = per_frame[frame - 1] if frame <= len(per_frame) else Dataset()
        plane = group.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        if not plane:
            raise ResultsError(
                f"frame {frame} of source instance {ds.SOPInstanceUID} has no Plane Position "
                "(Patient)"
            )
        positions.append(
            hd.PlanePositionSequence(
                hd.CoordinateSystemNames.PATIENT, plane[0].ImagePositionPatient
            )
        )
    return positions


def _category(segment: Segment) -> Code:
    """The segment's category: its finding's, else anatomy for a type in
    :data:`ANATOMICAL_TYPES` and a lesion for any other."""
    if segment.category is None:
        return ANATOMY if segment.finding_type.value in ANATOMICAL_TYPES else LESION
    try:
        return CATEGORIES[segment.category]
    except KeyError:
        raise ResultsError(
            f"finding {segment.label!r} has category {segment.category!r}; expected one of "
            f"{', '.join(map(repr, CATEGORIES))}"
        ) from None


def _code(code: Code) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
