"""The retina grader: one MONAI 2D classifier backbone, two heads (multi-task, as published
EfficientNet diabetic retinopathy graders do).

- **grade**: 5 logits, the international clinical DR scale (ICDR) 0..4;
- **lesions**: one logit per lesion type (multi-label), fundus and OCT types side by side.

The demo backbone is a small MONAI ResNet (BasicBlock, one block per stage, 16..128 channels):
on this project's shared 2-core CPU it trains three times faster than the smallest useful MONAI
EfficientNet, which the same class builds with ``backbone = "efficientnet"`` (B0's blocks,
``width``/``depth`` coefficients; 1 and 1 is EfficientNet-B0) for a site that trains on real data.
:meth:`RetinaGrader.features` returns the last convolution's feature map (before pooling), which
is what Grad-CAM weighs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: EfficientNet-B0's MBConv blocks (MONAI's / the paper's notation)
B0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)


class RetinaGrader(nn.Module):
    """A MONAI backbone's last feature map -> global average pool -> grade and lesion heads.

    ``spec["backbone"]``: ``"resnet"`` (MONAI ResNet; ``block``, ``layers``, ``block_inplanes``)
    or ``"efficientnet"`` (MONAI EfficientNet with B0's blocks; ``width``, ``depth``,
    ``image_size``).
    """

    def __init__(self, spec: Mapping[str, Any], lesions: int) -> None:
        super().__init__()
        kind = spec.get("backbone", "resnet")
        if kind == "resnet":
            from monai.networks.nets import ResNet

            backbone: nn.Module = ResNet(
                block=spec.get("block", "basic"),
                layers=list(spec.get("layers", (1, 1, 1, 1))),
                block_inplanes=list(spec.get("block_inplanes", (16, 32, 64, 128))),
                spatial_dims=2,
                n_input_channels=3,
                num_classes=1,
            )
            width = _drop_classifier(backbone, "fc")
        elif kind == "efficientnet":
            from monai.networks.nets import EfficientNet

            backbone = EfficientNet(
                list(B0_BLOCKS),
                spatial_dims=2,
                in_channels=3,
                num_classes=1,
                width_coefficient=float(spec.get("width", 1.0)),
                depth_coefficient=float(spec.get("depth", 1.0)),
                dropout_rate=0.0,
                image_size=int(spec.get("image_size", 224)),
                drop_connect_rate=float(spec.get("drop_connect", 0.1)),
            )
            width = _drop_classifier(backbone, "_fc")
        else:
            raise ValueError(f"network.backbone must be 'resnet' or 'efficientnet', not {kind!r}")
        self.kind = kind
        self.backbone = backbone
        self.dropout = nn.Dropout(float(spec.get("dropout", 0.2)))
        self.grade = nn.Linear(width, 5)
        self.lesions = nn.Linear(width, lesions)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> the last convolution's activations ``[B, C, H/32, W/32]``."""
        b: Any = self.backbone
        if self.kind == "resnet":
            x = b.act(b.bn1(b.conv1(x)))
            if not b.no_max_pool:
                x = b.maxpool(x)
            return b.layer4(b.layer3(b.layer2(b.layer1(x))))
        x = b._swish(b._bn0(b._conv_stem(b._conv_stem_padding(x))))
        x = b._blocks(x)
        return b._swish(b._bn1(b._conv_head(b._conv_head_padding(x))))

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.dropout(features.mean(dim=(2, 3)))
        return self.grade(pooled), self.lesions(pooled)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grade logits ``[B, 5]`` and lesion logits ``[B, lesions]``."""
        return self.heads(self.features(x))


def expected_grade(grade_logits: torch.Tensor) -> torch.Tensor:
    """The grade's expectation under the softmax, ``[B]`` (0..4): the ordinal score."""
    probabilities = grade_logits.softmax(-1)
    return probabilities @ torch.arange(5, dtype=probabilities.dtype, device=probabilities.device)


def grad_cam(
    network: RetinaGrader, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grade logits, lesion logits and the Grad-CAM map of each image, ``[B, h, w]`` >= 0.

    The target is the expected grade (what makes an image look more diseased), so the map shows
    the evidence for the grade whatever grade wins; the images of a batch are independent (the
    network is in eval mode), so one backward pass serves them all.
    """
    with torch.no_grad():  # the gradient is taken at the features: no graph below them
        features = network.features(x)
    with torch.enable_grad():
        features = features.detach().requires_grad_(True)
        grade_logits, lesion_logits = network.heads(features)
        score = expected_grade(grade_logits).sum()
        (gradients,) = torch.autograd.grad(score, features)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1))
    return grade_logits.detach(), lesion_logits.detach(), cam.detach()


def _drop_classifier(backbone: nn.Module, name: str) -> int:
    """Replace the backbone's classifier, its linear layer ``name``, by identity (the grader's
    heads take its place); the classifier's input width."""
    classifier = getattr(backbone, name)
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"{type(backbone).__name__}.{name} is not a linear layer: {classifier!r}")
    setattr(backbone, name, nn.Identity())
    return classifier.in_features
