"""Findings as a Comprehensive 3D SR following TID 1500 (Measurement Report), with highdicom.

The model is the observer (a device: its name, version, and a UID derived from both); the
source images form the image library; each finding is one planar measurement group (TID 1410)
on the image where it is largest, with a tracking identifier and UID, its finding type and
site, and its numbers in UCUM units (the region's area mm2, diameter mm inferred from its 3-D
centre, volume mm3 inferred from its SEG segment, probability). A classification's grade is a
coded qualitative evaluation and a number; an indeterminate finding is evaluated as SNOMED CT
82334004 "Indeterminate" (never as its grade, never as absent), its probabilities in words.
A run that found nothing says so, and demo weights say so, in TID 1500's Qualitative
Evaluations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnode.domain import Code, Finding, Findings
from dicomnode.errors import ResultsError
from dicomnode.results.common import DEMO_NOTE, Producer, observer_device, stamp
from dicomnode.results.regions import KeyRegion, whole_image
from dicomnode.results.seg import SEG_STORAGE, SegResult
from dicomnode.results.source import SourceImages
from dicomnode.results.uids import ResultUIDs
from dicomnode.results.wording import finding_names, finding_text

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PROBABILITY = Code("122157", "DCM", "Probability")
#: a grade as a number, so that viewers listing a group's numbers show it
SEVERITY = Code("246112005", "SCT", "Severity")
GRADE_UNIT = Code("{grade}", "UCUM", "grade")
COMMENT = Code("121106", "DCM", "Comment")
#: the prefix of OHIF's (cornerstone3D's) tracking identifiers; see :func:`tracking_text`
CORNERSTONE_TOOLS = "Cornerstone3DTools@^0.1.0"
PIXELS = Code("{pixels}", "UCUM", "Pixels")
FINDING = Code("121071", "DCM", "Finding")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
#: what an indeterminate finding is evaluated as, in place of its grade or presence
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")
#: International Clinical Diabetic Retinopathy severity scale, grade -> SNOMED CT
ICDR = {
    0: ABSENT,
    1: Code("312903003", "SCT", "Mild nonproliferative diabetic retinopathy"),
    2: Code("312904009", "SCT", "Moderate nonproliferative diabetic retinopathy"),
    3: Code("312905005", "SCT", "Severe nonproliferative diabetic retinopathy"),
    4: Code("59276001", "SCT", "Proliferative diabetic retinopathy"),
}
#: Procedure reported (CID 100) by modality and region; a model may declare its own in
#: model.toml: [params] procedure_reported = { value = "...", scheme = "...", meaning = "..." }
CT_CHEST = Code("24627-2", "LN", "CT Chest")
MR_BRAIN = Code("24590-2", "LN", "MR Brain")
BY_MODALITY = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
}
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
CHEST_SITES = frozenset({"39607008", "51185008", "302551006"})  # lung, thorax, entire thorax
BRAIN_SITES = frozenset({"12738006", "258335003"})  # brain structure, entire brain


def procedure_reported(
    modality: str, body_part: str, sites: Sequence[Code], declared: Mapping[str, Any] | None
) -> Code:
    """What the report is about: the model's declared procedure, else by modality and region."""
    if declared:
        try:
            return Code(str(declared["value"]), str(declared["scheme"]), str(declared["meaning"]))
        except KeyError as exc:
            raise ResultsError(
                f"procedure_reported {dict(declared)!r} needs value, scheme and meaning"
            ) from exc
    codes = {site.value for site in sites}
    part = body_part.upper()
    if modality == "CT" and (codes & CHEST_SITES or part in {"CHEST", "LUNG", "THORAX"}):
        return CT_CHEST
    if modality == "MR" and (codes & BRAIN_SITES or part in {"BRAIN", "HEAD"}):
        return MR_BRAIN
    return BY_MODALITY.get(modality, IMAGING_PROCEDURE)


