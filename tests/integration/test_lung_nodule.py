"""The lung nodule model end to end: DICOM series in, nodules in patient coordinates out; and the
Model Zoo's network from a bundle directory through the same pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.domain import Findings
from dicomnode.imaging import load_series
from dicomnode.inference import ModelRegistry
from dicomnode.phantoms.chest import Nodule, chest_ct

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "lung_nodule"

pytestmark = pytest.mark.slow


def _model(bundle: Path | None = None) -> Any:
    """The model as a worker loads it."""
    bundles = {MODEL_DIR.name: bundle} if bundle else {}
    return ModelRegistry([MODEL_DIR.parent], bundles).load(MODEL_DIR.name)


@pytest.fixture(scope="module")
def demo() -> Any:
    return _model()


# seeds outside training's 1000-1999
@pytest.mark.parametrize(("orientation", "seed"), [("axial", 4101), ("feet_first", 4102)])
def test_demo_model_finds_the_nodules_of_an_unseen_phantom(
    demo: Any, tmp_path: Path, orientation: str, seed: int
) -> None:
    # nodules placed at random inside the lungs (as training's, but never seen: other seeds)
    phantom = chest_ct((130, 400, 400), (0.85, 0.85, 1.25), orientation, nodules=4, seed=seed,
                       sizes=(5.0, 25.0), ground_glass_fraction=0.5)  # fmt: skip
    volume = load_series(phantom.write(tmp_path / "series"))
    findings = demo.predict(volume)
    assert isinstance(findings, Findings)
    assert findings.demo is True
    assert findings.model == "lung_nodule"
    mask = findings.masks["nodules"]
    assert mask.shape == volume.array.shape
    for truth in phantom.truth.nodules:
        centre = np.array(truth.center_mm)
        near = [f for f in findings.findings
                if np.linalg.norm(np.array(f.centre_mm) - centre) <= 3.0]  # fmt: skip
        assert near, f"missed the {truth.diameter_mm} mm {truth.kind} nodule at {centre}"
        found = max(near, key=lambda f: f.probability)
        assert found.probability >= 0.5
        assert found.diameter_mm == pytest.approx(truth.diameter_mm, rel=0.2)
        assert found.volume_mm3 == pytest.approx(truth.volume_mm3, rel=0.5)
        assert found.attributes["texture"] == truth.kind
        # its mask covers the true centre's voxel on the source grid
        assert found.mask is not None and found.mask.name == "nodules"
        assert mask[volume.geometry.array_index(centre)] == found.mask.value
    assert len(findings.findings) <= len(phantom.truth.nodules) + 2


def test_zoo_network_from_a_bundle_runs_through_the_same_pipeline(tmp_path: Path) -> None:
    from dicomnode.imaging import FrameRef, Volume
    from dicomnode.testing.bundles import ZOO_LUNG_RETINANET, write_bundle

    config = {
        **ZOO_LUNG_RETINANET,
        "infer_patch_size": [512, 512, 192],
        "anchor_generator": {
            "_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
            "feature_map_scales": [1, 2, 4],
            "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
        },
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Spacingd", "keys": "image", "pixdim": [0.703125, 0.703125, 1.25]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1024.0,
             "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
    }  # fmt: skip
    bundle = write_bundle(tmp_path / "lung_nodule_ct_detection", extra_config=config,
                          name="lung_nodule_ct_detection", version="0.6.9")  # fmt: skip
    model = _model(bundle)
    assert model.demo is False
    assert "bundle.lung_nodule_ct_detection" in model.version
    assert model.classifier is None
    assert model.spacing == (0.703125, 0.703125, 1.25)
    params = sum(p.numel() for p in model.detector.network.parameters())
    assert params > 10_000_000  # ResNet-50: the zoo's network, not the demo one

    phantom = chest_ct(
        (24, 64, 64),
        (1.4, 1.4, 2.5),
        "feet_first",
        nodules=[Nodule(10.0, "solid", center_voxel=(20.0, 30.0, 12.0))],
        seed=7,
    )
    frames = tuple(FrameRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2", None, "")
                   for k in range(24))  # fmt: skip
    volume = Volume(phantom.array, phantom.geometry, frames, "CT", "1.2.3")
    findings = model.predict(volume)
    assert isinstance(findings, Findings)
    assert findings.demo is False
    for finding in findings.findings:
        assert 0.0 <= finding.probability <= 1.0
        assert finding.centre_mm is not None and len(finding.centre_mm) == 3
        assert finding.diameter_mm is not None and finding.diameter_mm > 0
        assert finding.finding_type.value == "27925004"
    if findings.findings:
        assert findings.masks["nodules"].shape == volume.array.shape
    candidates = model.candidates(volume)
    assert all(0.0 <= c.probability <= 1.0 for c in candidates)
