"""A MONAI bundle as a model of its own: its spec from metadata.json (labels, SNOMED CT codes),
and its inference.json run on a loaded series giving MONAI's own labels on the source grid."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.errors import BundleInvalid  # noqa: E402
from dicomnode.inference import ModelRegistry  # noqa: E402
from dicomnode.inference.bundle_model import (  # noqa: E402
    LABEL_MAP,
    LOCAL_SCHEME,
    BundleModel,
    bundle_spec,
    label_code,
)
from dicomnode.testing.bundles import dice, monai_labels, write_model_package  # noqa: E402
from dicomnode.testing.bundles import write_zoo_bundle as zoo_bundle  # noqa: E402

#: A tiny UNet; the zoo's spleen_ct_segmentation has the same kind, bigger.
TINY_UNET: dict[str, Any] = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
    "norm": "instance",
}


def zoo_inference(network_def: dict[str, Any] | None = None) -> dict[str, Any]:
    """inference.json as the zoo's spleen_ct_segmentation writes it, smaller."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def or TINY_UNET,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "Spacingd",
                    "keys": "image",
                    "pixdim": [1.5, 1.5, 2.0],
                    "mode": "bilinear",
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [32, 32, 16],
            "sw_batch_size": 2,
            "overlap": 0.25,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "resample": False,
                },
            ],
        },
    }


