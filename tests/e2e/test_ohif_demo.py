"""The demo end to end as a radiologist sees it: the three demo studies (chest CT, brain MRI,
retina OCT) go scanner -> Orthanc -> (its auto-routing) -> the node with the three models ->
SEG, SR, key images and KOS -> Orthanc, as in test_pacs_roundtrip; then OHIF v3 (in Chromium,
reading that Orthanc over DICOMweb) opens each study's SR and SEG.

Screenshots and the browser's console log are kept under each test's tmp_path (their folder is
printed when a test fails).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from dicomnode.domain import JobState
from dicomnode.phantoms.demo import DemoStudy, demo_studies
from dicomnode.testing.browser import kept
from dicomnode.testing.ohif import OhifServer, Viewer, require_ohif
from dicomnode.testing.waiting import wait_until
from tests.e2e.roundtrip import Roundtrip, pacs_roundtrip, wait_results_filed

pytestmark = pytest.mark.slow

COMMENT = "121106"  # DCM Comment: the finding in words, what OHIF lists a measurement under


@dataclass(frozen=True)
class Finding:
    """One finding of the SR as OHIF should show it."""

    text: str  # its Comment (wording.finding_text)
    sop_instance_uid: str  # the image its region is on
    frame: int | None  # the frame of a multi-frame image


@dataclass(frozen=True)
class Demo:
    roundtrip: Roundtrip
    server: OhifServer
    viewer: Viewer
    studies: dict[str, DemoStudy]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The three studies and their results in Orthanc (DICOMweb on); OHIF in front of it."""
    dist = require_ohif()
    root = tmp_path_factory.mktemp("ohif-demo")
    studies = demo_studies(root / "studies")
    with (
        pacs_roundtrip(root, studies, dicomweb=True) as roundtrip,
        OhifServer(dist, roundtrip.pacs.dicomweb_url) as server,
        Viewer() as viewer,
    ):
        for study in studies:
            job = roundtrip.jobs[study.study_instance_uid]
            assert job.state is JobState.DONE, job.error
            wait_results_filed(roundtrip, study)
        yield Demo(roundtrip, server, viewer, {study.name: study for study in studies})
        viewer.console.write(root / "console.json")


@pytest.fixture
def keep(demo: Demo, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    failed_before = request.session.testsfailed
    with kept(demo.viewer, tmp_path, lambda: request.session.testsfailed > failed_before) as folder:
        yield folder


# -- what the study and its SR hold -------------------------------------------------------------


def headers(study: DemoStudy) -> dict[str, Dataset]:
    """The study's images' headers by SOP Instance UID."""
    found = {}
    for path in study.files:
        ds = dcmread(path, stop_before_pixels=True)
        found[str(ds.SOPInstanceUID)] = ds
    return found


def depth_mm(ds: Dataset) -> float:
    """Where a slice lies along its normal (mm)."""
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float)))


def along_normal(ds: Dataset, point_mm: Any) -> float:
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.array(point_mm)))


def report(demo: Demo, study: DemoStudy) -> Dataset:
    """The study's SR, as Orthanc holds it."""
    objects = demo.roundtrip.jobs[study.study_instance_uid].result["objects"]
    sop = next(o["sop_instance_uid"] for o in objects if o["kind"] == "SR")
    return dcmread(BytesIO(demo.roundtrip.pacs.instance_file(sop)))


def _items(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []):
        yield child
        yield from _items(child)


def sr_findings(sr: Dataset) -> list[Finding]:
    """Each finding of the SR: its numbers' group, with its Comment and its region."""
    groups = [item for item in _items(sr) if item.ValueType == "CONTAINER"]
    found = []
    for group in groups:
        children = list(group.get("ContentSequence", []))
        comment = next(
            (c.TextValue for c in children
             if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == COMMENT),
            None,
        )  # fmt: skip
        if comment is None or not any(c.ValueType == "NUM" for c in children):
            continue  # not a finding's numbers (a comment on the whole report)
        scoord = next(item for item in _items(group) if item.ValueType == "SCOORD")
        image = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        frame = image.get("ReferencedFrameNumber")
        found.append(
            Finding(comment, str(image.ReferencedSOPInstanceUID),
                    None if frame is None else int(frame))
        )  # fmt: skip
    assert found, "no finding with a Comment in the SR"
    return found


def segment_groups(sr: Dataset) -> int:
    """How many groups of the SR are a finding's SEG segment (TID 1411)."""
    return sum(
        any("ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]
            for i in item.get("ContentSequence", []) if i.ValueType == "IMAGE")
        for item in _items(sr) if item.ValueType == "CONTAINER"
    )  # fmt: skip


