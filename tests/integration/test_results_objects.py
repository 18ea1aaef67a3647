"""Findings as DICOM objects, checked by the tools that read them: dciodvfy (the IOD), dcmqi
(SEG to an image in patient space, TID 1500 SR to JSON, as 3D Slicer reads them) and highdicom
(each object read back compares equal to what was built)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.config import ResultsSettings
from dicomnode.domain import Code, Finding, Findings, MaskRef
from dicomnode.imaging import Volume, load_series
from dicomnode.phantoms.chest import ChestPhantom, Nodule, chest_ct
from dicomnode.phantoms.writer import write_volume
from dicomnode.results import FindingClass, build_objects, build_results, write_objects
from dicomnode.testing import validators

hd = pytest.importorskip("highdicom")

NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung structure")
NODULE_CLASS = FindingClass("nodule", NODULE, LUNG)
WHEN = datetime(2026, 11, 21, 9, 30, tzinfo=UTC)
SETTINGS = ResultsSettings()


@dataclass(frozen=True)
class Chest:
    phantom: ChestPhantom
    paths: list[Path]
    volume: Volume


def write_chest(folder: Path, *, enhanced: bool = False) -> Chest:
    nodules = [
        Nodule(10.0, "solid", center_voxel=(20.0, 30.0, 14.0)),
        Nodule(8.0, "ground_glass", center_voxel=(44.0, 36.0, 25.0)),
    ]
    phantom = chest_ct((40, 64, 64), (1.5, 1.5, 2.5), "axial", nodules=nodules, seed=3)
    paths = phantom.write(folder, enhanced=enhanced)
    volume = load_series(paths)
    assert volume.geometry.isclose(phantom.geometry)
    return Chest(phantom, paths, volume)


def nodule_findings(phantom: ChestPhantom, *, demo: bool = True) -> Findings:
    """What the lung nodule model reports: finding n is label n of the ``nodules`` mask."""
    findings = tuple(
        Finding(
            "nodule", NODULE, 0.9 - 0.1 * n, LUNG, truth.center_mm, truth.diameter_mm,
            truth.volume_mm3, MaskRef("nodules", truth.label), {"texture": truth.kind},
        )
        for n, truth in enumerate(phantom.truth.nodules)
    )  # fmt: skip
    labels = phantom.nodule_labels.astype(np.uint8)
    return Findings("lung_nodule", "0.1.0", demo, findings, {"nodules": labels})


@pytest.fixture(scope="module", params=["single-frame", "enhanced"])
def chest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Chest:
    enhanced = request.param == "enhanced"
    return write_chest(tmp_path_factory.mktemp(request.param), enhanced=enhanced)


@pytest.fixture(scope="module")
def written(chest: Chest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The nodules' SEG and SR, built, written, and their datasets as built."""
    storage = tmp_path_factory.mktemp("storage")
    built = build_objects(
        nodule_findings(chest.phantom), chest.volume, chest.paths, SETTINGS,
        route="chest-ct", when=WHEN, classes=[NODULE_CLASS],
    )  # fmt: skip
    objects = write_objects(built, storage, 7)
    return {
        "storage": storage,
        "objects": {o.kind: o for o in objects},
        "built": {kind: ds for kind, _, ds in built.datasets},
    }


def texts(ds: Dataset) -> list[str]:
    """Every TEXT content item's value in an SR, depth first."""
    found = []
    for item in ds.get("ContentSequence") or ():
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found += texts(item)
    return found


