"""End to end with a real PACS: scanner -> Orthanc -> (its auto-routing, deploy/orthanc/
autoroute.lua) -> dicomnode -> the three models -> SEG, SR and SC -> Orthanc, filed under the
same study, with the findings of the phantoms' truth."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.domain import JobState
from dicomnode.phantoms.demo import DemoStudy, demo_studies
from tests.e2e.roundtrip import pacs_roundtrip, wait_results_filed

pytestmark = pytest.mark.slow
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


def _check_findings(study: DemoStudy, findings: list[dict[str, Any]]) -> None:
    """The model found what the phantom holds."""
    if study.name == "chest":
        centres = np.array([f["centre_mm"] for f in findings])
        for nodule in study.truth.nodules:
            distance = np.linalg.norm(centres - np.array(nodule.center_mm), axis=1).min()
            assert distance <= max(nodule.diameter_mm / 2, 5.0), (nodule, findings)
        assert len(findings) <= len(study.truth.nodules) + 1
    elif study.name == "brain":
        labels = {f["label"] for f in findings}
        assert {"enhancing_tumor", "edema"} <= labels, labels
        centre = np.array(study.truth.tumor_centre_mm)
        enhancing = next(f for f in findings if f["label"] == "enhancing_tumor")
        assert np.linalg.norm(np.array(enhancing["centre_mm"]) - centre) <= 15.0
    else:
        grade = next(f for f in findings if f["label"] == "dr_grade")
        assert grade["attributes"]["grade"] == study.truth.grade, grade


def test_orthanc_forwards_each_study_and_files_the_findings_under_it(tmp_path: Path) -> None:
    studies = demo_studies(tmp_path / "studies")
    with pacs_roundtrip(tmp_path, studies) as roundtrip:
        pacs, node = roundtrip.pacs, roundtrip.node
        for study in studies:
            job = roundtrip.jobs[study.study_instance_uid]
            assert job.model == study.model
            assert job.state is JobState.DONE, job.error
            objects = job.result["objects"]
            kinds = {o["kind"] for o in objects}
            assert kinds >= ({"SR", "SC"} if study.name == "retina" else {"SEG", "SR"}), kinds
            _check_findings(study, job.result["findings"])
            # Orthanc holds every result object, under the source study
            wait_results_filed(roundtrip, study)
            report = next(o for o in objects if o["kind"] == "SR")
            sr = dcmread(BytesIO(pacs.instance_file(report["sop_instance_uid"])))
            assert sr.SOPClassUID == SR and sr.StudyInstanceUID == study.study_instance_uid
            assert sr.PatientID == dcmread(study.files[0], stop_before_pixels=True).PatientID
            for seg in (o for o in objects if o["kind"] == "SEG"):
                stored = dcmread(BytesIO(pacs.instance_file(seg["sop_instance_uid"])))
                assert stored.SOPClassUID == SEG
                assert stored.StudyInstanceUID == study.study_instance_uid
        # the node's own results were not forwarded back to it: one job per study
        assert len(node.jobs.list(limit=100)) == 3
