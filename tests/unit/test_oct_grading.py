"""The oct_grading model on phantom DICOM it never saw (seeds outside training's 1000-3999):
OCT single- and multi-frame, grey; fundus RGB and JPEG colour; its findings, lesion types and
Grad-CAM attention maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.domain import Findings
from dicomnode.imaging import load_planar
from dicomnode.inference import ModelRegistry
from dicomnode.phantoms.retina import fundus_photo, oct_volume

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "oct_grading"


@pytest.fixture(scope="module")
def model() -> Any:
    # as a worker loads it; the shipped weights must be the ones model.toml names
    return ModelRegistry([MODEL_DIR.parent]).load(MODEL_DIR.name)


def check_grade_finding(findings: Findings, expected_grade: int | None) -> None:
    assert isinstance(findings, Findings) and findings.demo is True
    assert findings.model == "oct_grading"
    grade = findings.findings[0]
    assert grade.label == "dr_grade" and grade.finding_type.value == "4855003"
    assert grade.attributes["scale"] == "ICDR"
    probabilities = grade.attributes["probabilities"]
    assert len(probabilities) == 5 and sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    assert grade.attributes["grade"] == findings.summary["grade"]
    if expected_grade is not None:
        assert grade.attributes["grade"] == expected_grade
    assert grade.probability == pytest.approx(max(probabilities), abs=1e-4)
    assert findings.summary["probabilities"] == probabilities
    assert findings.summary["grade_meaning"] == grade.attributes["grade_meaning"]


@pytest.mark.parametrize("one_object", [True, False], ids=["multi-frame", "single-frame-files"])
def test_grey_oct_volume_is_graded_with_an_attention_map(
    model: Any, tmp_path: Path, one_object: bool
) -> None:
    phantom = oct_volume(3, seed=5201, frames=13)
    volume = load_planar(phantom.write(tmp_path, multiframe=one_object, positions=one_object))
    findings = model.predict(volume)
    check_grade_finding(findings, 3)
    attention = findings.masks["attention"]
    assert attention.dtype == np.uint8 and attention.shape == volume.array.shape
    assert attention.max() > 0
    assert findings.summary["kind"] == "oct" and findings.summary["images"] == 13
    # the B-scans that decided the grade lie in the disease zone
    graded = findings.findings[0].attributes["frames"]
    assert graded and all(phantom.truth.frame_grades[k - 1] == 3 for k in graded)
    labels = {f.label for f in findings.findings[1:]}
    assert labels <= {"intraretinal_fluid", "exudates", "retinal_thickening"}
    assert "intraretinal_fluid" in labels


def test_one_b_scan_is_graded(model: Any, tmp_path: Path) -> None:
    phantom = oct_volume(2, seed=5202, frames=1)
    findings = model.predict(load_planar(phantom.write(tmp_path)))
    check_grade_finding(findings, 2)
    assert findings.masks["attention"].shape == (1, 128, 128)


def test_wider_grey_data_is_scaled_by_the_series(model: Any) -> None:
    from dicomnode.imaging import FrameRef, Geometry, Volume

    phantom = oct_volume(3, seed=5205, frames=9)
    frames = tuple(FrameRef(f"1.2.{k}", "", None, "") for k in range(9))
    graded = []
    for factor in (1.0, 16.0):  # 8-bit, and the same cube as 12-bit values
        array = phantom.array.astype(np.float32) * factor
        volume = Volume(array, Geometry(np.eye(4), array.shape), frames, "OPT", "1.2.3")
        graded.append(model.predict(volume).summary)
    assert graded[0]["grade"] == graded[1]["grade"] == 3
    np.testing.assert_allclose(graded[0]["probabilities"], graded[1]["probabilities"], atol=0.1)


@pytest.mark.parametrize("jpeg", [False, True], ids=["RGB", "YBR_FULL_422-JPEG"])
def test_colour_fundus_photographs_are_graded(model: Any, tmp_path: Path, jpeg: bool) -> None:
    predicted = []
    for grade in range(5):
        phantom = fundus_photo(grade, seed=5210 + grade)
        volume = load_planar(phantom.write(tmp_path / str(grade), jpeg=jpeg))
        findings = model.predict(volume)
        check_grade_finding(findings, None)
        predicted.append(findings.summary["grade"])
        # the map has the photograph's spatial shape, without the colour axis
        assert findings.masks["attention"].shape == (1, 384, 384)
        lesions = {f.label: f for f in findings.findings[1:]}
        assert set(lesions) <= {"microaneurysms", "haemorrhages", "hard_exudates",
                                "cotton_wool_spots"}  # fmt: skip
        if grade >= 1:  # every diseased phantom has microaneurysms
            assert lesions["microaneurysms"].attributes["frames"] == [1]
    # the benchmark's agreement on 50 photographs: all within one grade, 84% exact
    errors = np.abs(np.array(predicted) - np.arange(5))
    assert errors.max() <= 1 and (errors == 0).sum() >= 4, predicted


def test_a_healthy_fundus_has_no_lesions_and_a_faint_map(model: Any) -> None:
    from dicomnode.imaging import FrameRef, Geometry, Volume

    phantom = fundus_photo(0, seed=5204)
    volume = Volume(phantom.array.astype(np.float32), Geometry(np.eye(4), (1, 384, 384)),
                    (FrameRef("1.2.3", "", None, ""),), "OP", "1.2.3")  # fmt: skip
    findings = model.predict(volume)
    check_grade_finding(findings, 0)
    assert [f.label for f in findings.findings] == ["dr_grade"]
    # scaled by the probability of any retinopathy: a confident "no DR" is not a hot map
    assert findings.masks["attention"].max() < 128


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "grade"), [("oct", 3), ("fundus", 2), ("fundus", 4)])
def test_grad_cam_highlights_the_lesions_more_than_the_background(
    model: Any, kind: str, grade: int
) -> None:
    """Mean attention inside the lesion boxes over the mean outside them (OCT: on the B-scans
    that hold lesions). Grade 3 photographs, with haemorrhages in all four quadrants, leave the
    coarse map (1/32 of the input) little background to tell apart: see the benchmark."""
    from dicomnode.imaging import FrameRef, Geometry, Volume

    ratios = []
    for seed in (5301, 5302, 5303):
        phantom = oct_volume(grade, seed) if kind == "oct" else fundus_photo(grade, seed)
        frames = tuple(FrameRef(f"1.2.{k}", "", None, "") for k in range(phantom.array.shape[0]))
        volume = Volume(phantom.array.astype(np.float32),
                        Geometry(np.eye(4), phantom.array.shape[:3]), frames,
                        phantom.modality, "1.2.3")  # fmt: skip
        attention = model.predict(volume).masks["attention"].astype(float)
        inside = phantom.truth.mask(phantom.array.shape)
        held = inside.any(axis=(1, 2))  # OCT: the B-scans that hold lesions
        a, m = attention[held], inside[held]
        ratios.append(a[m].mean() / a[~m].mean())
    assert min(ratios) > 1.5, ratios
