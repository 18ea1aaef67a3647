"""The Model Zoo's lung RetinaNet builds and runs here without torchvision, with the zoo's names."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.inference.compat import (  # noqa: E402
    ensure_detection_without_torchvision,
    torchvision_available,
    validate_trainable_layers,
)


def _zoo_network():  # type: ignore[no-untyped-def]
    """The network of lung_nodule_ct_detection's configs/inference.json, argument for argument."""
    from monai.apps.detection.networks.retinanet_network import (
        RetinaNet,
        resnet_fpn_feature_extractor,
    )
    from monai.networks.nets.resnet import resnet50

    ensure_detection_without_torchvision()
    backbone = resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1],
                        conv1_t_size=[7, 7, 7])  # fmt: skip
    extractor = resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None)
    return RetinaNet(spatial_dims=3, num_classes=1, num_anchors=3,
                     feature_extractor=extractor, size_divisible=[16, 16, 8])  # fmt: skip


@pytest.mark.slow
def test_zoo_retinanet_has_the_zoo_parameter_names_and_runs() -> None:
    assert not torchvision_available()  # the CPU machine this suite targets
    network = _zoo_network().eval()
    names = list(network.state_dict())
    assert "feature_extractor.body.conv1.weight" in names
    assert "feature_extractor.body.layer2.0.conv1.weight" in names
    assert not any(name.startswith("feature_extractor.body.layer3") for name in names)
    assert "feature_extractor.fpn.inner_blocks.0.weight" in names
    assert "feature_extractor.fpn.layer_blocks.1.bias" in names
    assert len(names) == 190
    assert any(name.startswith("classification_head.") for name in names)
    assert any(name.startswith("regression_head.") for name in names)
    # A state dict saved from this structure loads back strictly, as a zoo model.pt would.
    clone = _zoo_network()
    clone.load_state_dict(network.state_dict(), strict=True)
    with torch.no_grad():
        out = network(torch.zeros(1, 1, 64, 64, 32))
    assert set(out) == {"classification", "box_regression"}


def test_trainable_layers_follow_torchvision() -> None:
    with pytest.warns(UserWarning):
        assert validate_trainable_layers(False, 3, 5, 3) == 5
    assert validate_trainable_layers(True, None, 5, 3) == 3
    with pytest.raises(ValueError, match=r"7 is not in 0\.\.5"):
        validate_trainable_layers(True, 7, 5, 3)
