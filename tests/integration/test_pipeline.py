"""The job pipeline on series stored through the receiver: index -> files -> volume ->
predict -> JSON findings and mask files; study-level input names; refusals; and a routed series
run by the node's own worker end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.config import RouteSettings
from dicomnode.domain import JobState
from dicomnode.errors import InputsRejected
from dicomnode.inference import ModelRegistry, findings_from_json
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.pipeline import ModelPipeline, job_models
from dicomnode.queue.worker import JobContext
from dicomnode.testing import peers
from dicomnode.testing.bundles import write_model_package
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

pytest.importorskip("torch")


def store(node: Node, folder: Path, spec: SeriesSpec, description: str | None = None) -> list[Path]:
    datasets = list(ct_slices(spec))
    if description is not None:
        for ds in datasets:
            ds.SeriesDescription = description
    files = write_series(datasets, folder)
    result = peers.storescu(port_of(node), files)
    assert result.returncode == 0, result.stderr
    return files


def hu_of(files: list[Path]) -> np.ndarray:
    slices = [dcmread(f) for f in files]
    return np.stack(
        [s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices]
    )


def claim(node: Node, model: str, inputs: list[str], route: str = "r", level: str = "series"):  # type: ignore[no-untyped-def]
    node.jobs.enqueue(
        dedupe_key=f"{route}/{'/'.join(inputs)}",
        route=route,
        model=model,
        level=level,
        study_instance_uid="1.2.3",
        series_instance_uid=inputs[0],
        inputs=inputs,
        state=JobState.QUEUED,
    )
    job = node.jobs.claim("test-worker", [model])
    assert job is not None
    return JobContext(job, "cpu", "test-worker", storage_dir=node.spool.root)


def pipeline_for(node: Node, models: Path, name: str, **kw: Any) -> ModelPipeline:
    pipelines = job_models(ModelRegistry([models]), [name], sessions=node.database.sessions, **kw)
    model = pipelines[name]
    assert isinstance(model, ModelPipeline)
    model.load("cpu")
    return model


def without_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "timing_s"}


def test_pipeline_runs_a_model_on_a_stored_series(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False)
    spec = SeriesSpec(slices=12, rows=32, columns=32, seed=61)
    files = store(node, tmp_path / "ct", spec)
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    write_model_package(tmp_path / "models", "stats")
    pipeline = pipeline_for(node, tmp_path / "models", "stats")

    result = dict(pipeline.run(claim(node, "stats", [series_uid])))
    json.dumps(result)  # what the queue stores
    hu = hu_of(files)
    assert result["model"] == "stats" and result["version"] == "1.0.0" and result["demo"]
    assert result["summary"]["shape"] == [12, 32, 32]
    assert result["summary"]["mean_hu"] == pytest.approx(hu.mean(), abs=1e-3)
    (entry,) = result["inputs"]
    assert entry["series_instance_uid"] == series_uid and entry["modality"] == "CT"
    assert entry["shape"] == [12, 32, 32]
    assert entry["spacing_mm"] == pytest.approx([0.7, 0.7, 1.25])
    assert set(result["timing_s"]) == {"load_inputs", "predict", "results", "total"}
    # the body mask as a SEG and the finding in a TID 1500 SR, beside the masks; its key image
    # and the KOS flagging it
    assert [o["kind"] for o in result["objects"]] == ["SEG", "SR", "SC", "KO"]
    assert all((node.spool.root / o["path"]).is_file() for o in result["objects"])

    (finding,) = result["findings"]
    assert finding["label"] == "body" and finding["mask"] == {"name": "body", "value": 1}
    assert finding["finding_type"]["value"] == "123037004"
    assert finding["volume_mm3"] == pytest.approx((hu > -500).sum() * 0.7 * 0.7 * 1.25)
    mask_entry = result["masks"]["body"]
    assert mask_entry["path"].startswith("results/") and mask_entry["labels"] == [1]

    findings = findings_from_json(result, node.spool.root)
    assert np.array_equal(findings.masks["body"], (hu > -500).astype(np.uint8))
    assert findings.findings[0].centre_mm == pytest.approx(finding["centre_mm"])

    again = dict(pipeline.run(claim(node, "stats", [series_uid], route="again")))
    assert without_timing(again)["findings"] == without_timing(result)["findings"]
    assert again["summary"] == result["summary"]


def test_study_level_inputs_are_named_by_patterns(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False)
    small = SeriesSpec(slices=4, rows=16, columns=16)
    t1 = store(node, tmp_path / "t1", replace(small, seed=62), "T1 ax")
    flair = store(node, tmp_path / "fl", replace(small, seed=63), "FLAIR")
    uids = [str(dcmread(files[0]).SeriesInstanceUID) for files in (flair, t1)]
    write_model_package(
        tmp_path / "models", "brain", level="study", inputs={"T1": "(?i)t1", "FLAIR": "(?i)flair"}
    )
    pipeline = pipeline_for(node, tmp_path / "models", "brain")
    result = pipeline.run(claim(node, "brain", uids, level="study"))
    assert result["summary"]["inputs"] == ["FLAIR", "T1"]
    named = {entry["name"]: entry["series_instance_uid"] for entry in result["inputs"]}
    assert named == {"FLAIR": uids[0], "T1": uids[1]}

    # a route's completion.required_series overrides the model's own patterns
    route = RouteSettings(
        name="brain_route",
        model="brain",
        level="study",
        completion={"required_series": {"first": "(?i)t1", "second": "(?i)flair"}},
    )
    pipeline = pipeline_for(node, tmp_path / "models", "brain", routes=[route])
    context = claim(node, "brain", uids, route="brain_route", level="study")
    assert pipeline.run(context)["summary"]["inputs"] == ["first", "second"]


def test_inputs_the_model_does_not_accept_are_refused(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False)
    files = store(node, tmp_path / "ct", SeriesSpec(slices=3, rows=16, columns=16, seed=64))
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    write_model_package(tmp_path / "models", "mr_only", modalities=("MR",))
    pipeline = pipeline_for(node, tmp_path / "models", "mr_only")
    with pytest.raises(InputsRejected, match=r"accepts modality MR; series .* is CT"):
        pipeline.run(claim(node, "mr_only", [uid]))
    with pytest.raises(InputsRejected, match=r"input series 9\.9\.9 not in the index"):
        pipeline.run(claim(node, "mr_only", ["9.9.9"]))


def test_inputs_outside_the_envelope_are_refused_or_run_and_flagged(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """A thin-slice model meets 1.25 mm slices of 32 x 32: refused at once by default; run,
    with the job and every object marked, where the route says flag."""
    from dicomnode.pipeline.envelope import OutsideEnvelope
    from dicomnode.testing import validators
    from tests.integration.test_results_objects import texts

    node = start_node(background=False)
    files = store(node, tmp_path / "ct", SeriesSpec(slices=12, rows=32, columns=32, seed=65))
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    thin = """
        slice_thickness_mm = [0.5, 1.0]
        rows = [64, 1024]
        modalities = ["CT"]
    """
    write_model_package(tmp_path / "models", "thin", envelope=thin)
    route = RouteSettings(name="flagged", model="thin", envelope="flag")
    pipeline = pipeline_for(node, tmp_path / "models", "thin", routes=[route])
    reasons = "slice thickness 1.25 mm is outside 0.5-1 mm; rows 32 is outside 64-1024"
    with pytest.raises(
        OutsideEnvelope, match=f"thin was not validated for this input: {reasons}"
    ) as refused:
        pipeline.run(claim(node, "thin", [uid]))
    assert OutsideEnvelope.permanent  # the worker does not retry it
    # the refusal's result: why, and the one SR that tells the PACS the study was not analysed
    refusal = refused.value.result
    assert refusal["envelope"] == {
        "inside": False,
        "reasons": reasons.split("; "),
        "policy": "refuse",
    }
    (report,) = refusal["objects"]  # type: ignore[attr-defined]
    sr = dcmread(node.spool.root / report["path"])
    assert report["kind"] == "SR" and sr.SeriesDescription == "NOT ANALYSED: thin findings (demo)"
    assert f"Not analysed: thin was not validated for this input: {reasons}." in texts(sr)
    assert not any(t.startswith("No findings") for t in texts(sr))  # no claim on the patient
    assert sr.StudyInstanceUID == dcmread(files[0]).StudyInstanceUID
    if validators.has_tool("dciodvfy"):
        assert validators.dciodvfy(node.spool.root / report["path"]).errors == ()

    result = dict(pipeline.run(claim(node, "thin", [uid], route="flagged")))
    assert result["envelope"] == {
        "inside": False,
        "reasons": reasons.split("; "),
        "policy": "flag",
    }
    objects = {o["kind"]: node.spool.root / o["path"] for o in result["objects"]}
    for kind in ("SEG", "SR"):
        assert str(dcmread(objects[kind]).SeriesDescription).startswith("UNVALIDATED INPUT: ")
    said = texts(dcmread(objects["SR"]))
    assert (
        f"Outside the model's validated acquisition envelope: thin was not validated for this "
        f"input: {reasons}"
    ) in said
    if validators.has_tool("dciodvfy"):
        assert validators.dciodvfy(objects["SR"]).errors == ()

    write_model_package(tmp_path / "wide", "thin", envelope="slice_thickness_mm = [0.5, 5.0]")
    inside = pipeline_for(node, tmp_path / "wide", "thin").run(claim(node, "thin", [uid], "in"))
    assert inside["envelope"] == {"inside": True, "reasons": [], "policy": "refuse"}


@pytest.mark.slow
def test_a_routed_series_runs_through_the_nodes_worker(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    write_model_package(tmp_path / "models", "stats")
    node = start_node(
        models={"dirs": [tmp_path / "models"]},
        workers=[{"models": ["stats"]}],
        routes=[
            {
                "name": "chest",
                "model": "stats",
                "match": {"Modality": "CT"},
                "completion": {"quiet_s": 0.5, "release_grace_s": 0.2, "confirm_s": 0},
            }
        ],
    )
    files = store(node, tmp_path / "ct", SeriesSpec(slices=8, rows=32, columns=32, seed=65))
    wait_until(
        lambda: (jobs := node.jobs.list(limit=10)) and jobs[0].final,
        timeout=60,
        interval=0.2,
        what="the job's end",
    )
    (job,) = node.jobs.list(limit=10)
    assert job.state is JobState.DONE, job.error
    assert job.result is not None
    assert job.result["summary"]["mean_hu"] == pytest.approx(hu_of(files).mean(), abs=1e-3)
    assert (node.spool.root / job.result["masks"]["body"]["path"]).is_file()
