"""MONAI bundles in the Model Zoo layout: loaded with ConfigParser, run through the sliding
window; a model package that takes a bundle's network; determinism; cancellation."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.errors import BundleInvalid, InferenceCancelled  # noqa: E402
from dicomnode.inference import (  # noqa: E402
    CPU,
    ModelRegistry,
    cancellable,
    load_bundle,
    sliding_window,
)
from dicomnode.testing.bundles import (  # noqa: E402
    TINY_BASICUNET,
    ZOO_LUNG_RETINANET,
    write_bundle,
    write_model_package,
)

#: A segmentation package: its own tiny network, or the bundle's when the config names one.
SEGMENTER = """
import numpy as np

from dicomnode.inference import Model


class Segmenter(Model):
    def create_network(self):
        from monai.networks.nets import SegResNet

        return SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8,
                         blocks_down=[1, 1], blocks_up=[1])

    def predict(self, inputs):
        image = np.clip((inputs.array + 1024.0) / 1324.0, 0, 1)
        logits = self.infer(image)[0]
        labels = logits.argmax(0).numpy().astype(np.uint8)
        return self.findings(masks={"labels": labels},
                             summary={"foreground": int(labels.sum()),
                                      "checksum": float(logits.double().sum())})
"""

SEGMENTER_TOML = """
name = "segmenter"
version = "0.3.0"
entry = "model:Segmenter"
demo = true

[inference]
roi_size = [16, 32, 32]
overlap = 0.0
mode = "constant"
"""


def test_zoo_layout_bundle_loads_and_runs_through_the_sliding_window(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "bundle", name="tiny_seg", version="0.1.2")
    bundle = load_bundle(root, "cpu")
    assert type(bundle.network).__name__ == "SegResNet" and not bundle.network.training
    assert (bundle.name, bundle.version) == ("tiny_seg", "0.1.2")
    assert bundle.get("inferer").roi_size == [32, 32, 32]  # the rest of the config is there
    assert bundle.get("no such key", 5) == 5
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    loaded = bundle.network.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)

    image = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    out = sliding_window(bundle.network, image, roi_size=(24, 24, 24), overlap=0.25, device=CPU)
    assert out.shape == (1, 2, 32, 32, 32) and out.dtype == torch.float32
    again = sliding_window(bundle.network, image, roi_size=(24, 24, 24), overlap=0.25)
    assert torch.equal(out, again)  # deterministic
    whole = sliding_window(bundle.network, image[0, 0].numpy(), roi_size=None, spatial_dims=3)
    assert whole.shape == (1, 2, 32, 32, 32)


def test_nested_checkpoint_and_another_network(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "unet", TINY_BASICUNET, checkpoint_key="model")
    bundle = load_bundle(root)
    assert type(bundle.network).__name__ == "BasicUNet"
    out = sliding_window(bundle.network, np.zeros((40, 24, 32), np.float32), roi_size=(32, 32, 32))
    assert out.shape == (1, 2, 40, 24, 32)  # an image smaller than a window is padded


def test_weights_that_do_not_fit_the_network(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "bundle")
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["network_def"]["out_channels"] = 3
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleInvalid, match=r"model\.pt does not fit 'network_def' \(SegResNet\)"):
        load_bundle(root)


def test_network_def_that_cannot_be_built(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "bundle")
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["network_def"]["_target_"] = "NoSuchNetwork"
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleInvalid, match="'network_def' could not be instantiated"):
        load_bundle(root)
    del config["network_def"]
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleInvalid, match="has no 'network_def'"):
        load_bundle(root)


def _volume(array: np.ndarray):  # type: ignore[no-untyped-def]
    from dicomnode.imaging import FrameRef, Geometry, Volume

    frames = tuple(FrameRef(f"1.2.{k}", "1.2.840.10008.5.1.4.1.1.2", None, "") for k in range(32))
    geometry = Geometry(np.diag([0.7, 0.7, 1.25, 1.0]), array.shape)
    return Volume(array.astype(np.float32), geometry, frames, "CT", "1.2.3")


def test_a_package_swaps_its_demo_network_for_the_bundles(tmp_path: Path) -> None:
    pytest.importorskip("dicomnode.imaging")
    models = tmp_path / "models"
    write_model_package(models, "segmenter", source=SEGMENTER, toml=SEGMENTER_TOML)
    rng = np.random.default_rng(1)
    ct = _volume(rng.normal(0, 300, (32, 32, 32)))

    demo = ModelRegistry([models]).load("segmenter")
    assert demo.bundle is None and demo.demo
    demo_findings = demo.predict(ct)
    assert demo_findings.demo and demo_findings.version == "0.3.0"

    root = write_bundle(tmp_path / "bundle", name="seg_bundle", version="1.0.0", seed=5)
    with_bundle = ModelRegistry([models], {"segmenter": root}).load("segmenter")
    assert with_bundle.network is with_bundle.bundle.network
    findings = with_bundle.predict(ct)
    assert not findings.demo and findings.version == "0.3.0+bundle.seg_bundle.1.0.0"
    assert findings.masks["labels"].shape == (32, 32, 32)
    assert findings.summary["checksum"] != demo_findings.summary["checksum"]
    # the same input through the same pipeline gives the same result
    assert with_bundle.predict(ct).summary == findings.summary


def test_cancelled_run_stops_between_windows() -> None:
    calls = []

    def network(x):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            event.set()
        return x

    event = threading.Event()
    with cancellable(event), pytest.raises(InferenceCancelled):
        sliding_window(network, torch.zeros(1, 1, 32, 32, 32), roi_size=(16, 16, 16), overlap=0)
    assert len(calls) == 2  # of 8 windows


@pytest.mark.slow
def test_the_zoo_lung_retinanet_loads_from_a_bundle(tmp_path: Path) -> None:
    """The Model Zoo's lung_nodule_ct_detection network (ResNet-50 RetinaNet), from a bundle
    directory with its config's expressions, here without torchvision."""
    root = write_bundle(tmp_path / "lung", extra_config=ZOO_LUNG_RETINANET, name="lung_zoo")
    bundle = load_bundle(root)
    assert type(bundle.network).__name__ == "RetinaNet"
    assert sum(p.numel() for p in bundle.network.parameters()) > 20_000_000
    with torch.no_grad():
        out = bundle.network(torch.zeros(1, 1, 64, 64, 32))
    assert set(out) == {"classification", "box_regression"}