def json_of(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict(bulk_data_threshold=1 << 30)


def test_seg_and_sr_pass_dciodvfy(written: dict[str, Any]) -> None:
    validators.require_tool("dciodvfy")
    assert set(written["objects"]) == {"SEG", "SR", "SC", "KO"}  # SC: key images
    for kind, entry in written["objects"].items():
        report = validators.dciodvfy(written["storage"] / entry.path)
        assert report.errors == (), f"{kind}: {report.output}"


def test_objects_are_described_for_the_send_queue(written: dict[str, Any], chest: Chest) -> None:
    study = str(dcmread(chest.paths[0], stop_before_pixels=True).StudyInstanceUID)
    seg, sr = written["objects"]["SEG"], written["objects"]["SR"]
    assert seg.path == "results/7/dicom/seg.dcm" and sr.path == "results/7/dicom/sr.dcm"
    assert seg.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4"
    assert sr.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.34"
    assert seg.study_instance_uid == sr.study_instance_uid == study
    assert seg.series_instance_uid != sr.series_instance_uid
    assert set(seg.as_json()) == {"kind", "path", "sop_class_uid", "sop_instance_uid",
                                  "series_instance_uid", "study_instance_uid"}  # fmt: skip
    ds = dcmread(written["storage"] / seg.path, stop_before_pixels=True)
    assert ds.SeriesNumber == SETTINGS.seg_series_number
    assert ds.SeriesDescription == "lung_nodule segmentation (demo)"
    assert ds.ManufacturerModelName == "lung_nodule 0.1.0 (demo weights: not for clinical use)"
    assert ds.ContentDate == WHEN.astimezone().strftime("%Y%m%d")


def test_dcmqi_reads_the_seg_with_each_nodule_at_its_place(
    written: dict[str, Any], chest: Chest, tmp_path: Path
) -> None:
    import SimpleITK as sitk  # noqa: N813

    validators.require_tool("segimage2itkimage")
    path = written["storage"] / written["objects"]["SEG"].path
    images, meta = validators.segimage2itkimage(path, tmp_path / "dcmqi")
    (image_path,) = images
    image = sitk.ReadImage(str(image_path))
    array = sitk.GetArrayFromImage(image)  # [z, y, x]
    (segment,) = meta["segmentAttributes"][0]
    assert segment["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "27925004"
    assert segment["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] == "49755003"
    assert segment["SegmentAlgorithmName"] == "lung_nodule"
    # every nodule centre (patient mm, LPS as ITK's physical space) is labelled there
    for truth in chest.phantom.truth.nodules:
        index = image.TransformPhysicalPointToIndex(truth.center_mm)
        assert image[index] == 1, f"nodule at {truth.center_mm} not in the SEG"
    # and the segment holds exactly the mask's voxels
    assert int((array == 1).sum()) == int((chest.phantom.nodule_labels > 0).sum())


def test_highdicom_reads_the_seg_back_as_built(written: dict[str, Any], chest: Chest) -> None:
    path = written["storage"] / written["objects"]["SEG"].path
    seg = hd.seg.segread(path)
    assert json_of(seg) == json_of(written["built"]["SEG"])
    description = seg.get_segment_description(1)
    assert description.segment_label == "nodule"
    assert description.segmented_property_type.value == "27925004"
    mask = chest.phantom.nodule_labels > 0
    planes = [k for k in range(mask.shape[0]) if mask[k].any()]
    assert int(seg.NumberOfFrames) == len(planes)  # empty slices left out
    if chest.volume.frames[0].frame_number is None:
        uids = [chest.volume.frames[k].sop_instance_uid for k in planes]
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])
    else:
        frames = [chest.volume.frames[k].frame_number for k in planes]
        pixels = seg.get_pixels_by_source_frame(
            chest.volume.frames[0].sop_instance_uid, frames, segment_numbers=[1]
        )
    assert np.array_equal(pixels[..., 0] > 0, mask[planes])


def test_dcmqi_and_highdicom_read_the_sr(
    written: dict[str, Any], chest: Chest, tmp_path: Path
) -> None:
    validators.require_tool("tid1500reader")
    path = written["storage"] / written["objects"]["SR"].path
    seg_uid = written["objects"]["SEG"].sop_instance_uid
    report = validators.tid1500reader(path, tmp_path / "sr.json")
    # a finding's groups share its tracking UID: its numbers, its SEG segment
    by_finding: dict[str, list[dict[str, Any]]] = {}
    for group in report["Measurements"]:
        by_finding.setdefault(group["TrackingUniqueIdentifier"], []).append(group)
    assert len(by_finding) == 2
    for number, (groups, truth) in enumerate(
        zip(by_finding.values(), chest.phantom.truth.nodules, strict=True), start=1
    ):
        assert len(groups) == 2
        (segmented,) = [g for g in groups if "ReferencedSegment" in g]
        assert segmented["ReferencedSegment"] == 1
        assert segmented["segmentationSOPInstanceUID"] == seg_uid
        assert {g["Finding"]["CodeValue"] for g in groups} == {"27925004"}
        assert {g["FindingSite"]["CodeValue"] for g in groups} == {"39607008"}
        # OHIF's tool for an outline, then the finding's name
        assert {g["TrackingIdentifier"] for g in groups} == {
            f"Cornerstone3DTools@^0.1.0:PlanarFreehandROI:Nodule {number}"
        }
        (numbered,) = [g for g in groups if g["measurementItems"]]
        values = {m["quantity"]["CodeMeaning"]: (float(m["value"]), m["units"]["CodeValue"])
                  for m in numbered["measurementItems"]}  # fmt: skip
        assert list(values) == ["Area", "Diameter", "Volume", "Probability"]
        assert values["Area"][1] == "mm2"
        assert values["Diameter"] == (pytest.approx(truth.diameter_mm), "mm")
        assert values["Volume"] == (pytest.approx(truth.volume_mm3), "mm3")
        assert values["Probability"][1] == "1"
    assert len(report["imageLibrary"]) == len({f.sop_instance_uid for f in chest.volume.frames})

    sr = hd.sr.srread(path)
    assert json_of(sr) == json_of(written["built"]["SR"])
    content = sr.content
    segmented_groups = content.get_volumetric_roi_measurement_groups()
    numbered_groups = content.get_image_measurement_groups()
    assert len(segmented_groups) == 2 and len(numbered_groups) == 2
    assert not content.get_planar_roi_measurement_groups()
    labels = chest.phantom.nodule_labels
    spacing = chest.volume.geometry.pixel_spacing
    for number, (segmented_group, group, truth) in enumerate(
        zip(segmented_groups, numbered_groups, chest.phantom.truth.nodules, strict=True), start=1
    ):
        assert segmented_group.tracking_uid == group.tracking_uid  # one finding
        assert segmented_group.referenced_segment.referenced_segment_numbers == [1]
        area, diameter, _, _ = group.get_measurements()
        # the area is of the outline on the slice where the nodule is largest, around its pixels
        (outline,) = area.referenced_coordinates
        assert outline.graphic_type.value == "POLYLINE"
        areas = (labels == truth.label).sum(axis=(1, 2))
        k = int(np.argmax(areas))
        (image,) = [i for i in outline.ContentSequence if i.ValueType == "IMAGE"]
        reference = image.ReferencedSOPSequence[0]
        frame = chest.volume.frames[k]
        assert reference.ReferencedSOPInstanceUID == frame.sop_instance_uid
        if frame.frame_number is not None:
            assert reference.ReferencedFrameNumber == frame.frame_number
        columns, rows = outline.value[:, 0], outline.value[:, 1]
        js, is_ = np.nonzero(labels[k] == truth.label)
        assert rows.min() == js.min() and rows.max() == js.max() + 1
        assert columns.min() == is_.min() and columns.max() == is_.max() + 1
        # the outline holds the nodule's pixels there, and not many more
        pixels = areas[k] * spacing[0] * spacing[1]
        assert pixels <= area.value <= 1.5 * pixels
        # the diameter is measured about the nodule's 3-D centre
        (centre,) = diameter.referenced_coordinates
        assert centre.graphic_type.value == "POINT"
        assert centre.value.ravel().tolist() == pytest.approx(truth.center_mm, abs=1e-3)
        assert centre.frame_of_reference_uid == dcmread(chest.paths[0]).FrameOfReferenceUID
        # the finding in words, which OHIF lists it under
        (said,) = [i.TextValue for i in group[0].ContentSequence
                   if i.ConceptNameCodeSequence[0].CodeValue == "121106"]  # fmt: skip
        assert said.startswith(f"Nodule {number}: {truth.diameter_mm:.1f} mm, ")
    (device,) = content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert "demo weights" in device.observer_identifying_attributes.model_name
    assert "lung_nodule 0.1.0 ran with demo weights: not for clinical use." in texts(sr)
    assert sr.PreliminaryFlag == "PRELIMINARY"
    procedure = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "24627-2"  # CT Chest


def test_the_same_job_twice_writes_identical_objects(chest: Chest, tmp_path: Path) -> None:
    findings = nodule_findings(chest.phantom)
    runs = []
    for n in range(2):
        objects, _ = build_results(
            findings, chest.volume, chest.paths, SETTINGS, tmp_path / f"run{n}", 5,
            route="chest-ct", when=WHEN, classes=[NODULE_CLASS],
        )  # fmt: skip
        runs.append(objects)
    first, second = runs
    assert [o.as_json() for o in first] == [o.as_json() for o in second]
    for a, b in zip(first, second, strict=True):
        assert (tmp_path / "run0" / a.path).read_bytes() == (
            tmp_path / "run1" / b.path
        ).read_bytes()
    # another route (another job on the same input) gets other UIDs; another root, its own
    other, _ = build_results(
        findings, chest.volume, chest.paths, SETTINGS, tmp_path / "other", 5,
        route="another-route", when=WHEN,
    )  # fmt: skip
    assert {o.sop_instance_uid for o in other}.isdisjoint(o.sop_instance_uid for o in first)
    rooted, _ = build_results(
        findings, chest.volume, chest.paths, ResultsSettings(uid_root="1.2.826.0.1.3680043.10.9"),
        tmp_path / "rooted", 5, route="chest-ct", when=WHEN,
    )  # fmt: skip
    assert all(o.sop_instance_uid.startswith("1.2.826.0.1.3680043.10.9.") for o in rooted)
    assert all(len(o.sop_instance_uid) <= 64 for o in rooted)


def test_sources_without_type2_attributes_give_valid_objects(tmp_path: Path) -> None:
    validators.require_tool("dciodvfy")
    chest = write_chest(tmp_path / "full")
    stripped = []
    for path in chest.paths:
        ds = dcmread(path)
        for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName",
                        "AccessionNumber"):  # fmt: skip
            delattr(ds, keyword)
        out = tmp_path / "stripped" / path.name
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        stripped.append(out)
    objects, _ = build_results(
        nodule_findings(chest.phantom), load_series(stripped), stripped, SETTINGS,
        tmp_path / "storage", 1, route="chest-ct", when=WHEN,
    )  # fmt: skip
    assert [o.kind for o in objects] == ["SEG", "SR", "SC", "SC", "KO"]  # two key images
    for entry in objects:
        path = tmp_path / "storage" / entry.path
        report = validators.dciodvfy(path)
        assert report.errors == (), report.output
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.PatientBirthDate == ds.PatientSex == ds.AccessionNumber == ""
        assert ds.PatientID == "PHANTOM-1"


