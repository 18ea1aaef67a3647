"""The lung nodule model's pre- and post-processing: grids, orientation, measurement, metadata."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.inference import ModelSpec, read_model_toml
from dicomnode.inference.registry import import_package, verify_package_weights
from dicomnode.phantoms.chest import Nodule, chest_ct
from dicomnode.phantoms.grids import phantom_geometry

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "lung_nodule"


def _module(name: str) -> Any:
    """One of the package's modules, imported as the registry does."""
    package = import_package(MODEL_DIR, "lung_nodule").__name__
    return importlib.import_module(f"{package}.{name}")


@pytest.fixture(scope="module")
def lung() -> Any:
    return _module("model")


@pytest.fixture(scope="module")
def preprocess() -> Any:
    return _module("preprocess")


@pytest.fixture(scope="module")
def nodules() -> Any:
    return _module("nodules")


def test_model_toml_is_valid_and_the_demo_weights_match() -> None:
    info = read_model_toml(MODEL_DIR / "model.toml")
    assert info.name == "lung_nodule"
    assert info.demo is True
    assert info.labels[0].finding_type.value == "27925004"
    assert info.labels[0].finding_site is not None
    assert info.labels[0].finding_site.value == "39607008"
    verify_package_weights(ModelSpec.from_directory(MODEL_DIR))
    assert (MODEL_DIR / "weights" / "demo.pt").stat().st_size < 20e6


@pytest.mark.parametrize("orientation", ["axial", "feet_first", "oblique"])
def test_model_grid_is_ras_and_maps_back_to_patient_space(
    preprocess: Any, orientation: str
) -> None:
    geometry = phantom_geometry((40, 48, 56), (0.8, 0.8, 1.5), orientation)
    array = np.full(geometry.shape, -1000.0, dtype=np.float32)
    point = np.array([6.0, 30.0, -140.0])  # patient LPS mm
    k, j, i = geometry.array_index(point)
    array[k - 2 : k + 3, j - 3 : j + 4, i - 3 : i + 4] = 300.0
    exact = geometry.voxel_to_patient([i, j, k])
    image = preprocess.to_model_space(array, geometry.affine, (1.25, 1.25, 2.0))
    # the grid runs along R, A, S (MONAI's [x, y, z] after Orientationd("RAS"))
    ras = preprocess.LPS_TO_RAS @ image.affine[:3, :3]
    assert np.all(np.argmax(np.abs(ras), axis=0) == [0, 1, 2])
    assert np.all(np.diag(ras) > 0)
    assert np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), (1.25, 1.25, 2.0))
    # the marked voxel's centre is where the affine says, and the window is 0..1
    voxel = image.to_voxel(exact)
    assert image.array[tuple(np.rint(voxel).astype(int))] == pytest.approx(1.0, abs=0.05)
    assert np.allclose(image.to_patient(voxel), exact)
    assert image.array.min() >= 0 and image.array.max() <= 1


def test_ras_axes_of_a_feet_first_grid(preprocess: Any) -> None:
    geometry = phantom_geometry((10, 10, 10), (1.0, 1.0, 1.0), "feet_first")
    order, flips = preprocess.ras_axes(geometry.affine)
    # feet-first columns run to the patient's right (+R): i is R, unflipped; slices run down
    assert order == [0, 1, 2]
    assert flips == [False, True, True]


@pytest.mark.parametrize(
    ("diameter", "kind"), [(6.0, "solid"), (14.0, "solid"), (12.0, "ground_glass"), (24.0, "solid")]
)
def test_measurement_of_a_nodule(nodules: Any, diameter: float, kind: str) -> None:
    phantom = chest_ct(
        (60, 160, 160),
        (1.0, 1.0, 1.25),
        "axial",
        nodules=[Nodule(diameter, kind, center_voxel=(50.0, 100.0, 25.0))],
        seed=3,
    )
    truth = phantom.truth.nodules[0]
    measured = nodules.measure_nodule(
        phantom.array, phantom.geometry.affine, np.array(truth.center_mm), np.full(3, diameter)
    )
    assert measured is not None
    assert measured.texture == kind
    assert measured.diameter_mm == pytest.approx(diameter, rel=0.12)
    assert measured.volume_mm3 == pytest.approx(truth.volume_mm3, rel=0.35)
    labels = np.zeros(phantom.array.shape, dtype=bool)
    labels[measured.box] = measured.mask
    overlap = (labels & (phantom.nodule_labels == 1)).sum() / (phantom.nodule_labels == 1).sum()
    assert overlap > 0.8


