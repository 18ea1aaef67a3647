"""The networks of the lung nodule model, after MONAI's lung_nodule_ct_detection.

The detector is MONAI's 3D RetinaNet (ResNet backbone + FPN on layers 1 and 2, anchor shapes per
level, ``RetinaNetDetector`` box selection and NMS), as in the Model Zoo bundle. The demo network is
the same machinery on a small ResNet (BasicBlock, one block per layer, few channels) so that it
trains and runs on a CPU; the zoo's ResNet-50 network drops into the same pipeline.

The false-positive reduction stage is a small 3D patch classifier on crops around candidates.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: The network of the Model Zoo's lung_nodule_ct_detection (configs/inference.json).
ZOO_NETWORK: dict[str, Any] = {
    "block": "bottleneck",
    "layers": [3, 4, 6, 3],
    "block_inplanes": [64, 128, 256, 512],
    "conv1_t_size": [7, 7, 7],
    "conv1_t_stride": [2, 2, 1],
    "returned_layers": [1, 2],
    "num_anchors": 3,
    "size_divisible": [16, 16, 8],
}
ZOO_ANCHORS: dict[str, Any] = {
    "feature_map_scales": [1, 2, 4],
    "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
}
ZOO_BOX_SELECTOR: dict[str, Any] = {
    "score_thresh": 0.02,
    "topk_candidates_per_level": 1000,
    "nms_thresh": 0.22,
    "detections_per_img": 300,
}


def build_retinanet(spec: Mapping[str, Any]) -> nn.Module:
    """A MONAI 3D RetinaNet from a spec like :data:`ZOO_NETWORK` (one foreground class)."""
    from monai.apps.detection.networks.retinanet_network import (
        RetinaNet,
        resnet_fpn_feature_extractor,
    )
    from monai.networks.nets.resnet import ResNet

    from dicomnode.inference.compat import ensure_detection_without_torchvision

    ensure_detection_without_torchvision()
    backbone = ResNet(
        block=spec["block"],
        layers=list(spec["layers"]),
        block_inplanes=list(spec["block_inplanes"]),
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=tuple(spec["conv1_t_size"]),
        conv1_t_stride=tuple(spec["conv1_t_stride"]),
    )
    returned = list(spec["returned_layers"])
    fpn_channels = spec.get("fpn_channels")
    if fpn_channels is None:  # the zoo: MONAI's extractor, 256 FPN channels
        extractor = resnet_fpn_feature_extractor(backbone, 3, False, returned, None)
    else:  # the same modules (MONAI's BackboneWithFPN) with fewer FPN channels
        from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
        from monai.networks.blocks.feature_pyramid_network import LastLevelMaxPool

        stage2 = backbone.in_planes // 8
        extractor = BackboneWithFPN(
            backbone,
            {f"layer{k}": str(v) for v, k in enumerate(returned)},
            [stage2 * 2 ** (k - 1) for k in returned],
            int(fpn_channels),
            extra_blocks=LastLevelMaxPool(3),
            spatial_dims=3,
        )
    return RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=int(spec["num_anchors"]),
        feature_extractor=extractor,
        size_divisible=list(spec["size_divisible"]),
    )


def build_anchor_generator(spec: Mapping[str, Any]) -> Any:
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

    return AnchorGeneratorWithAnchorShape(
        feature_map_scales=list(spec["feature_map_scales"]),
        base_anchor_shapes=[list(s) for s in spec["base_anchor_shapes"]],
    )


def build_detector(
    network: nn.Module,
    anchors: Mapping[str, Any],
    box_selector: Mapping[str, Any],
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
) -> Any:
    """MONAI's RetinaNetDetector around a network, set up for inference as the zoo sets it."""
    detector = _selecting_detector()(network, build_anchor_generator(anchors), debug=False)
    detector.set_target_keys(box_key="box", label_key="label")
    detector.set_box_selector_parameters(
        score_thresh=float(box_selector["score_thresh"]),
        topk_candidates_per_level=int(box_selector["topk_candidates_per_level"]),
        nms_thresh=float(box_selector["nms_thresh"]),
        detections_per_img=int(box_selector["detections_per_img"]),
    )
    if roi_size is not None:
        detector.set_sliding_window_inferer(
            roi_size=list(roi_size), overlap=overlap, sw_batch_size=1, mode="constant",
            device="cpu",
        )  # fmt: skip
    return detector


@functools.cache
def _selecting_detector() -> type:
    """MONAI's RetinaNetDetector, decoding only the boxes its selector keeps.

    MONAI decodes the box of every anchor (a million on a chest CT), then keeps the best
    ``topk_candidates_per_level`` above ``score_thresh``: 0.05 s of a job on this CPU. Decoding
    is per box, so selecting first gives the same boxes (a test compares the two).
    """
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.data.box_utils import batched_nms, clip_boxes_to_image

    class SelectingRetinaNetDetector(RetinaNetDetector):
        def postprocess_detections(
            self,
            head_outputs_reshape: dict[str, torch.Tensor],
            anchors: list[torch.Tensor],
            image_sizes: list[list[int]],
            num_anchor_locs_per_level: Sequence[int],
            need_sigmoid: bool = True,
        ) -> list[dict[str, torch.Tensor]]:
            per_level = [n * self.num_anchors_per_loc for n in num_anchor_locs_per_level]
            logits = head_outputs_reshape[self.cls_key].split(per_level, dim=1)
            regression = head_outputs_reshape[self.box_reg_key].split(per_level, dim=1)
            selector, dtype = self.box_selector, head_outputs_reshape[self.cls_key].dtype
            detections = []
            for index, (image_anchors, size) in enumerate(zip(anchors, image_sizes, strict=True)):
                boxes, scores, labels = [], [], []
                for level_logits, level_regression, level_anchors in zip(
                    logits, regression, image_anchors.split(per_level), strict=True
                ):
                    chosen, level_scores, level_labels = selector.select_top_score_idx_per_level(
                        level_logits[index]
                    )
                    decoded = self.box_coder.decode_single(
                        level_regression[index][chosen].to(torch.float32), level_anchors[chosen]
                    ).to(dtype)
                    clipped, keep = clip_boxes_to_image(decoded, size, remove_empty=True)
                    assert isinstance(clipped, torch.Tensor)  # a tensor in, a tensor out
                    boxes.append(clipped)
                    scores.append(level_scores[keep])
                    labels.append(level_labels[keep])
                all_boxes, all_scores = torch.cat(boxes), torch.cat(scores)
                all_labels = torch.cat(labels)
                kept = batched_nms(
                    all_boxes, all_scores, all_labels, selector.nms_thresh,
                    box_overlap_metric=selector.box_overlap_metric,
                    max_proposals=selector.detections_per_img,
                )  # fmt: skip
                detections.append({
                    self.target_box_key: all_boxes[kept],
                    self.pred_score_key: all_scores[kept].to(dtype),
                    self.target_label_key: all_labels[kept],
                })  # fmt: skip
            return detections

    return SelectingRetinaNetDetector


class PatchClassifier(nn.Module):
    """False-positive reduction: nodule or not, from a small cube around a candidate.

    Input ``[B, 2, D, D, D]`` in the detector's image layout: channel 0 the lung window (the
    detector's 0..1 intensity), channel 1 a soft-tissue window that separates solid from fat and
    vessel walls. Output: one logit per crop.
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32), in_channels: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv3d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
                nn.Conv3d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool3d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(previous, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)
