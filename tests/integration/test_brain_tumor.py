"""The brain tumor model end to end: four MR series of a phantom study in, the tumor's
sub-regions on the FLAIR grid out, through the model and through a node (storescu, intake,
worker); a study without FLAIR follows its route's on_missing; and the Model Zoo's
brats_mri_segmentation network from a bundle directory through the same pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.app import Node
from dicomnode.domain import Findings, JobState
from dicomnode.imaging import load_series
from dicomnode.inference import ModelRegistry, read_model_toml
from dicomnode.inference.findings import read_mask
from dicomnode.phantoms.brain import STUDY, BrainPhantom, BrainStudy, brain_phantom
from dicomnode.testing import peers
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "brain_tumor"
PATTERNS = dict(read_model_toml(MODEL_DIR / "model.toml").accepts.inputs)

pytestmark = pytest.mark.slow


def _model(bundle: Path | None = None) -> Any:
    """The model as a worker loads it."""
    bundles = {MODEL_DIR.name: bundle} if bundle else {}
    return ModelRegistry([MODEL_DIR.parent], bundles).load(MODEL_DIR.name)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of whole tumor (1, 2, 3), tumor core (1, 3) and enhancing tumor (3)."""
    return {
        "WT": dice(labels > 0, truth > 0),
        "TC": dice(np.isin(labels, (1, 3)), np.isin(truth, (1, 3))),
        "ET": dice(labels == 3, truth == 3),
    }