# -- what OHIF shows ----------------------------------------------------------------------------


def open_report(demo: Demo, study: DemoStudy, *, track: bool) -> list[str]:
    demo.viewer.console.clear()
    url = demo.server.viewer_url(study.study_instance_uid)
    return demo.viewer.open_report(url, track=track)


def shown(demo: Demo, study: DemoStudy) -> Dataset:
    """The header of the image the viewport shows, told by its InstanceNumber and the series
    the viewport's overlay names."""
    number = demo.viewer.shown_instance()
    overlay = demo.viewer.overlay_text()
    candidates = [ds for ds in headers(study).values() if int(ds.InstanceNumber) == number]
    if len(candidates) > 1:  # several series: the one the overlay names
        candidates = [ds for ds in candidates if str(ds.get("SeriesDescription", "")) in overlay]
    assert len(candidates) == 1, (number, overlay, len(candidates))
    return candidates[0]


def check_console(viewer: Viewer, segments: int, keep: Path, name: str) -> None:
    """No page error, nothing "not rehydratable"; OHIF may fail to rebuild a finding's SEG
    segment group (TID 1411, no 2-D coordinates) as a tool, once per such group, and nothing
    else."""
    said = viewer.console.matching("SR", "measurement", "error", "unable")
    (keep / f"{name}-console.json").write_text(json.dumps(said, indent=1))
    assert not viewer.console.matching("pageerror"), viewer.console.matching("pageerror")
    assert not viewer.console.matching("not rehydratable")
    unable = viewer.console.matching("Unable to generate tool state")
    assert len(unable) <= segments, unable
    assert all("No spatial coordinates group found" in entry["text"] for entry in unable), unable


def check_tracked(demo: Demo, study: DemoStudy, findings: list[Finding], keep: Path) -> str:
    """Tracked, OHIF lists each finding under its Comment; the panel's text."""
    viewer = demo.viewer
    asked = open_report(demo, study, track=True)
    assert any("tracking measurements" in question for question in asked), asked
    panel = wait_until(
        lambda: (
            all(f.text in (text := viewer.show_tab("trackedMeasurements")) for f in findings)
            and text
        ),
        what=f"the {study.name} findings in OHIF's measurements panel",
        ignore=(Exception,),
    )
    viewer.screenshot(keep / "measurements.png")
    assert f"Measurements ({len(findings)})" in panel, panel
    return panel


def check_seg(demo: Demo, study: DemoStudy, keep: Path) -> None:
    """The SEG draws coloured pixels over its images."""
    viewer = demo.viewer
    viewer.console.clear()
    # OHIF previews the SEG and asks whether to open it: yes
    url = demo.server.viewer_url(study.study_instance_uid)
    asked = viewer.open_report(url, track=True, modality="SEG")
    assert any("Segmentation" in question for question in asked), asked
    viewer.wait_coloured(min_share=1e-4)
    viewer.screenshot(keep / "seg.png")
    assert not viewer.console.matching("pageerror"), viewer.console.matching("pageerror")


def numbers(text: str) -> str:
    return rf"{text}: \d+(\.\d+)?"


# -- the tests ----------------------------------------------------------------------------------


def test_chest_ct_nodules(demo: Demo, keep: Path) -> None:
    viewer, study = demo.viewer, demo.studies["chest"]
    images = headers(study)
    sr = report(demo, study)
    findings, segments = sr_findings(sr), segment_groups(sr)
    truths = study.truth.nodules

    def on_a_nodule(ds: Dataset) -> bool:
        z = depth_mm(ds)
        return any(abs(z - along_normal(ds, n.center_mm)) <= n.diameter_mm / 2 for n in truths)

    # untracked: the SR opens on the first finding's key slice, a slice through a nodule
    asked = open_report(demo, study, track=False)
    assert any("tracking measurements" in question for question in asked), asked
    wait_until(lambda: on_a_nodule(shown(demo, study)), what="a slice through a nodule",
               ignore=(Exception,))  # fmt: skip
    text = " | ".join(viewer.wait_annotations())
    viewer.screenshot(keep / "sr.png")
    assert re.search(r"Diameter: \d+\.\d+ mm", text), text
    assert shown(demo, study).SOPInstanceUID == findings[0].sop_instance_uid
    check_console(viewer, segments, keep, "sr")

    # tracked: each nodule listed with its numbers; a row shows its key slice
    panel = check_tracked(demo, study, findings, keep)
    for finding in findings:
        assert re.fullmatch(r"Nodule \d+: \d+\.\d mm, \d+ mm3, p=\d\.\d\d", finding.text), finding
    for finding in reversed(findings):
        viewer.page.get_by_text(finding.text).first.click()
        wait_until(lambda f=finding: shown(demo, study).SOPInstanceUID == f.sop_instance_uid,
                   what=f"{finding.text}'s key slice", ignore=(Exception,))  # fmt: skip
        assert on_a_nodule(images[finding.sop_instance_uid]), finding
        viewer.screenshot(keep / f"{finding.text.split(':')[0]}.png")
    assert panel
    check_console(viewer, segments, keep, "tracked")

    check_seg(demo, study, keep)