@dataclass(frozen=True)
class FindingClass:
    """A finding class the model looks for (a model.toml label); said to be absent in the SR
    when the model finds none."""

    label: str
    finding_type: Code
    finding_site: Code | None = None


def build_sr(
    findings: Findings,
    source: SourceImages,
    library: Sequence[Dataset],
    producer: Producer,
    uids: ResultUIDs,
    when: datetime,
    *,
    seg: SegResult | None,
    procedure: Code,
    series_number: int,
    series_description: str,
    regions: Sequence[KeyRegion],
    pixel_spacing: tuple[float, float],
    classes: Sequence[FindingClass] = (),
    not_analysed: str | None = None,
) -> Dataset:
    """The TID 1500 report of ``findings`` on ``source`` (``library``: every source image;
    ``regions``: each finding's region on its key slice, from :mod:`dicomnode.results.regions`;
    ``pixel_spacing``: the source's, row then column, in mm).

    ``not_analysed``: the model did not run on this input, and why; the report then says so in
    one group on the whole middle image (TID 1500 needs a group, a viewer an image) and its
    comment, and claims no finding absent."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frame_of_reference = str(source.first.get("FrameOfReferenceUID", ""))
    device = observer_device(producer, uids)
    context = hd.sr.ObservationContext(observer_device_context=device)
    algorithm = hd.sr.AlgorithmIdentification(name=producer.model, version=producer.version)
    if len(regions) != len(findings.findings):
        raise ResultsError(
            f"{len(regions)} image regions for {len(findings.findings)} findings; expected one each"
        )
    groups: list[Any] = []
    names = finding_names(findings.findings)
    for index, (finding, region) in enumerate(zip(findings.findings, regions, strict=True)):
        segment = seg.finding_segments[index] if seg is not None else None
        made = _groups(finding, index, names[index], region, segment, seg, source,
                       frame_of_reference, pixel_spacing, uids, algorithm)  # fmt: skip
        groups.extend(made)
    comments = []
    if producer.caution:
        comments.append(f"Outside the model's validated acquisition envelope: {producer.caution}")
    if not_analysed is not None:
        comments.append(not_analysed)
        whole = whole_image(source.shape, len(source.slices) // 2)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=_image_region(whole, source),
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.uid("not analysed"),
                    identifier=tracking_text(whole, f"Not analysed by {producer.model}"),
                ),
                algorithm_id=algorithm,
            )
        )
    elif producer.demo:
        comments.append(f"{producer.model} {producer.version} ran with {DEMO_NOTE}.")
    if not groups:
        looked_for = list(classes) or [FindingClass(producer.model, FINDING)]
        # said of the whole middle image: a viewer needs an image to show any group on
        whole = whole_image(source.shape, len(source.slices) // 2)
        everywhere = _image_region(whole, source)
        for number, absent in enumerate(looked_for, start=1):
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=everywhere,
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=uids.uid("absent", absent.label),
                        identifier=tracking_text(whole, f"no {absent.label} ({number})"),
                    ),
                    algorithm_id=algorithm,
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(_code(absent.finding_type), _code(ABSENT))
                    ],
                )
            )
        looked = ", ".join(a.label for a in classes) or "findings"
        comments.append(f"No findings: {producer.model} found no {looked}.")
    summary = findings.summary or {}
    if summary.get("grade_meaning"):
        comments.append(str(summary["grade_meaning"]))
    # what a model says in words of the whole input (e.g. growth since a prior study)
    comments.extend(str(text) for text in summary.get("comments") or ())
    if isinstance(summary.get("probabilities"), list | tuple):
        listed = ", ".join(f"{n}: {float(p):.3f}" for n, p in enumerate(summary["probabilities"]))
        comments.append(f"Probability of each grade ({summary.get('scale', 'ICDR')}): {listed}")
    try:
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=_code(procedure),
            imaging_measurements=groups,
        )
        if comments:
            report[0].ContentSequence.append(_evaluations(comments))
        evidence = [*library, *([seg.dataset] if seg is not None else [])]
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=uids.series("sr"),
            series_number=series_number,
            sop_instance_uid=uids.instance("sr"),
            instance_number=1,
            manufacturer=producer.manufacturer,
            is_complete=True,
            is_final=False,
            institution_name=producer.institution_name or None,
            series_description=series_description,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(
            f"SR of series {source.series_instance_uid} could not be built: {exc}"
        ) from exc
    # TID 1500 row order: ..., procedure reported, image library, imaging measurements. The
    # library goes in after highdicom has copied and searched the content tree, which costs
    # most of a second for the entries of a 300-slice CT (it adds no reference to check).
    items = list(sr.ContentSequence)
    at = next(i for i, item in enumerate(items) if _is(item, codes.DCM.ImagingMeasurements))
    sr.ContentSequence = DicomSequence([*items[:at], _library(library), *items[at:]])
    if producer.demo:
        sr.PreliminaryFlag = "PRELIMINARY"
    stamp(sr, when)
    return sr


def _is(item: Dataset, concept: Any) -> bool:
    """Whether a content item's concept name is ``concept``."""
    return bool(item.ConceptNameCodeSequence[0].CodeValue == concept.value)