# seeds outside training's 2000-2999
def test_demo_model_segments_the_tumor_of_an_unseen_phantom(tmp_path: Path) -> None:
    phantom = brain_phantom(4201)
    study = phantom.write(tmp_path / "study")
    volumes = {contrast: load_series(paths) for contrast, paths in study.paths.items()}
    findings = _model().predict(volumes)
    assert isinstance(findings, Findings)
    assert findings.model == "brain_tumor" and findings.demo is True
    flair = volumes["FLAIR"]
    assert findings.reference == flair.series_instance_uid == study.truth.series["FLAIR"]
    labels = findings.masks["tumor"]
    assert labels.shape == flair.array.shape and labels.dtype == np.uint8
    scores = _scores(labels, phantom.truth_on(flair.geometry))
    assert scores["WT"] >= 0.8, scores
    assert scores["TC"] >= 0.6, scores
    voxel = float(np.prod(flair.geometry.spacing))
    for finding in findings.findings:
        value = {"necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}[finding.label]
        assert finding.mask is not None and finding.mask.name == "tumor"
        assert finding.mask.value == value
        assert finding.volume_mm3 == pytest.approx((labels == value).sum() * voxel, rel=1e-3)
        assert 0.5 <= finding.probability <= 1.0
        assert finding.finding_site is not None and finding.finding_site.value == "12738006"
    # a small tumor (15 ml with its edema): a few mm of extra edema round it is a third more
    whole = findings.summary["whole_tumor_mm3"]
    true_whole = sum(study.truth.volumes_mm3.values())
    assert whole == pytest.approx(true_whole, rel=0.35)


def _route(**completion: Any) -> dict[str, Any]:
    return {
        "name": "brain-mri", "model": "brain_tumor", "level": "study",
        "match": {"Modality": "MR", "StudyDescription": "re:(?i)brain|head|neuro"},
        "completion": {"quiet_s": 1.0, "release_grace_s": 0.3, "study_timeout_s": 60,
                       "confirm_s": 0, "required_series": PATTERNS, **completion},
    }  # fmt: skip


def _send(node: Node, phantom: BrainPhantom, folder: Path, contrasts: tuple[str, ...],
          plans: Any = STUDY) -> BrainStudy:  # fmt: skip
    study = phantom.write(folder, [plan for plan in plans if plan.contrast in contrasts])
    for contrast in contrasts:  # one association per series, as a scanner sends them
        assert peers.storescu(port_of(node), study.paths[contrast]).returncode == 0
    return study


def _final_job(node: Node, timeout: float = 240.0) -> Any:
    wait_until(
        lambda: (jobs := node.jobs.list(limit=10)) and jobs[0].final,
        timeout=timeout,
        interval=0.3,
        what="the job's end",
    )
    (job,) = node.jobs.list(limit=10)
    return job


def test_a_study_sent_to_the_node_gets_its_tumor_segmented(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(models={"dirs": [ROOT / "models"]}, workers=[{"models": ["brain_tumor"]}],
                      routes=[_route()])  # fmt: skip
    phantom = brain_phantom(4202)
    study = _send(node, phantom, tmp_path / "study", ("T1", "T2", "FLAIR", "T1c"))
    job = _final_job(node)
    assert job.state is JobState.DONE, job.error
    assert job.level == "study" and len(job.inputs) == 4
    result = job.result
    assert result["model"] == "brain_tumor"
    assert result["reference"] == study.truth.series["FLAIR"]
    assert {i["name"]: i["series_instance_uid"] for i in result["inputs"]} == dict(
        study.truth.series
    )
    labels = read_mask(node.spool.root / result["masks"]["tumor"]["path"])
    scores = _scores(labels, phantom.truth_on(study.geometries["FLAIR"]))
    # a per-study floor (a thin rim of edema, 5 mm, is this phantom's); the benchmark holds the
    # mean over unseen studies to the 0.85 target
    assert scores["WT"] >= 0.7 and scores["TC"] >= 0.7, scores
    assert {f["label"] for f in result["findings"]} <= {"necrotic_core", "edema",
                                                         "enhancing_tumor"}  # fmt: skip
    # the node wrote a SEG of the sub-regions on the FLAIR series beside the job
    segs = [o for o in result.get("objects", []) if o["kind"] == "SEG"]
    assert len(segs) == 1, result.get("objects")
    from pydicom import dcmread

    seg = dcmread(node.spool.root / segs[0]["path"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.truth.series["FLAIR"]
    assert len(seg.SegmentSequence) == len(result["findings"])


@pytest.mark.parametrize("on_missing", ["run", "fail"])
def test_a_study_without_flair_follows_the_routes_action(
    start_node: Callable[..., Node], tmp_path: Path, on_missing: str
) -> None:
    node = start_node(models={"dirs": [ROOT / "models"]}, workers=[{"models": ["brain_tumor"]}],
                      routes=[_route(study_timeout_s=4, on_missing=on_missing)])  # fmt: skip
    phantom = brain_phantom(4203)
    coarse = [plan.scaled(1.5) for plan in STUDY]
    study = _send(node, phantom, tmp_path / "study", ("T1", "T2", "T1c"), coarse)
    job = _final_job(node)
    if on_missing == "fail":
        assert job.state is JobState.FAILED
        assert "FLAIR" in (job.error or "")
        return
    assert job.state is JobState.DONE, job.error
    assert len(job.inputs) == 3
    summary = job.result["summary"]
    assert summary["missing_inputs"] == ["FLAIR"]
    assert summary["reference_input"] == "T1c"  # the SEG goes on the post-contrast series
    assert job.result["reference"] == study.truth.series["T1c"]
    assert job.result["masks"]["tumor"]["shape"] == list(study.geometries["T1c"].shape)


def test_zoo_network_from_a_bundle_runs_through_the_same_pipeline(tmp_path: Path) -> None:
    from dicomnode.testing.bundles import write_bundle

    network = {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
               "init_filters": 16, "in_channels": 4, "out_channels": 3,
               "dropout_prob": 0.2}  # fmt: skip
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [240, 240, 160],
               "sw_batch_size": 1, "overlap": 0.5}  # fmt: skip
    bundle = write_bundle(tmp_path / "brats_mri_segmentation", network,
                          extra_config={"inferer": inferer},
                          name="brats_mri_segmentation", version="0.5.3")  # fmt: skip
    # the zoo's metadata names the channels; here in another order, which the model follows
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["inputs"]["image"]["channel_def"] = {
        "0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"}  # fmt: skip
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    model = _model(bundle)
    assert model.demo is False and "bundle.brats_mri_segmentation" in model.version
    assert model.spacing == 1.0 and model.roi_size == (240, 240, 160)
    assert model.channels == ("FLAIR", "T1", "T1c", "T2")
    params = sum(p.numel() for p in model.network.parameters())
    assert params > 4_000_000  # the zoo's SegResNet, not the demo's

    # a small field of view round the tumor, so the 1 mm grid stays small
    phantom = brain_phantom(4204)
    plans = [plan.scaled(1.5) for plan in STUDY]
    small = [replace(plan, fov_mm=(48.0, 48.0, 48.0)) for plan in plans]
    volumes = {}
    for plan in small:
        geometry = plan.geometry(phantom.tumor.centre)
        volumes[plan.contrast] = _volume(phantom, plan.contrast, geometry)
    findings = model.predict(volumes)
    assert findings.demo is False and findings.summary["channels"] == list(model.channels)
    assert findings.summary["spacing_mm"] == 1.0
    for finding in findings.findings:
        assert finding.label in {"necrotic_core", "edema", "enhancing_tumor"}
        assert 0.0 <= finding.probability <= 1.0 and finding.volume_mm3 > 0
    if findings.findings:
        assert findings.masks["tumor"].shape == volumes["FLAIR"].array.shape


def _volume(phantom: BrainPhantom, contrast: str, geometry: Any) -> Any:
    from dicomnode.imaging import FrameRef, Volume

    frames = tuple(FrameRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.4", None, "")
                   for k in range(geometry.shape[0]))  # fmt: skip
    return Volume(phantom.render(contrast, geometry), geometry, frames, "MR", f"1.2.9.{contrast}")