def test_bundle_settings_come_from_its_inference_config(lung: Any) -> None:
    model = object.__new__(lung.LungNoduleModel)
    config = {
        "infer_patch_size": [256, 256, 96],
        "anchor_generator": {
            "_target_": "x",
            "feature_map_scales": [1, 2],
            "base_anchor_shapes": [[6, 8, 4]],
        },
        "preprocessing": {
            "transforms": [
                {"_target_": "Spacingd", "pixdim": [0.8, 0.8, 1.5]},
                {"_target_": "ScaleIntensityRanged", "a_min": -1000, "a_max": 500},
            ]
        },
        "detector_ops": ["$@detector.set_box_selector_parameters(score_thresh=0.1,nms_thresh=0.3)"],
    }
    bundle = SimpleNamespace(parser=SimpleNamespace(get=lambda key="": config))
    model._settings_from_bundle(bundle)
    assert model.roi_size == (256, 256, 96)
    assert model.spacing == (0.8, 0.8, 1.5)
    assert model.hu_window == (-1000.0, 500.0)
    assert model.anchors == {"feature_map_scales": [1, 2], "base_anchor_shapes": [[6, 8, 4]]}
    assert model.box_selector["score_thresh"] == 0.1
    assert model.box_selector["nms_thresh"] == 0.3
    assert model.classifier is None
    # a bundle that says nothing gets the zoo's values
    model._settings_from_bundle(SimpleNamespace(parser=SimpleNamespace(get=lambda key="": {})))
    assert model.spacing == lung.ZOO_SPACING
    assert model.roi_size == (512, 512, 192)


def test_detector_that_selects_before_decoding_finds_monai_s_boxes() -> None:
    # The detector decodes only the boxes its selector keeps; MONAI's decodes every anchor's.
    import torch
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

    network_module = _module("network")
    spec = read_model_toml(MODEL_DIR / "model.toml").params
    torch.manual_seed(3)
    network = network_module.build_retinanet(spec["network"]).eval()
    # an untrained head scores about 0.01 (RetinaNet's prior): a threshold below it keeps many
    selector = {**network_module.ZOO_BOX_SELECTOR, "score_thresh": 0.005,
                "topk_candidates_per_level": 200}  # fmt: skip
    ours = network_module.build_detector(network, network_module.ZOO_ANCHORS, selector).eval()
    theirs = RetinaNetDetector(
        network, network_module.build_anchor_generator(network_module.ZOO_ANCHORS)
    )
    theirs.set_target_keys(box_key="box", label_key="label")
    theirs.set_box_selector_parameters(**selector)
    assert type(ours) is not RetinaNetDetector and isinstance(ours, RetinaNetDetector)
    image = torch.rand(1, 64, 64, 32)
    with torch.no_grad():
        (found,), (expected,) = ours([image]), theirs.eval()([image])
    assert len(expected["box"]) > 10
    for key in ("box", "label_scores", "label"):
        assert torch.equal(found[key], expected[key]), key


def test_growth_matches_nodules_by_centre_and_reports_the_change() -> None:
    from dicomnode.domain import Code, Finding, Findings
    from dicomnode.inference import Prior

    growth = _module("growth")
    nodule = Code("27925004", "SCT", "Nodule")

    def found(centre: tuple[float, float, float], diameter: float) -> Finding:
        return Finding("nodule", nodule, 0.9, centre_mm=centre, diameter_mm=diameter,
                       volume_mm3=round(np.pi / 6 * diameter**3, 1))  # fmt: skip

    now = Findings("lung_nodule", "0.1.0", True,
                   (found((10, 0, 0), 12.0), found((80, 0, 0), 5.0)))  # fmt: skip
    # the prior's nodule 3 mm away grew; the one at 40 mm is gone; the one at 80 mm is new
    before = Findings("lung_nodule", "0.1.0", True,
                      (found((40, 0, 0), 6.0), found((13, 0, 0), 8.0)))  # fmt: skip
    prior = Prior(volume=None, study_instance_uid="1.2", series_instance_uid="1.2.1",  # type: ignore[arg-type]
                  study_date="20260501", interval_days=184)  # fmt: skip
    compared = growth.compare(now, before, prior)
    grown, new = compared.findings
    change = grown.attributes["growth"]
    assert change["prior_diameter_mm"] == 8.0 and change["diameter_change_mm"] == 4.0
    assert change["distance_mm"] == 3.0 and change["interval_days"] == 184
    assert change["volume_change_percent"] == pytest.approx(237.5, abs=0.2)  # (12/8)**3 - 1
    assert change["volume_doubling_days"] == round(184 * np.log(2) / np.log(1.5**3))
    assert new.attributes["new"] is True and "growth" not in new.attributes
    summary = compared.summary["prior"]
    assert (summary["matched"], summary["new"], summary["not_found_now"]) == (1, 1, 1)
    comments = compared.summary["comments"]
    assert comments[0] == "Compared with the prior CT of 2026-05-01 (184 days earlier): " \
        "2 nodules then, 2 now."  # fmt: skip
    assert comments[1].startswith("Nodule 1: diameter 12.0 mm, was 8.0 mm (+4.0 mm, +50%)")
    assert comments[2] == "Nodule 2: new since the prior CT of 2026-05-01."
    assert comments[3] == "1 nodule of the prior not found now."
    # too far apart (beyond 10 mm and both diameters): no match
    assert growth.match([found((0, 0, 0), 5.0)], [found((0, 0, 12), 5.0)]) == {}