def _groups(
    finding: Finding,
    index: int,
    name: str,
    region: KeyRegion,
    segment: int | None,
    seg: SegResult | None,
    source: SourceImages,
    frame_of_reference: str,
    pixel_spacing: tuple[float, float],
    uids: ResultUIDs,
    algorithm: Any,
) -> list[Any]:
    """One finding's measurement groups, under one tracking identifier and UID: its numbers
    (TID 1501), then its SEG segment (TID 1411).

    The numbers' group is the shape OHIF rebuilds into a measurement of its own tools: the
    first number is the area of the 2-D region where the finding is largest, inferred from
    that region (a SCOORD on the source image), and the others follow (the diameter inferred
    from the finding's 3-D centre). A planar group (TID 1410) cannot hold coordinates under its
    numbers, and without them OHIF draws the numbers but cannot list them."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    tracking = hd.sr.TrackingIdentifier(
        uid=uids.uid("finding", index + 1), identifier=tracking_text(region, name)
    )
    sites = [hd.sr.FindingSite(_code(finding.finding_site))] if finding.finding_site else None
    # the region goes under the first number, whichever that is
    drawn: list[Any] = [_coordinates(region, source)]
    measurements = []
    area = region.area_mm2(pixel_spacing)
    if area is not None:
        measurements.append(
            _measure(codes.SCT.Area, area, codes.UCUM.SquareMillimeter, coordinates=drawn)
        )
        drawn = []
    if finding.diameter_mm is not None:
        centre = []
        if finding.centre_mm is not None and frame_of_reference:
            centre = [
                hd.sr.CoordinatesForMeasurement3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=np.array([finding.centre_mm], dtype=np.float64),
                    frame_of_reference_uid=frame_of_reference,
                )
            ]
        measurements.append(
            _measure(codes.SCT.Diameter, finding.diameter_mm, codes.UCUM.Millimeter,
                     coordinates=drawn or centre)
        )  # fmt: skip
        drawn = []
    if finding.volume_mm3 is not None:
        measurements.append(
            _measure(codes.SCT.Volume, finding.volume_mm3, codes.UCUM.CubicMillimeter,
                     coordinates=drawn)
        )  # fmt: skip
        drawn = []
    grade = None if finding.indeterminate else _grade(finding)
    if grade is not None:
        measurements.append(_measure(_code(SEVERITY), grade, _code(GRADE_UNIT), coordinates=drawn))
        drawn = []
    measurements.append(
        _measure(_code(PROBABILITY), finding.probability, codes.UCUM.NoUnits, coordinates=drawn)
    )
    evaluations = [hd.sr.QualitativeEvaluation(*pair) for pair in _evaluations_of(finding)]
    about: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": _code(finding.finding_type),
        "algorithm_id": algorithm,
        "finding_sites": sites,
    }
    numbers = hd.sr.MeasurementsAndQualitativeEvaluations(
        measurements=measurements, qualitative_evaluations=evaluations or None, **about
    )
    # the finding in words: what OHIF lists the measurement under
    numbers[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=_code(COMMENT),
            value=finding_text(finding, name),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    groups: list[Any] = [numbers]
    if segment is not None and seg is not None:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=SEG_STORAGE,
                    sop_instance_uid=str(seg.dataset.SOPInstanceUID),
                    segment_number=segment,
                    source_series=hd.sr.SourceSeriesForSegmentation(source.series_instance_uid),
                ),
                **about,
            )
        )
    return groups


def tracking_text(region: KeyRegion, name: str) -> str:
    """A group's tracking identifier: OHIF's tool for its region, then the finding's name.

    OHIF (cornerstone3D's SR adapters) chooses the tool it rebuilds a group into, and so whether
    it lists the group among the measurements, from the start of this text, the way OHIF names
    its own groups; without it an outline or a circle is drawn but never listed."""
    return f"{CORNERSTONE_TOOLS}:{region.tool}:{name}"


def _coordinates(region: KeyRegion, source: SourceImages) -> Any:
    """``region`` as the SCOORD a number is inferred from (TID 320)."""
    import highdicom as hd

    return _scoord(hd.sr.CoordinatesForMeasurement, region, source)


def _image_region(region: KeyRegion, source: SourceImages) -> Any:
    """``region`` as an SCOORD on the source image (and frame) of its slice."""
    import highdicom as hd

    return _scoord(hd.sr.ImageRegion, region, source)


def _scoord(kind: Any, region: KeyRegion, source: SourceImages) -> Any:
    """A highdicom SCOORD item of class ``kind`` for ``region`` on its slice's image."""
    import highdicom as hd

    ds, frame = source.dataset_of(region.slice_index)
    return kind(
        graphic_type=hd.sr.GraphicTypeValues(region.graphic_type),
        graphic_data=region.graphic_data(),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            referenced_frame_numbers=None if frame is None else [frame],
        ),
    )


