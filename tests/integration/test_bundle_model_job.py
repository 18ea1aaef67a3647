"""A MONAI bundle named for no model package runs as a model of its own through the node's job
path: a stored CT series in, MONAI's own labels on the source grid out, as a SEG (one segment
per label, the background left out) and an SR with each segment's volume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.errors import InputsRejected
from dicomnode.inference import ModelRegistry, findings_from_json
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.pipeline import ModelPipeline, job_models
from dicomnode.testing import peers, validators
from tests.helpers import port_of
from tests.integration.test_pipeline import claim, store

pytest.importorskip("torch")
pytest.importorskip("highdicom")

from tests.unit.test_bundle_model import dice, monai_labels, write_zoo_bundle


@pytest.mark.slow
@pytest.mark.parametrize(
    ("label", "code"), [("spleen", ("78961009", "SCT")), ("widget", ("widget", "99DICOMNODE"))]
)
def test_a_bundle_of_its_own_runs_through_the_job_path_to_a_seg(
    start_node: Callable[..., Node], tmp_path: Path, label: str, code: tuple[str, str]
) -> None:
    node = start_node(background=False)
    files = store(
        node, tmp_path / "ct", SeriesSpec(slices=20, rows=40, columns=44, pixel_mm=0.75, seed=8)
    )
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    root = write_zoo_bundle(tmp_path / "spleen_bundle", channels={"0": "background", "1": label})
    pipelines = job_models(
        ModelRegistry([], {"spleen": root}), ["spleen"], sessions=node.database.sessions
    )
    pipeline = pipelines["spleen"]
    assert isinstance(pipeline, ModelPipeline)
    pipeline.load("cpu")

    result = dict(pipeline.run(claim(node, "spleen", [series_uid])))
    assert result["model"] == "spleen" and not result["demo"]
    assert result["version"] == "bundle.tiny_spleen_ct_segmentation.0.5.3"
    assert len(result["summary"]["weights_sha256"]) == 64
    findings = findings_from_json(result, node.spool.root)
    labels = findings.masks["labels"]
    theirs = monai_labels(root, tmp_path / "ct")  # MONAI on the same files
    assert labels.shape == theirs.shape == (20, 40, 44)
    assert 0.02 < float((theirs == 1).mean()) < 0.98
    assert dice(labels, theirs, 1) >= 0.99

    kinds = {o["kind"]: node.spool.root / o["path"] for o in result["objects"]}
    assert set(kinds) == {"SEG", "SR", "SC", "KO"}  # SC: the key image, KO: its KOS
    seg = dcmread(kinds["SEG"])
    (segment,) = seg.SegmentSequence  # the background is no segment
    assert segment.SegmentLabel == label
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (
        prop.CodeValue,
        prop.CodingSchemeDesignator,
    ) == code  # SNOMED CT by name, else the node's scheme
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodeMeaning) == ("91723000", "Anatomical Structure")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "spleen"
    assert algorithm.AlgorithmVersion == "bundle.tiny_spleen_ct_segmentation.0.5.3"
    frames = seg.pixel_array.reshape(-1, 40, 44)
    assert int(frames.sum()) == int((labels == 1).sum())  # every labelled voxel, once

    sr = dcmread(kinds["SR"])
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _walk(sr)
        if getattr(item, "ValueType", "") == "NUM"
        and item.ConceptNameCodeSequence[0].CodeValue == "118565006"  # Volume
    ]
    assert volumes == [pytest.approx(float((labels == 1).sum()) * 0.75 * 0.75 * 1.25, rel=1e-3)]
    if validators.has_tool("dciodvfy"):
        for path in kinds.values():
            report = validators.dciodvfy(path)
            assert report.errors == (), report.output
    assert np.array_equal(findings.masks["labels"], labels)


@pytest.mark.slow
def test_a_classification_bundle_runs_through_the_job_path_to_an_sr(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    from dicomnode.config import BundleSettings
    from tests.unit.test_bundle_model_settings import monai_probabilities

    node = start_node(background=False)
    datasets = list(ct_slices(SeriesSpec(slices=20, rows=40, columns=44, pixel_mm=0.75, seed=8)))
    for ds in datasets:
        ds.BodyPartExamined = "ABDOMEN"
    files = write_series(datasets, tmp_path / "ct")
    assert peers.storescu(port_of(node), files).returncode == 0
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    classes = {"0": "normal", "1": "nodule", "2": "widget"}
    root = write_zoo_bundle(tmp_path / "cls", classes=classes, name="tiny_classifier", seed=5)
    site = {
        "labels": {"widget": {"value": "W-1", "scheme": "99SITE", "meaning": "Widget"}},
        "accepts": {"modalities": ["CT"], "body_parts": ["abdomen"]},
    }
    head_only = {**site, "accepts": {"body_parts": ["HEAD"]}}
    registry = ModelRegistry(
        [],
        {"grader": root, "head": root},
        bundle_settings={
            "grader": BundleSettings.model_validate(site),
            "head": BundleSettings.model_validate(head_only),
        },
    )
    pipelines = job_models(registry, ["grader", "head"], sessions=node.database.sessions)
    pipelines["head"].load("cpu")
    with pytest.raises(InputsRejected, match=r"accepts body part HEAD; series .* is ABDOMEN"):
        pipelines["head"].run(claim(node, "head", [series_uid], route="h"))
    pipeline = pipelines["grader"]
    assert isinstance(pipeline, ModelPipeline)
    pipeline.load("cpu")

    result = dict(pipeline.run(claim(node, "grader", [series_uid])))
    theirs = monai_probabilities(root, tmp_path / "ct")  # MONAI on the same files
    top = int(np.argmax(theirs))
    assert result["summary"]["class"] == classes[str(top)]
    kinds = {o["kind"]: node.spool.root / o["path"] for o in result["objects"]}
    assert set(kinds) == {"SR", "SC", "KO"}  # no image out: no SEG; a key image and its KOS
    sr = dcmread(kinds["SR"])
    items = list(_walk(sr))
    finding_types = [
        item.ConceptCodeSequence[0]
        for item in items
        if item.ConceptNameCodeSequence[0].CodeValue == "121071"  # Finding
    ]
    spec = registry.spec("grader")
    code = spec.info.labels[top].finding_type
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in finding_types] == [
        (code.value, code.scheme)
    ]
    probabilities = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in items
        if getattr(item, "ValueType", "") == "NUM"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
    ]
    assert probabilities == [pytest.approx(float(theirs[top]), abs=2e-4)]
    if validators.has_tool("dciodvfy"):
        report = validators.dciodvfy(kinds["SR"])
        assert report.errors == (), report.output


def _walk(ds):  # type: ignore[no-untyped-def]
    for item in getattr(ds, "ContentSequence", ()):
        yield item
        yield from _walk(item)
