"""Tiny MONAI bundles in the Model Zoo layout, and tiny model packages, for tests.

:func:`write_bundle` writes ``configs/metadata.json``, ``configs/inference.json`` (the network
under ``network_def``, as the zoo's bundles have it) and ``models/model.pt`` (the state dict of
that network, built from the same config with a fixed seed). :func:`write_zoo_bundle` writes a
whole inference.json (preprocessing from ``LoadImaged``, inferer, postprocessing to
``SaveImaged``) with a zoo-style metadata.json naming the output's channels; :func:`monai_labels`
runs such a bundle as MONAI itself does on DICOM files, for comparison with the node's run, and
:func:`dice` compares label maps. :func:`write_model_package` writes a ``model.toml`` and its
module into a models folder. They import torch/MONAI only when called.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomnode.imaging import Volume

#: A SegResNet small enough to run on a CPU in a blink (brats_mri_segmentation's network kind).
TINY_SEGRESNET: dict[str, Any] = {
    "_target_": "SegResNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "init_filters": 8,
    "blocks_down": [1, 1],
    "blocks_up": [1],
}

#: A BasicUNet with few features (every spatial size divisible by 16).
TINY_BASICUNET: dict[str, Any] = {
    "_target_": "BasicUNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "features": [4, 4, 8, 8, 16, 4],
}

#: The network of the Model Zoo's lung_nodule_ct_detection (3D RetinaNet, ResNet-50 + FPN),
#: expressed as its inference.json does: the backbone and feature extractor as expressions.
ZOO_LUNG_RETINANET: dict[str, Any] = {
    "backbone": (
        "$monai.networks.nets.resnet.resnet50(spatial_dims=3,n_input_channels=1,"
        "conv1_t_stride=[2,2,1],conv1_t_size=[7,7,7])"
    ),
    "feature_extractor": (
        "$monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor("
        "@backbone,3,False,[1,2],None)"
    ),
    "network_def": {
        "_target_": "RetinaNet",
        "spatial_dims": 3,
        "num_classes": 1,
        "num_anchors": 3,
        "feature_extractor": "@feature_extractor",
        "size_divisible": [16, 16, 8],
    },
}


def write_bundle(
    root: Path,
    network_def: Mapping[str, Any] | None = None,
    *,
    extra_config: Mapping[str, Any] | None = None,
    name: str = "tiny_segmentation",
    version: str = "0.0.1",
    seed: int = 0,
    checkpoint_key: str | None = None,
) -> Path:
    """Write a bundle directory at ``root``; returns ``root``.

    ``network_def`` is the network's config (default :data:`TINY_SEGRESNET`); keys of
    ``extra_config`` join inference.json (e.g. the backbone expressions of
    :data:`ZOO_LUNG_RETINANET`, which also works whole as ``extra_config`` with no
    ``network_def``). The weights are the network's initial ones under ``torch.manual_seed(seed)``;
    ``checkpoint_key`` nests them (``{"model": state_dict}``) as some zoo checkpoints do.
    """
    import torch
    from monai.bundle import ConfigParser

    from dicomnode.inference.compat import ensure_detection_without_torchvision

    config: dict[str, Any] = {
        "imports": ["$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **dict(extra_config or {}),
    }
    if network_def is not None or "network_def" not in config:
        config["network_def"] = dict(network_def or TINY_SEGRESNET)
    config.setdefault("network", "$@network_def.to(@device)")
    config.setdefault(
        "inferer",
        {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "overlap": 0.25},
    )
    metadata = {
        "version": version,
        "name": name,
        "task": "test bundle written by dicomnode.testing.bundles",
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [32] * 3}},
            "outputs": {"pred": {"type": "image", "num_channels": 2}},
        },
    }
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))

    ensure_detection_without_torchvision()
    parser = ConfigParser(config)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    state = network.state_dict()
    torch.save({checkpoint_key: state} if checkpoint_key else state, root / "models" / "model.pt")
    return root


def write_zoo_bundle(
    root: Path,
    config: Mapping[str, Any],
    *,
    channels: Mapping[str, str] | None = None,
    name: str = "tiny_spleen_ct_segmentation",
    version: str = "0.5.3",
    task: str = "Spleen segmentation (tiny, for tests)",
    modality: str = "CT",
    spatial_shape: tuple[int, int, int] = (32, 32, 16),
    seed: int = 3,
    state_dict: Mapping[str, Any] | None = None,
    classification: bool = False,
) -> Path:
    """A bundle in the Model Zoo layout with the inference.json ``config``; returns ``root``.

    metadata.json is written as the zoo's are (``network_data_format`` with the image input and
    the ``pred`` segmentation output, its ``channel_def`` from ``channels``; ``classification``:
    class probabilities instead, as endoscopic_inbody_classification describes). The weights are
    ``state_dict`` (hand-set ones) or else the initial ones of ``network_def`` under
    ``torch.manual_seed(seed)``.
    """
    import torch
    from monai.bundle import ConfigParser

    channels = dict(channels or {"0": "background", "1": "spleen"})
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": version,
        "name": name,
        "task": task,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if modality == "CT" else "magnitude",
                    "modality": modality,
                    "num_channels": 1,
                    "spatial_shape": list(spatial_shape),
                    "channel_def": {"0": "image"},
                },
            },
            "outputs": {
                "pred": (
                    {
                        "type": "probabilities",
                        "format": "classes",
                        "num_channels": len(channels),
                        "spatial_shape": [1, len(channels)],
                        "value_range": [0, 1],
                        "is_patch_data": False,
                        "channel_def": channels,
                    }
                    if classification
                    else {
                        "type": "image",
                        "format": "segmentation",
                        "num_channels": len(channels),
                        "spatial_shape": list(spatial_shape),
                        "channel_def": channels,
                    }
                ),
            },
        },
    }
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = ConfigParser(dict(config)).get_parsed_content("network_def").state_dict()
    torch.save(dict(state_dict), root / "models" / "model.pt")
    return root


#: the transforms MONAI's own run leaves out of the postprocessing: it writes no files
_WRITERS = ("SaveImage", "SaveImaged", "SaveImageD", "SaveImageDict")


def monai_labels(bundle: Path, source: Path, *, lenient: bool = True) -> Any:
    """What MONAI itself makes of a series with the bundle's config: its own loader
    (``LoadImaged``; the pydicom reader on a folder of DICOM files, else its NIfTI reader on the
    file, see :func:`write_nifti`) and preprocessing, the inferer, the postprocessing less the
    file writer; a ``[slice, row, column]`` uint8 array.

    ``lenient``: pydicom's reading validation is WARN while MONAI runs. MONAI's PydicomReader
    appends the mean slice distance to the first file's Pixel Spacing (a DS value), which
    pydicom's default validation refuses when the float needs over 16 characters, as an oblique
    series' does (e.g. 1.5 mm x cos 20 degrees); MONAI reads such a series right otherwise."""
    import numpy as np
    import pydicom.config
    import torch
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch, list_data_collate

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    steps = parser["preprocessing#transforms"]
    (loader,) = (n for n, t in enumerate(steps) if str(t["_target_"]).startswith("LoadImage"))
    if source.is_dir():
        parser[f"preprocessing#transforms#{loader}#reader"] = "PydicomReader"
    parser["postprocessing#transforms"] = [
        t for t in parser["postprocessing#transforms"] if t["_target_"] not in _WRITERS
    ]
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    mode = pydicom.config.settings.reading_validation_mode
    if lenient:
        pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    try:
        data = parser.get_parsed_content("preprocessing")({"image": str(source)})
    finally:
        pydicom.config.settings.reading_validation_mode = mode
    batch = list_data_collate([data])
    with torch.no_grad():
        pred = parser.get_parsed_content("inferer")(batch["image"], network)
    item = decollate_batch({**batch, "pred": pred})[0]
    out = parser.get_parsed_content("postprocessing")(item)["pred"]
    return np.rint(np.asarray(out[0])).astype(np.uint8).transpose(2, 1, 0)