def _grade(finding: Finding) -> int | None:
    """A graded finding's grade (on the ICDR scale, 0 to 4), else None."""
    attributes = finding.attributes or {}
    grade = attributes.get("grade")
    if grade is None or str(attributes.get("scale", "ICDR")).upper() != "ICDR":
        return None
    try:
        value = int(grade)
    except (TypeError, ValueError) as exc:
        raise ResultsError(
            f"finding {finding.label!r} has ICDR grade {grade!r}; expected 0 to 4"
        ) from exc
    if value not in ICDR:
        raise ResultsError(f"finding {finding.label!r} has ICDR grade {grade!r}; expected 0 to 4")
    return value


def _evaluations_of(finding: Finding) -> list[tuple[Any, Any]]:
    """Coded evaluations: an indeterminate finding, Indeterminate; a graded finding's grade; a
    finding without a place, its presence."""
    if finding.indeterminate:
        return [(_code(finding.finding_type), _code(INDETERMINATE))]
    grade = _grade(finding)
    if grade is not None:
        return [(_code(finding.finding_type), _code(ICDR[grade]))]
    if finding.mask is None and finding.centre_mm is None:
        return [(_code(finding.finding_type), _code(PRESENT))]
    return []


def _measure(name: Any, value: float, unit: Any, *, coordinates: Sequence[Any] = ()) -> Any:
    """A TID 300 measurement, inferred from ``coordinates`` when there are any."""
    import highdicom as hd

    return hd.sr.Measurement(
        name=name, value=float(value), unit=unit,
        referenced_coordinates=list(coordinates) or None,
    )  # fmt: skip


