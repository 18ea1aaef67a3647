"""Indeterminate, not guessed: calibrated probabilities, the indeterminate band of model.toml,
and the oct_grading rule that absent (grade 0) needs confident evidence; an indeterminate
finding is never written as absent (its words, its job JSON)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.domain import Code, Finding
from dicomnode.errors import ModelError, ModelPackageInvalid
from dicomnode.inference import Model, ModelSpec, findings_to_json, read_model_toml
from dicomnode.inference.calibration import (
    apply_band,
    calibrated_softmax,
    fit_temperature,
    write_calibration,
)
from dicomnode.results.wording import finding_names, finding_text

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "oct_grading"
DR = Code("4855003", "SCT", "Diabetic retinopathy")
TOML = """name = "classifier"
version = "1"
entry = "model:Classifier"

[[labels]]
name = "finding"
finding_type = {{ value = "4855003", meaning = "Diabetic retinopathy" }}

[calibration]
temperature = 2.0
{band}
"""


def spec_with(tmp_path: Path, band: str) -> ModelSpec:
    (tmp_path / "model.toml").write_text(TOML.format(band=band))
    return ModelSpec.from_directory(tmp_path)


def oct_model() -> Any:
    from dicomnode.inference.registry import import_package

    name = import_package(MODEL_DIR, "oct_grading").__name__
    module = importlib.import_module(f"{name}.model")
    return module.OctGradingModel(ModelSpec.from_directory(MODEL_DIR))


def test_probabilities_are_the_softmax_of_the_logits_over_the_temperature() -> None:
    logits = np.array([[2.0, 0.0, -1.0]])
    plain = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(calibrated_softmax(logits), plain)
    np.testing.assert_allclose(calibrated_softmax(logits, 2.0), calibrated_softmax(logits / 2))
    assert calibrated_softmax(logits, 2.0)[0, 0] < plain[0, 0]  # a higher temperature doubts


def test_the_fitted_temperature_is_the_one_of_least_nll() -> None:
    assert fit_temperature(lambda t: (t - 1.7) ** 2, [1.0, 1.5, 1.7, 2.0]) == 1.7


def test_a_finding_in_the_band_is_indeterminate(tmp_path: Path) -> None:
    model = Model(spec_with(tmp_path, "indeterminate = [0.35, 0.65]"))
    assert model.finding("finding", 0.5).indeterminate
    assert model.finding("finding", 0.5).attributes["indeterminate"] is True
    assert not model.finding("finding", 0.9).indeterminate
    assert not model.finding("finding", 0.2).indeterminate
    np.testing.assert_allclose(model.calibrated([[2.0, 0.0]]), calibrated_softmax([[1.0, 0.0]]))
    # no band: nothing is indeterminate
    assert not apply_band(Finding("finding", DR, 0.5), None).indeterminate
    assert apply_band(Finding("finding", DR, 0.5), (0.5, 0.5)).indeterminate


def test_a_band_upside_down_is_refused_with_its_values(tmp_path: Path) -> None:
    (tmp_path / "model.toml").write_text(TOML.format(band="indeterminate = [0.7, 0.3]"))
    with pytest.raises(ModelPackageInvalid, match=r"calibration.indeterminate.*0.7, 0.3"):
        read_model_toml(tmp_path / "model.toml")


def test_train_writes_the_temperature_into_model_toml(tmp_path: Path) -> None:
    shutil.copy(MODEL_DIR / "model.toml", tmp_path / "model.toml")
    write_calibration(tmp_path / "model.toml", temperature=1.2345)
    info = read_model_toml(tmp_path / "model.toml")
    assert info.calibration.temperature == 1.2345
    assert info.calibration == read_model_toml(MODEL_DIR / "model.toml").calibration.model_copy(
        update={"temperature": 1.2345}
    )


def test_oct_absent_needs_confident_evidence() -> None:
    model = oct_model()
    needed = model.info.calibration.absent_confidence
    assert needed is not None and needed > 0.5
    doubtful = model.grade_finding(np.array([needed - 0.05, 0.9 - needed, 0.1, 0.03, 0.02]), [1])
    assert doubtful.indeterminate and doubtful.attributes["indeterminate"] is True
    assert doubtful.attributes["grade"] is None
    assert doubtful.attributes["most_likely_grade"] == 0
    assert doubtful.attributes["grade_meaning"] == "Indeterminate"
    sure = model.grade_finding(np.array([0.97, 0.02, 0.01, 0.0, 0.0]), [1])
    assert not sure.indeterminate and sure.attributes["grade"] == 0
    # a top grade in the band is indeterminate too, whatever the grade
    low = model.info.calibration.indeterminate
    assert low is not None
    split = low[1] - 0.01
    rest = (1 - split) / 4
    spread = model.grade_finding(np.array([rest, rest, split, rest, rest]), [1])
    assert spread.indeterminate and spread.attributes["most_likely_grade"] == 2


def test_an_indeterminate_grade_is_never_written_as_absent() -> None:
    model = oct_model()
    finding = model.grade_finding(np.array([0.6, 0.3, 0.05, 0.03, 0.02]), [1])
    (name,) = finding_names([finding])
    assert name == "Diabetic retinopathy"
    text = finding_text(finding, name)
    assert "indeterminate" in text and "No DR" not in text and "grade 0" not in text
    assert "0: 0.60" in text  # the probabilities, so a reader sees why
    other = Finding("finding", DR, 0.5, attributes={"indeterminate": True})
    assert finding_text(other, "Finding") == "Finding: indeterminate, p=0.50"
    findings = model.findings([finding], summary={"grade": None, "indeterminate": True})
    written = findings_to_json(findings)
    (entry,) = written["findings"]
    assert entry["attributes"]["indeterminate"] is True
    assert entry["attributes"]["grade"] is None
    assert "No apparent retinopathy" not in str(written)


def test_train_writes_a_fitted_threshold_into_its_own_table(tmp_path: Path) -> None:
    brain = MODEL_DIR.parent / "brain_tumor" / "model.toml"
    shutil.copy(brain, tmp_path / "model.toml")
    write_calibration(tmp_path / "model.toml", table="thresholds", enhancing_tumor=0.65)
    info = read_model_toml(tmp_path / "model.toml")
    assert info.thresholds == {**read_model_toml(brain).thresholds, "enhancing_tumor": 0.65}
    with pytest.raises(ModelError, match=r"no \[thresholds\] whole_tumor"):
        write_calibration(tmp_path / "model.toml", table="thresholds", whole_tumor=0.6)