def test_brain_mri_tumour_on_flair(demo: Demo, keep: Path) -> None:
    viewer, study = demo.viewer, demo.studies["brain"]
    images = headers(study)
    sr = report(demo, study)
    findings, segments = sr_findings(sr), segment_groups(sr)
    flair = study.truth.series["FLAIR"]
    # the brain model's reference series is the FLAIR: the SR's regions are on it
    for finding in findings:
        assert images[finding.sop_instance_uid].SeriesInstanceUID == flair, finding
    centre = study.truth.tumor_centre_mm

    def through_tumour(ds: Dataset) -> bool:
        return abs(depth_mm(ds) - along_normal(ds, centre)) <= 15.0

    asked = open_report(demo, study, track=False)
    assert any("tracking measurements" in question for question in asked), asked
    wait_until(lambda: shown(demo, study).SOPInstanceUID == findings[0].sop_instance_uid,
               what="the first finding's key slice", ignore=(Exception,))  # fmt: skip
    image = shown(demo, study)
    assert image.SeriesInstanceUID == flair
    assert study.truth.descriptions["FLAIR"] in viewer.overlay_text(), viewer.overlay_text()
    assert through_tumour(image), (depth_mm(image), centre)
    text = " | ".join(viewer.wait_annotations())
    viewer.screenshot(keep / "sr.png")
    assert re.search(numbers("Volume"), text), text
    check_console(viewer, segments, keep, "sr")

    panel = check_tracked(demo, study, findings, keep)
    texts = {f.text.split(":")[0]: f.text for f in findings}
    assert {"Enhancing tumor", "Edema"} <= set(texts), texts
    for name in ("Enhancing tumor", "Edema"):
        assert re.fullmatch(
            rf"{name}: (\d+\.\d mm, )?\d+(\.\d)? (mm3|mL), p=\d\.\d\d", texts[name]
        ), texts
        assert texts[name] in panel
    check_console(viewer, segments, keep, "tracked")

    check_seg(demo, study, keep)


def test_retina_oct_grade(demo: Demo, keep: Path) -> None:
    viewer, study = demo.viewer, demo.studies["retina"]
    sr = report(demo, study)
    findings, segments = sr_findings(sr), segment_groups(sr)
    grade = next(f for f in findings if f.text.startswith("Diabetic retinopathy"))
    wanted = f"Diabetic retinopathy grade {study.truth.grade} (Severe NPDR), p="
    assert grade.text.startswith(wanted), grade
    assert grade.frame is not None, "the grade's region names no frame of the OCT volume"

    asked = open_report(demo, study, track=False)
    assert any("tracking measurements" in question for question in asked), asked
    # the most attended B-scan of the volume, not a black viewport
    assert viewer.wait_rendered() > 0.05
    found = wait_until(lambda: SHOWN_FRAME.search(viewer.overlay_text()),
                       what="a frame number in the overlay", ignore=(Exception,))  # fmt: skip
    assert int(found.group(2)) == grade.frame, (viewer.overlay_text(), grade)
    # OHIF draws the SR's numbers only once the viewport renders again: one scroll there and back
    viewer.scroll(1)
    viewer.scroll(-1)
    text = " | ".join(viewer.wait_annotations())
    viewer.screenshot(keep / "sr.png")
    # KNOWN OHIF LIMITATION: the box is drawn displaced (below the B-scan): cornerstone3D's
    # imageToWorldCoords swaps row and column pixel spacing for non-square pixels
    # (cornerstonejs/cornerstone3D#2758; the OCT's PixelSpacing is 0.0156\0.0469), so its
    # position is not asserted
    assert f"Severity: {study.truth.grade:.2f}" in text, text
    assert "Probability: " in text, text
    check_console(viewer, segments, keep, "sr")

    panel = check_tracked(demo, study, findings, keep)
    assert grade.text in panel
    check_console(viewer, segments, keep, "tracked")


SHOWN_FRAME = re.compile(r"I:\s*(\d+)\s*\((\d+)/(\d+)\)")