def test_no_findings_give_an_sr_that_says_so(tmp_path: Path) -> None:
    validators.require_tool("dciodvfy")
    validators.require_tool("tid1500reader")
    chest = write_chest(tmp_path / "ct")
    empty = Findings("lung_nodule", "0.1.0", True, (), {})
    objects, _ = build_results(
        empty, chest.volume, chest.paths, SETTINGS, tmp_path / "storage", 2,
        route="chest-ct", when=WHEN, classes=[NODULE_CLASS],
    )  # fmt: skip
    assert [o.kind for o in objects] == ["SR", "SC", "KO"]  # a key image saying so
    entry = objects[0]
    path = tmp_path / "storage" / entry.path
    assert validators.dciodvfy(path).errors == ()
    report = validators.tid1500reader(path, tmp_path / "sr.json")
    assert len(report["Measurements"]) == 1
    content = hd.sr.srread(path).content
    (group,) = content.get_planar_roi_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name.value == "27925004" and evaluation.value.value == "272519000"  # absent
    # said of the whole middle slice, so that a viewer has an image to show it on
    middle = chest.volume.frames[len(chest.volume.frames) // 2]
    (image,) = [i for i in group.roi.ContentSequence if i.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == middle.sop_instance_uid
    assert group.roi.value.tolist() == [[0, 0], [64, 0], [64, 64], [0, 64], [0, 0]]
    assert "No findings: lung_nodule found no nodule." in texts(hd.sr.srread(path))


def test_study_level_segmentation_with_three_labels(tmp_path: Path) -> None:
    """A brain_tumor-like result: three sub-regions in one label map on the FLAIR series of a
    two-series study; the SEG is on FLAIR, the SR's evidence has both series."""
    import SimpleITK as sitk  # noqa: N813

    validators.require_tool("dciodvfy")
    validators.require_tool("segimage2itkimage")
    phantom = chest_ct((24, 48, 48), (2.0, 2.0, 3.0), "oblique", seed=9, vessels=False)
    study = "1.2.826.0.1.3680043.10.1447.77"
    volumes, paths = {}, []
    for name in ("FLAIR", "T1"):
        files = write_volume(phantom.array, phantom.geometry, tmp_path / name, study_uid=study,
                             series_description=name, seed=len(paths))  # fmt: skip
        volumes[name] = load_series(files)
        paths += files
    tumor = np.zeros(phantom.geometry.shape, dtype=np.uint8)
    tumor[8:16, 16:32, 16:32] = 2  # edema around
    tumor[10:14, 20:28, 20:28] = 3  # enhancing rim
    tumor[11:13, 22:26, 22:26] = 1  # necrotic core
    regions = {"necrotic_core": Code("6574001", "SCT", "Necrosis"),
             "edema": Code("79654002", "SCT", "Edema"),
             "enhancing_tumor": Code("108369006", "SCT", "Neoplasm")}  # fmt: skip
    brain = Code("12738006", "SCT", "Brain structure")
    classes = [FindingClass(name, code, brain) for name, code in regions.items()]
    voxel_mm3 = float(abs(np.linalg.det(phantom.geometry.affine[:3, :3])))
    findings = Findings(
        "brain_tumor", "0.2.0", True,
        tuple(
            Finding(name, regions[name], 0.8, brain, mask=MaskRef("tumor", v),
                    volume_mm3=float((tumor == v).sum()) * voxel_mm3)
            for name, v in (("edema", 2), ("enhancing_tumor", 3), ("necrotic_core", 1))
        ),
        {"tumor": tumor},
        reference=volumes["FLAIR"].series_instance_uid,
    )  # fmt: skip
    objects, _ = build_results(
        findings, volumes, paths, SETTINGS, tmp_path / "storage", 3,
        route="brain-mri", when=WHEN, classes=classes,
    )  # fmt: skip
    by_kind = {o.kind: tmp_path / "storage" / o.path for o in objects}
    for path in by_kind.values():
        assert validators.dciodvfy(path).errors == ()
    seg = hd.seg.segread(by_kind["SEG"])
    labels = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    assert labels == ["necrotic_core", "edema", "enhancing_tumor"]  # model.toml order
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volumes["FLAIR"].series_instance_uid
    images, _ = validators.segimage2itkimage(by_kind["SEG"], tmp_path / "dcmqi")
    counts: dict[int, int] = {}
    for image in images:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
        for value in np.unique(array[array > 0]):
            counts[int(value)] = counts.get(int(value), 0) + int((array == value).sum())
    assert counts == {1: int((tumor == 1).sum()), 2: int((tumor == 2).sum()),
                      3: int((tumor == 3).sum())}  # fmt: skip
    sr = hd.sr.srread(by_kind["SR"])
    segments = {
        g.finding_type.meaning: g.referenced_segment.referenced_segment_numbers[0]
        for g in sr.content.get_volumetric_roi_measurement_groups()
    }
    assert segments == {"Edema": 2, "Neoplasm": 3, "Necrosis": 1}
    evidence = {s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence}  # fmt: skip
    assert {v.series_instance_uid for v in volumes.values()} <= evidence


def test_seg_on_a_vendor_enhanced_ct_refers_to_its_frames(tmp_path: Path) -> None:
    """pydicom's eCT_Supplemental.dcm: a real two-frame Enhanced CT, its frames stored in the
    opposite order to the volume's slices."""
    import SimpleITK as sitk  # noqa: N813
    from pydicom.data import get_testdata_file

    validators.require_tool("dciodvfy")
    validators.require_tool("segimage2itkimage")
    path = Path(str(get_testdata_file("eCT_Supplemental.dcm")))
    volume = load_series([path])
    mask = np.zeros(volume.geometry.shape, dtype=np.uint8)
    mask[0, 200:260, 300:340] = 1  # in the volume's first slice only
    centre = volume.geometry.voxel_to_patient([319.5, 229.5, 0.0])
    finding = Finding("nodule", NODULE, 0.7, LUNG, tuple(centre), mask=MaskRef("nodules", 1))
    findings = Findings("lung_nodule", "0.1.0", False, (finding,), {"nodules": mask})
    objects, _ = build_results(findings, volume, [path], SETTINGS, tmp_path / "storage", 4,
                               route="chest-ct", when=WHEN)  # fmt: skip
    seg_path = tmp_path / "storage" / objects[0].path
    for entry in objects:
        assert validators.dciodvfy(tmp_path / "storage" / entry.path).errors == ()
    seg = hd.seg.segread(seg_path)
    assert int(seg.NumberOfFrames) == 1
    (frame,) = seg.PerFrameFunctionalGroupsSequence
    (derivation,) = frame.DerivationImageSequence
    (referenced,) = derivation.SourceImageSequence
    assert referenced.ReferencedFrameNumber == volume.frames[0].frame_number == 2
    pixels = seg.get_pixels_by_source_frame(volume.frames[0].sop_instance_uid, [2])
    assert np.array_equal(pixels[0, ..., 0] > 0, mask[0] > 0)
    # patient and study from the vendor's object
    source = dcmread(path, stop_before_pixels=True)
    assert (seg.PatientID, seg.AccessionNumber) == (source.PatientID, source.AccessionNumber)
    images, _ = validators.segimage2itkimage(seg_path, tmp_path / "dcmqi")
    image = sitk.ReadImage(str(images[0]))
    assert image[image.TransformPhysicalPointToIndex(tuple(centre))] == 1
    assert int((sitk.GetArrayFromImage(image) > 0).sum()) == int(mask.sum())
