"""Results in the job pipeline: a job's SEG and SR land in results/<job id>/dicom/ and in
its result's "objects"; a rerun writes the same objects; [results] switches them off; a failure
to build them fails the job with the reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.config import ResultsSettings
from dicomnode.errors import ResultsError
from dicomnode.phantoms.simple import SeriesSpec
from dicomnode.testing import validators
from dicomnode.testing.bundles import VOLUME_STATS_MODEL, write_model_package
from tests.integration.test_pipeline import claim, pipeline_for, store

pytest.importorskip("torch")
pytest.importorskip("highdicom")


def test_a_job_run_twice_writes_the_same_objects(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False)
    files = store(node, tmp_path / "ct", SeriesSpec(slices=12, rows=32, columns=32, seed=62))
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    write_model_package(tmp_path / "models", "stats")
    pipeline = pipeline_for(node, tmp_path / "models", "stats")
    context = claim(node, "stats", [series_uid])

    first = dict(pipeline.run(context))
    objects = first["objects"]
    assert [o["kind"] for o in objects] == ["SEG", "SR", "SC", "KO"]  # SC: the key image
    assert {o["study_instance_uid"] for o in objects} == {str(dcmread(files[0]).StudyInstanceUID)}
    contents = {o["path"]: (node.spool.root / o["path"]).read_bytes() for o in objects}
    for o in objects:
        assert o["path"].startswith(f"results/{context.job.id}/dicom/")
        if validators.has_tool("dciodvfy"):
            report = validators.dciodvfy(node.spool.root / o["path"])
            assert report.errors == (), report.output

    again = dict(pipeline.run(context))  # a retry of the same job
    assert again["objects"] == objects
    assert {o["path"]: (node.spool.root / o["path"]).read_bytes() for o in objects} == contents
    # dated when the series' last instance arrived, not when the job ran
    sr = dcmread(node.spool.root / objects[1]["path"])
    assert sr.ContentDate == sr.SeriesDate and len(sr.ContentTime) == 6


def test_results_can_be_switched_off(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node(background=False)
    files = store(node, tmp_path / "ct", SeriesSpec(slices=8, rows=16, columns=16, seed=63))
    write_model_package(tmp_path / "models", "stats")
    pipeline = pipeline_for(
        node, tmp_path / "models", "stats", results=ResultsSettings(enabled=False)
    )
    result = dict(pipeline.run(claim(node, "stats", [str(dcmread(files[0]).SeriesInstanceUID)])))
    assert "objects" not in result
    assert not (node.spool.root / "results" / "1" / "dicom").exists()


def test_a_results_failure_fails_the_job_with_the_reason(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False)
    files = store(node, tmp_path / "ct", SeriesSpec(slices=8, rows=16, columns=16, seed=64))
    broken = VOLUME_STATS_MODEL.replace("return MaskRef(name,", 'return MaskRef("nowhere",')
    assert broken != VOLUME_STATS_MODEL
    write_model_package(tmp_path / "models", "stats", source=broken)
    pipeline = pipeline_for(node, tmp_path / "models", "stats")
    context = claim(node, "stats", [str(dcmread(files[0]).SeriesInstanceUID)])
    with pytest.raises(ResultsError, match=r"refers to mask 'nowhere'; the model returned masks"):
        pipeline.run(context)