def zoo_classification(count: int) -> dict[str, Any]:
    """inference.json of a tiny 3D classifier, as the zoo's classification bundles write theirs:
    the whole (resized) volume through a SimpleInferer, softmax in the postprocessing."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "Classifier",
            "in_shape": [1, 16, 16, 8],
            "classes": count,
            "channels": [4, 8],
            "strides": [2, 2],
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -200,
                    "a_max": 300,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
                {"_target_": "Resized", "keys": "image", "spatial_size": [16, 16, 8]},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
    }


def write_zoo_bundle(
    root: Path,
    *,
    channels: dict[str, str] | None = None,
    network_def: dict[str, Any] | None = None,
    name: str = "tiny_spleen_ct_segmentation",
    version: str = "0.5.3",
    seed: int = 3,
    classes: dict[str, str] | None = None,
) -> Path:
    """A bundle in the Model Zoo layout with seeded weights saved now; returns ``root``.
    With ``classes``, a classification bundle (:func:`zoo_classification`) of those classes."""
    config = zoo_inference(network_def) if classes is None else zoo_classification(len(classes))
    return zoo_bundle(
        root,
        config,
        channels=classes or channels,
        classification=classes is not None,
        name=name,
        version=version,
        seed=seed,
    )


def test_spec_from_metadata(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_zoo_bundle(
        tmp_path / "b",
        channels={"0": "background", "1": "spleen", "2": "left_kidney", "3": "widget"},
        network_def={**TINY_UNET, "out_channels": 4},
    )
    with caplog.at_level(logging.WARNING):
        spec = bundle_spec("abdomen", root)
    info = spec.info
    assert info.name == "abdomen" and info.version == "bundle.tiny_spleen_ct_segmentation.0.5.3"
    assert info.accepts.modalities == ("CT",) and spec.bundle == root and not info.demo
    by_name = {label.name: label for label in info.labels}
    assert sorted(by_name) == ["left_kidney", "spleen", "widget"]  # no background
    assert by_name["spleen"].value == 1 and by_name["spleen"].finding_type.code == (
        label_code("Spleen")[0].code
    )
    assert (by_name["spleen"].finding_type.value, by_name["spleen"].finding_type.scheme) == (
        "78961009",
        "SCT",
    )
    widget = by_name["widget"].finding_type
    assert (widget.scheme, widget.meaning, by_name["widget"].value) == (LOCAL_SCHEME, "widget", 3)
    assert "'widget' is no SNOMED CT concept" in caplog.text
    assert label_code("liver")[0].value == "10200004" and label_code("Lung")[1]


def test_bundle_without_segmentation_or_classification_output(tmp_path: Path) -> None:
    root = write_zoo_bundle(tmp_path / "b")
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["outputs"] = {
        "pred": {"type": "probabilities", "format": "classification", "num_channels": 2}
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    spec = bundle_spec("grader", root)  # a classification: its classes are its labels
    assert spec.info.params["output"] == "classification"
    assert [(label.name, label.value) for label in spec.info.labels] == [
        ("class_0", 1),
        ("class_1", 2),
    ]
    metadata["network_data_format"]["outputs"] = {"pred": {"type": "text"}}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleInvalid, match="no segmentation or classification among"):
        bundle_spec("grader", root)
    with pytest.raises(BundleInvalid, match="bundles names model 'x', which is no model package"):
        bundle_spec("x", tmp_path / "nowhere")


def test_registry_has_the_bundle_beside_the_packages(tmp_path: Path) -> None:
    write_model_package(tmp_path / "models", "stats")
    root = write_zoo_bundle(tmp_path / "spleen")
    registry = ModelRegistry([tmp_path / "models"], {"spleen": root})
    assert registry.names() == ["spleen", "stats"]
    model = registry.create("spleen")
    assert isinstance(model, BundleModel)


def test_labels_match_monai_on_the_source_grid(tmp_path: Path) -> None:
    """The node's series (a volume from the DICOM files) through the bundle gives the labels
    MONAI gives reading the same files with its own loader."""

    from dicomnode.imaging import load_series
    from dicomnode.phantoms.simple import SeriesSpec, ct_slices
    from dicomnode.phantoms.writer import write_series

    files = write_series(
        list(ct_slices(SeriesSpec(slices=20, rows=40, columns=44, pixel_mm=0.75, seed=8))),
        tmp_path / "ct",
    )
    volume = load_series(files)
    root = write_zoo_bundle(tmp_path / "spleen")
    model = ModelRegistry([], {"spleen": root}).load("spleen")
    findings = model.predict(volume)
    ours = findings.masks[LABEL_MAP]
    assert ours.shape == volume.array.shape == (20, 40, 44)
    theirs = monai_labels(root, tmp_path / "ct")
    assert theirs.shape == ours.shape
    fraction = float((theirs == 1).mean())
    assert 0.02 < fraction < 0.98, fraction  # the network splits the image: a real comparison
    assert dice(ours, theirs, 1) >= 0.99 and dice(ours, theirs, 0) >= 0.99
    (spleen,) = findings.findings
    voxel = 0.75 * 0.75 * 1.25
    assert spleen.volume_mm3 == pytest.approx(float((ours == 1).sum()) * voxel, rel=1e-6)
    assert findings.summary["weights_sha256"] == model.weights_sha256
    assert len(model.weights_sha256 or "") == 64
    assert findings.version == "bundle.tiny_spleen_ct_segmentation.0.5.3"


def test_a_bundle_without_invertd_is_resampled_onto_the_source_grid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dicomnode.imaging import load_series
    from dicomnode.phantoms.simple import SeriesSpec, ct_slices
    from dicomnode.phantoms.writer import write_series

    spec = SeriesSpec(slices=20, rows=40, columns=44, pixel_mm=0.75, seed=8)
    volume = load_series(write_series(list(ct_slices(spec)), tmp_path / "ct"))
    # MONAI's own way back: the labels (argmax first) inverted with nearest interpolation
    steps = zoo_inference()["postprocessing"]["transforms"]
    activations, invert, discrete = steps[0], steps[1], steps[2]
    nearest = {**invert, "nearest_interp": True}
    inverted = ModelRegistry(
        [], {"a": with_postprocessing(tmp_path / "a", [activations, discrete, nearest])}
    ).load("a")
    resampled = ModelRegistry(
        [], {"b": with_postprocessing(tmp_path / "b", [activations, discrete])}
    ).load("b")
    with caplog.at_level(logging.WARNING):
        labels = resampled.predict(volume).masks[LABEL_MAP]
    assert "resampled onto it, nearest" in caplog.text
    assert labels.shape == volume.array.shape
    theirs = inverted.predict(volume).masks[LABEL_MAP]
    assert 0.02 < float((theirs == 1).mean()) < 0.98
    assert dice(labels, theirs, 1) >= 0.99 and dice(labels, theirs, 0) >= 0.99


def with_postprocessing(root: Path, steps: list[dict[str, Any]]) -> Path:
    write_zoo_bundle(root)
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["postprocessing"]["transforms"] = steps
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    return root