def write_nifti(volume: Volume, path: Path) -> Path:
    """The volume as a NIfTI file (``[x, y, z]``, its affine in RAS), as the zoo's bundles read
    their inputs; returns ``path``."""
    import nibabel
    import numpy as np

    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.geometry.affine  # LPS -> RAS
    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)
    nibabel.save(nibabel.Nifti1Image(array, affine), str(path))
    return path


def dice(a: Any, b: Any, value: int) -> float:
    """The Dice coefficient of label ``value`` in two label maps (1.0 where neither has it)."""
    x, y = a == value, b == value
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


#: A model that needs no network: the mean HU and shape of its volume, and the voxels above
#: -500 HU as one "body" finding with its centre, volume and mask (for pipeline tests).
VOLUME_STATS_MODEL = """
import numpy as np

from dicomnode.inference import Model


class VolumeStats(Model):
    def predict(self, inputs):
        volume = inputs if not isinstance(inputs, dict) else inputs[sorted(inputs)[0]]
        body = volume.array > self.threshold("body_hu", -500.0)
        k, j, i = np.nonzero(body)
        centre = volume.geometry.voxel_to_patient([i.mean(), j.mean(), k.mean()])
        voxel_mm3 = float(np.prod(volume.geometry.spacing))
        finding = self.finding(
            "body",
            probability=1.0,
            centre_mm=tuple(float(c) for c in centre),
            volume_mm3=float(body.sum()) * voxel_mm3,
            mask=self.mask_ref("body"),
        )
        return self.findings(
            [finding],
            masks={"body": body.astype(np.uint8)},
            summary={
                "mean_hu": float(volume.array.mean()),
                "shape": list(volume.array.shape),
                "inputs": sorted(inputs) if isinstance(inputs, dict) else None,
            },
        )

    def mask_ref(self, name):
        from dicomnode.domain import MaskRef

        return MaskRef(name, self.label("body").value)
"""

