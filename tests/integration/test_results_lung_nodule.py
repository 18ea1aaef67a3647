"""The lung nodule model end to end through the node: a chest phantom sent with storescu, the
job run by the job pipeline with the real model, and its SEG and SR in the job's result,
valid, and with the segment covering every nodule of the phantom where it is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.domain import JobState
from dicomnode.inference import ModelRegistry
from dicomnode.phantoms.chest import chest_ct
from dicomnode.pipeline import job_models
from dicomnode.queue.worker import JobContext
from dicomnode.testing import peers, validators
from tests.helpers import port_of

pytest.importorskip("torch")
pytest.importorskip("monai")

MODELS = Path(__file__).resolve().parents[2] / "models"

pytestmark = pytest.mark.slow


def test_chest_phantom_through_the_lung_model_gives_a_seg_covering_its_nodules(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    import SimpleITK as sitk  # noqa: N813

    for tool in ("dciodvfy", "segimage2itkimage", "tid1500reader"):
        validators.require_tool(tool)
    node = start_node(background=False)
    # as tests/integration/test_lung_nodule.py: nodules the demo weights find (unseen seed)
    phantom = chest_ct((130, 400, 400), (0.85, 0.85, 1.25), "axial", nodules=4, seed=4101,
                       sizes=(5.0, 25.0), ground_glass_fraction=0.5)  # fmt: skip
    files = phantom.write(tmp_path / "series")
    sent = peers.storescu(port_of(node), files)
    assert sent.returncode == 0, sent.stderr
    first = dcmread(files[0], stop_before_pixels=True)
    node.jobs.enqueue(
        dedupe_key="chest-ct/1", route="chest-ct", model="lung_nodule", level="series",
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        inputs=[str(first.SeriesInstanceUID)], state=JobState.QUEUED,
    )  # fmt: skip
    job = node.jobs.claim("test-worker", ["lung_nodule"])
    assert job is not None
    pipelines = job_models(
        ModelRegistry([MODELS]), ["lung_nodule"], sessions=node.database.sessions
    )
    model = pipelines["lung_nodule"]
    model.load("cpu")
    result = dict(model.run(JobContext(job, "cpu", "test-worker", storage_dir=node.spool.root)))

    objects = {o["kind"]: node.spool.root / o["path"] for o in result["objects"]}
    assert set(objects) == {"SEG", "SR", "SC", "KO"}  # SC: the key images
    assert all(o["study_instance_uid"] == first.StudyInstanceUID for o in result["objects"])
    assert result["timing_s"]["results"] > 0
    for path in objects.values():
        report = validators.dciodvfy(path)
        assert report.errors == (), report.output
    images, meta = validators.segimage2itkimage(objects["SEG"], tmp_path / "dcmqi")
    (image_path,) = images
    image = sitk.ReadImage(str(image_path))
    for truth in phantom.truth.nodules:
        index = image.TransformPhysicalPointToIndex(truth.center_mm)
        assert image[index] == 1, f"the {truth.diameter_mm} mm nodule is not in the SEG"
    assert meta["segmentAttributes"][0][0]["SegmentLabel"] == "nodule"
    report = validators.tid1500reader(objects["SR"], tmp_path / "sr.json")
    segmented = [m for m in report["Measurements"] if "ReferencedSegment" in m]
    assert len(segmented) == sum(1 for f in result["findings"] if f["mask"] is not None)
    assert len(segmented) >= len(phantom.truth.nodules)
