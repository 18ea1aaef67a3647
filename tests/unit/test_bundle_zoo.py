"""Bundles written as the Model Zoo writes them, run through the node's bundle model path.

Each network kind the zoo's segmentation bundles use (UNet, SegResNet, SwinUNETR, DynUNet),
small and with seeded weights made here, with a preprocessing and postprocessing chain like a
zoo bundle's (spleen_ct_segmentation, prostate_mri_anatomy, wholeBody_ct_segmentation,
swin_unetr_btcv_segmentation, vista3d's CropForegroundd), on a small phantom chest CT: the label
map on the source grid equals MONAI's own run of the same inference.json on the same DICOM
files. A 1x1x1 convolution with hand-set weights thresholds intensity, so its answer is known
in advance: checked on an axial, a feet-first and an oblique series.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.imaging import Volume, load_series  # noqa: E402
from dicomnode.inference import ModelRegistry  # noqa: E402
from dicomnode.inference.bundle_model import LABEL_MAP  # noqa: E402
from dicomnode.phantoms.chest import chest_ct  # noqa: E402
from dicomnode.phantoms.grids import Orientation  # noqa: E402
from dicomnode.phantoms.writer import write_volume  # noqa: E402
from dicomnode.testing.bundles import (  # noqa: E402
    dice,
    monai_labels,
    write_nifti,
    write_zoo_bundle,
)

IMAGE = "image"


def load() -> dict[str, Any]:
    return {"_target_": "LoadImaged", "keys": "@image_key"}


def step(target: str, **args: Any) -> dict[str, Any]:
    return {"_target_": target, "keys": "@image_key", **args}


def pred(target: str, **args: Any) -> dict[str, Any]:
    return {"_target_": target, "keys": "pred", **args}


def invert(nearest: bool) -> dict[str, Any]:
    return pred(
        "Invertd",
        transform="@preprocessing",
        orig_keys="@image_key",
        nearest_interp=nearest,
        to_tensor=True,
    )


SAVE = pred(
    "SaveImaged",
    output_dir="@output_dir",
    output_postfix="seg",
    output_ext=".nii.gz",
    separate_folder=False,
    resample=False,
)
SPACING = step("Spacingd", pixdim=[1.5, 1.5, 2.0], mode="bilinear")

#: network x transform chain, each as a zoo bundle of that network has it (smaller)
ZOO: dict[str, dict[str, Any]] = {
    # prostate_mri_anatomy: NormalizeIntensityd; argmax, KeepLargestConnectedComponentd, Invertd
    "unet": {
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 3,
            "channels": [4, 8, 16],
            "strides": [2, 2],
            "num_res_units": 1,
            "norm": "batch",
            "act": "prelu",
        },
        "channels": {"0": "background", "1": "lung", "2": "heart"},
        "preprocessing": [
            load(),
            step("EnsureChannelFirstd"),
            step("Orientationd", axcodes="RAS"),
            SPACING,
            step("NormalizeIntensityd"),
            step("EnsureTyped"),
        ],
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "overlap": 0.5},
        "postprocessing": [
            pred("AsDiscreted", argmax=True),
            pred("KeepLargestConnectedComponentd", applied_labels=[1, 2]),
            invert(False),
            SAVE,
        ],
    },
    # wholeBody_ct_segmentation: NormalizeIntensityd(nonzero), ScaleIntensityd; gaussian
    # sliding windows; softmax, argmax, then Invertd nearest
    "segresnet": {
        "network_def": {
            "_target_": "SegResNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "init_filters": 8,
            "blocks_down": [1, 1, 1],
            "blocks_up": [1, 1],
            "dropout_prob": 0.2,
        },
        "channels": {"0": "background", "1": "lung"},
        "seed": 1,  # weights that split the image (seed 3's call it all background)
        "preprocessing": [
            load(),
            step("EnsureTyped"),
            step("EnsureChannelFirstd"),
            step("Orientationd", axcodes="RAS"),
            SPACING,
            step("NormalizeIntensityd", nonzero=True),
            step("ScaleIntensityd", minv=-1.0, maxv=1.0),
        ],
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [32, 32, 16],
            "sw_batch_size": 2,
            "overlap": 0.25,
            "padding_mode": "replicate",
            "mode": "gaussian",
        },
        "postprocessing": [
            pred("Activationsd", softmax=True),
            pred("AsDiscreted", argmax=True),
            invert(True),
            SAVE,
        ],
    },
    # swin_unetr_btcv_segmentation: ScaleIntensityRanged; softmax, Invertd, argmax
    "swinunetr": {
        "network_def": {
            "_target_": "SwinUNETR",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "feature_size": 12,
            "depths": [1, 1, 1, 1],
            "use_checkpoint": False,
        },
        "channels": {"0": "background", "1": "spleen"},
        "preprocessing": [
            load(),
            step("EnsureChannelFirstd"),
            step("Orientationd", axcodes="RAS"),
            SPACING,
            step("ScaleIntensityRanged", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            step("EnsureTyped"),
        ],
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 32], "overlap": 0.5},
        "postprocessing": [
            pred("Activationsd", softmax=True),
            invert(False),
            pred("AsDiscreted", argmax=True),
            SAVE,
        ],
    },
    # spleen_deepedit_annotation's network; CropForegroundd (vista3d's) inverted by Invertd
    "dynunet": {
        "network_def": {
            "_target_": "DynUNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "kernel_size": [3, 3, 3, 3],
            "strides": [1, 2, 2, [2, 2, 1]],
            "upsample_kernel_size": [2, 2, [2, 2, 1]],
            "filters": [4, 8, 16, 32],
            "norm_name": "instance",
            "deep_supervision": False,
            "res_block": True,
        },
        "channels": {"0": "background", "1": "spleen"},
        "preprocessing": [
            load(),
            step("EnsureChannelFirstd"),
            step("Orientationd", axcodes="RAS"),
            step("ScaleIntensityRanged", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            step("CropForegroundd", source_key="@image_key", margin=2, allow_smaller=True),
            SPACING,
            step("EnsureTyped"),
        ],
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "overlap": 0.25},
        "postprocessing": [
            pred("EnsureTyped"),
            pred("Activationsd", softmax=True),
            invert(False),
            pred("AsDiscreted", argmax=True),
            SAVE,
        ],
    },
}


def inference(case: dict[str, Any]) -> dict[str, Any]:
    """inference.json in the zoo's style."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "image_key": IMAGE,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": case["network_def"],
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": case["preprocessing"]},
        "inferer": case["inferer"],
        "postprocessing": {"_target_": "Compose", "transforms": case["postprocessing"]},
    }