VOLUME_STATS_TOML = """
name = "{name}"
version = "1.0.0"
description = "Mean HU and body mask, for tests"
entry = "model:VolumeStats"
demo = true

[accepts]
level = "{level}"
modalities = {modalities}
{inputs}

[[labels]]
name = "body"
value = 1
finding_type = {{ value = "123037004", scheme = "SCT", meaning = "Body structure" }}

[thresholds]
body_hu = -500.0
"""


def write_model_package(
    models_dir: Path,
    name: str,
    *,
    source: str = VOLUME_STATS_MODEL,
    toml: str | None = None,
    module: str = "model",
    files: Mapping[str, bytes] | None = None,
    level: str = "series",
    modalities: tuple[str, ...] = ("CT",),
    inputs: Mapping[str, str] | None = None,
    envelope: str = "",
) -> Path:
    """Write ``models_dir/<name>/`` with ``model.toml`` (default: the :data:`VOLUME_STATS_MODEL`
    one, with ``envelope``: the lines of its ``[envelope]`` table) and ``<module>.py``; ``files``
    are written beside (e.g. weights). Returns the folder."""
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    if toml is None:
        table = ""
        if inputs:
            pairs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in inputs.items())
            table = f"inputs = {{ {pairs} }}"
        toml = VOLUME_STATS_TOML.format(
            name=name, level=level, modalities=json.dumps(list(modalities)), inputs=table
        )
        if envelope:
            toml = f"{textwrap.dedent(toml)}\n[envelope]\n{textwrap.dedent(envelope)}"
    (folder / "model.toml").write_text(textwrap.dedent(toml).lstrip())
    (folder / f"{module}.py").write_text(textwrap.dedent(source).lstrip())
    for relative, content in (files or {}).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
