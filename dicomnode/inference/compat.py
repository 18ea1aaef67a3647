"""MONAI's detection networks without torchvision.

MONAI builds the RetinaNet feature extractor (``resnet_fpn_feature_extractor`` ->
``BackboneWithFPN``) with two small torchvision helpers, imported lazily: the intermediate layer
getter and the trainable-layers check; its detector's training also names two torchvision classes
in ``isinstance`` checks. Where torchvision cannot be imported (its wheels are CUDA
builds; the CPU torch cannot load them), :func:`ensure_detection_without_torchvision` gives MONAI
equivalents of those two, so MONAI's own classes build the very same modules, with the same
names: a Model Zoo ``model.pt`` loads unchanged. Where torchvision works, nothing is touched.
"""

from __future__ import annotations

import importlib
import warnings
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

_done = False


def torchvision_available() -> bool:
    try:
        importlib.import_module("torchvision.models")
    except Exception:  # ImportError, or OSError from a CUDA-only build's _C.so
        return False
    return True


def ensure_detection_without_torchvision() -> bool:
    """Make MONAI's RetinaNet feature extractor buildable; True when a stand-in was installed."""
    global _done
    if _done or torchvision_available():
        return False
    from monai.apps.detection.networks import retinanet_detector, retinanet_network
    from monai.networks.blocks import backbone_fpn_utils

    backbone_fpn_utils.torchvision_models = SimpleNamespace(
        _utils=SimpleNamespace(IntermediateLayerGetter=_intermediate_layer_getter())
    )
    retinanet_network._validate_trainable_layers = validate_trainable_layers
    # Training checks isinstance(matcher, torchvision's Matcher) before MONAI's own ATSS matcher
    # and hard negative sampler; classes nothing is an instance of let those checks pass.
    for name in ("Matcher", "BalancedPositiveNegativeSampler"):
        if not isinstance(getattr(retinanet_detector, name, None), type):
            setattr(retinanet_detector, name, type(name, (), {}))
    _done = True
    return True


def _intermediate_layer_getter() -> type:
    from torch import nn

    class IntermediateLayerGetter(nn.ModuleDict):
        """The backbone's children up to the last returned layer, run in order; returns the
        named layers' outputs. Being a ModuleDict of the same children, it keeps the backbone's
        parameter names (``body.conv1.weight``, ``body.layer1.0...``)."""

        def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
            names = {name for name, _ in model.named_children()}
            missing = set(return_layers) - names
            if missing:
                raise ValueError(f"return_layers {sorted(missing)} are not layers of the model "
                                 f"(it has {sorted(names)})")  # fmt: skip
            wanted = dict(return_layers)
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for name, module in model.named_children():
                layers[name] = module
                wanted.pop(name, None)
                if not wanted:
                    break
            super().__init__(layers)
            self.return_layers = dict(return_layers)

        def forward(self, x: Any) -> OrderedDict[str, Any]:
            out: OrderedDict[str, Any] = OrderedDict()
            for name, module in self.items():
                x = module(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out

    return IntermediateLayerGetter


def validate_trainable_layers(
    is_trained: bool, trainable_backbone_layers: int | None, max_value: int, default_value: int
) -> int:
    """How many backbone layers train: all of them for an untrained backbone."""
    if not is_trained:
        if trainable_backbone_layers is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if neither pretrained nor "
                f"pretrained_backbone is set; setting it to {max_value}",
                stacklevel=2,
            )
        trainable_backbone_layers = max_value
    if trainable_backbone_layers is None:
        trainable_backbone_layers = default_value
    if not 0 <= trainable_backbone_layers <= max_value:
        raise ValueError(
            f"trainable_backbone_layers {trainable_backbone_layers} is not in 0..{max_value}"
        )
    return trainable_backbone_layers