def _library(images: Sequence[Dataset]) -> Dataset:
    """TID 1600 Image Library: one group per series, its shared descriptors (modality, frame of
    reference, rows, columns) once, then one entry per image. Plain datasets: highdicom's
    content items (and its own library, which repeats every descriptor per image) cost most of
    a second for a 300-slice CT."""
    from pydicom.sr.codedict import codes

    by_series: dict[tuple[str, str, int, int], list[Dataset]] = {}
    for ds in images:
        key = (str(ds.SeriesInstanceUID), str(ds.get("FrameOfReferenceUID", "")),
               int(ds.Rows), int(ds.Columns))  # fmt: skip
        by_series.setdefault(key, []).append(ds)
    source = _code_item(codes.SCT.Source)
    groups = []
    for (_, frame_of_reference, rows, columns), members in by_series.items():
        modality = _modality(str(members[0].get("Modality", "")))
        items = [_item("HAS ACQ CONTEXT", "CODE", codes.DCM.Modality,
                       ConceptCodeSequence=DicomSequence([_code_item(modality)]))]  # fmt: skip
        if frame_of_reference:
            items.append(_item("HAS ACQ CONTEXT", "UIDREF", codes.DCM.FrameOfReferenceUID,
                               UID=frame_of_reference))  # fmt: skip
        for concept, value in ((codes.DCM.PixelDataRows, rows),
                               (codes.DCM.PixelDataColumns, columns)):  # fmt: skip
            measured = Dataset()
            measured.NumericValue = value
            measured.MeasurementUnitsCodeSequence = DicomSequence([_code_item(PIXELS)])
            items.append(_item("HAS ACQ CONTEXT", "NUM", concept,
                               MeasuredValueSequence=DicomSequence([measured])))  # fmt: skip
        for ds in members:
            reference = Dataset()
            reference.ReferencedSOPClassUID = ds.SOPClassUID
            reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            image = Dataset()
            image.RelationshipType, image.ValueType = "CONTAINS", "IMAGE"
            image.ConceptNameCodeSequence = DicomSequence([source])
            image.ReferencedSOPSequence = DicomSequence([reference])
            items.append(image)
        groups.append(_item("CONTAINS", "CONTAINER", codes.DCM.ImageLibraryGroup,
                            ContinuityOfContent="SEPARATE",
                            ContentSequence=DicomSequence(items)))  # fmt: skip
    return _item("CONTAINS", "CONTAINER", codes.DCM.ImageLibrary, ContinuityOfContent="SEPARATE",
                 ContentSequence=DicomSequence(groups))  # fmt: skip


def _item(relationship: str, value_type: str, concept: Any, **values: Any) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = DicomSequence([_code_item(concept)])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _code_item(code: Any) -> Dataset:
    """A code sequence item (from our, pydicom's or highdicom's codes)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = getattr(code, "scheme_designator", None) or code.scheme
    item.CodeMeaning = code.meaning
    return item


def _modality(modality: str) -> Any:
    """The modality as a code of CID 29 (e.g. CT: Computed Tomography)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    found = _MODALITIES.get(modality)
    if found is None:
        collection = codes.cid29
        for name in collection.dir():
            code = getattr(collection, name)
            _MODALITIES[code.value] = hd.sr.CodedConcept(code.value, "DCM", code.meaning)
        found = _MODALITIES.get(modality)
    if found is None:
        raise ResultsError(f"modality {modality!r} of a source image is not in DICOM CID 29")
    return found


_MODALITIES: dict[str, Any] = {}


def _evaluations(comments: Sequence[str]) -> Any:
    """TID 1500 row 12: the Qualitative Evaluations container, here holding TEXT comments."""
    import highdicom as hd

    container = hd.sr.ContainerContentItem(
        name=_code(QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=_code(COMMENT),
                value=text[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for text in comments
        ]
    )
    return container


def _code(code: Code) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
