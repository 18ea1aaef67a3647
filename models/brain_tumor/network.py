"""The network of the brain tumor model: MONAI's SegResNet, after brats_mri_segmentation.

The Model Zoo bundle (configs/inference.json) builds ``SegResNet(blocks_down=[1, 2, 2, 4],
blocks_up=[1, 1, 1], init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2)``: input
channels T1c, T1, T2, FLAIR; output channels (sigmoid) tumor core, whole tumor, enhancing tumor;
spatial sizes multiples of 8. The demo network is the same class with fewer filters, so the
module names (``convInit``, ``down_layers``, ``up_layers``, ``conv_final``...) are the zoo's and
the zoo's weights load into the zoo's network through the same pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

#: The network of the Model Zoo's brats_mri_segmentation (configs/inference.json).
ZOO_NETWORK: dict[str, Any] = {
    "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1],
    "init_filters": 16,
    "in_channels": 4,
    "out_channels": 3,
    "dropout_prob": 0.2,
}
#: The zoo's input channels (metadata.json network_data_format) and output channels.
ZOO_CHANNELS = ("T1c", "T1", "T2", "FLAIR")
ZOO_OUTPUTS = ("tumor_core", "whole_tumor", "enhancing_tumor")
#: The zoo's sliding window (x, y, z voxels at 1 mm) and its working spacing.
ZOO_ROI = (240, 240, 160)
ZOO_SPACING = 1.0


def build_segresnet(spec: Mapping[str, Any]) -> nn.Module:
    """A MONAI SegResNet from a spec like :data:`ZOO_NETWORK` (3D)."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=3,
        init_filters=int(spec["init_filters"]),
        in_channels=int(spec.get("in_channels", 4)),
        out_channels=int(spec.get("out_channels", 3)),
        dropout_prob=spec.get("dropout_prob"),
        blocks_down=tuple(int(b) for b in spec["blocks_down"]),
        blocks_up=tuple(int(b) for b in spec["blocks_up"]),
    )