def chest_series(folder: Path, orientation: Orientation = "axial", seed: int = 4) -> Volume:
    """A small phantom chest CT written as DICOM files in ``folder``, loaded as the node does."""
    phantom = chest_ct((24, 40, 44), (0.9, 0.9, 1.5), orientation, seed=seed, vessels=False)
    return load_series(write_volume(phantom.array, phantom.geometry, folder, seed=seed))


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Volume]:
    folder = tmp_path_factory.mktemp("chest")
    return folder, chest_series(folder)


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(ZOO))
def test_zoo_network_and_transforms_match_monai(
    network: str, chest: tuple[Path, Volume], tmp_path: Path
) -> None:
    folder, volume = chest
    case = ZOO[network]
    root = write_zoo_bundle(
        tmp_path / network,
        inference(case),
        channels=case["channels"],
        name=f"tiny_{network}",
        seed=case.get("seed", 3),
    )
    model = ModelRegistry([], {network: root}).load(network)
    findings = model.predict(volume)
    ours = findings.masks[LABEL_MAP]
    theirs = monai_labels(root, folder)
    assert ours.shape == theirs.shape == volume.array.shape
    for value in range(len(case["channels"])):
        fraction = float((theirs == value).mean())
        assert 0.01 < fraction < 0.99, (value, fraction)  # the network splits the image
        assert dice(ours, theirs, value) >= 0.99, (value, dice(ours, theirs, value))
    assert sorted(f.label for f in findings.findings) == sorted(
        label for key, label in case["channels"].items() if key != "0"
    )


def gradient_bundle(root: Path) -> Path:
    """A bundle whose answer is known: one convolution with hand-set weights, 3x1x1 along the
    third axis after ``Orientationd`` to RAS, i.e. towards the patient's head; label 1 where the
    intensity (``ScaleIntensityRanged``, -1000..0 HU to 0..1, clipped) rises towards the head:
    channel 1 is ``x[s+1] - x[s-1] - 0.0005`` (edges replicated) against channel 0's zero.
    ``SimpleInferer`` (the whole image at once), argmax, then ``Invertd``."""
    config = inference(
        {
            "network_def": {
                "_target_": "torch.nn.Conv3d",
                "in_channels": 1,
                "out_channels": 2,
                "kernel_size": [1, 1, 3],
                "padding": [0, 0, 1],
                "padding_mode": "replicate",
            },
            "preprocessing": [
                load(),
                step("EnsureChannelFirstd"),
                step("Orientationd", axcodes="RAS"),
                step("ScaleIntensityRanged", a_min=-1000, a_max=0, b_min=0.0, b_max=1.0, clip=True),
                step("EnsureTyped"),
            ],
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": [pred("AsDiscreted", argmax=True), invert(True), SAVE],
        }
    )
    weight = torch.zeros(2, 1, 1, 1, 3)
    weight[1, 0, 0, 0] = torch.tensor([-1.0, 0.0, 1.0])
    weights = {"weight": weight, "bias": torch.tensor([0.0, -0.0005])}
    return write_zoo_bundle(
        root,
        config,
        channels={"0": "background", "1": "rising_headwards"},
        name="gradient",
        state_dict=weights,
    )


def rising_headwards(volume: Volume) -> np.ndarray:
    """The known answer, from the series and its geometry alone: voxels whose clipped HU is
    higher in the next slice towards the head than in the one before."""
    hu = np.clip(volume.array.astype(np.float64), -1000, 0)
    padded = np.pad(hu, ((1, 1), (0, 0), (0, 0)), mode="edge")
    headwards = volume.geometry.direction[2, 2] > 0  # the slice axis's LPS z: +z is the head
    up, down = (padded[2:], padded[:-2]) if headwards else (padded[:-2], padded[2:])
    return (up - down > 0.5).astype(np.uint8)  # whole HU: a rise is at least 1


@pytest.mark.parametrize("orientation", ["axial", "feet_first", "oblique"])
def test_a_bundle_with_a_known_answer(orientation: Orientation, tmp_path: Path) -> None:
    volume = chest_series(tmp_path / "ct", orientation)
    geometry = volume.geometry
    z = [geometry.voxel_to_patient([0, 0, k])[2] for k in range(2)]
    assert (z[1] < z[0]) == (orientation == "feet_first")  # feet-first: positions going down
    if orientation == "oblique":
        assert not np.allclose(np.abs(geometry.direction), np.eye(3), atol=0.05)
    root = gradient_bundle(tmp_path / "gradient")
    model = ModelRegistry([], {"gradient": root}).load("gradient")
    findings = model.predict(volume)
    ours = findings.masks[LABEL_MAP]
    expected = rising_headwards(volume)
    assert 0.1 < float(expected.mean()) < 0.5, float(expected.mean())  # a real answer
    np.testing.assert_array_equal(ours, expected)
    # MONAI's own run of the same inference.json: its loader on the same DICOM files, and on
    # the volume as a NIfTI file (what the zoo's bundles are made to read)
    np.testing.assert_array_equal(monai_labels(root, tmp_path / "ct"), expected)
    theirs = monai_labels(root, write_nifti(volume, tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(theirs, expected)
    (label,) = findings.findings
    voxel_mm3 = 0.9 * 0.9 * 1.5
    assert label.volume_mm3 == pytest.approx(float(expected.sum()) * voxel_mm3, rel=1e-6)
    k, j, i = np.nonzero(expected)
    centre = geometry.voxel_to_patient([i.mean(), j.mean(), k.mean()])
    np.testing.assert_allclose(label.centre_mm, centre, atol=1e-3)


def test_monai_reading_an_oblique_series_needs_lenient_pydicom(tmp_path: Path) -> None:
    """Recorded: MONAI's PydicomReader appends the mean slice distance to the first file's
    Pixel Spacing, a DS that pydicom's default validation refuses when it needs more than 16
    characters, as an oblique series' does; :func:`monai_labels` relaxes it (the node's own
    loader needs no such thing)."""
    chest_series(tmp_path / "ct", "oblique")
    root = gradient_bundle(tmp_path / "gradient")
    with pytest.raises(RuntimeError, match="LoadImaged") as caught:
        monai_labels(root, tmp_path / "ct", lenient=False)
    assert "must be <= 16 characters" in str(caught.value.__cause__)


def test_the_zoos_swin_unetr_config_names_img_size_which_monai_1_5_dropped(
    tmp_path: Path,
) -> None:
    """swin_unetr_btcv_segmentation (0.5.6, made with MONAI 1.4) gives SwinUNETR ``img_size``,
    which MONAI 1.5 removed: the node's error names it (the network is made before einops is
    needed, so this runs without einops)."""
    from dicomnode.errors import BundleInvalid

    case = {**ZOO["swinunetr"]}
    case["network_def"] = {**case["network_def"], "img_size": 64}
    root = write_zoo_bundle(
        tmp_path / "swin", inference(case), channels=case["channels"], state_dict={}
    )
    monai_version = tuple(int(p) for p in __import__("monai").__version__.split(".")[:2])
    if monai_version < (1, 5):
        pytest.skip("MONAI before 1.5 still takes img_size")
    with pytest.raises(BundleInvalid, match="img_size"):
        ModelRegistry([], {"swin": root}).load("swin")
