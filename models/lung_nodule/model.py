"""Lung nodules in chest CT: MONAI's 3D RetinaNet, false-positive reduction, size and mask.

The pipeline, for a :class:`~dicomnode.imaging.Volume` in HU:

1. **Preprocessing** to the Model Zoo's convention (lung_nodule_ct_detection): the array in
   MONAI's ``[C, x, y, z]`` layout, reoriented to RAS (axes permuted and flipped to the nearest
   of R, A, S, as ``Orientationd(axcodes="RAS")``), resampled to the model's spacing keeping the
   direction (``Spacingd``), HU window -1024..300 scaled to 0..1. The affine from that grid to
   patient LPS mm is kept.
2. **Detection**: ``RetinaNetDetector`` (anchors, box selection, NMS) on the network, whole image
   or sliding window; boxes ``xyzxyz`` in that grid's voxels (centres on integer indices).
3. **False-positive reduction** (demo weights): a small 3D classifier on a 30 mm cube (1.25 mm
   voxels) around each candidate, read from the source HU; the finding's probability is the
   geometric mean of the detector's score and the classifier's.
4. **Measurement** on the source grid: the nodule is segmented inside its box (half-maximum
   threshold between its core and the surrounding lung, at least -750 HU and at most -300 HU,
   grown from the centre, thin vessels cut off by an opening); volume from the voxels, diameter
   as the equivalent sphere's, texture solid (core above -300 HU) or ground glass; its voxels are
   label ``n`` of the ``nodules`` mask for finding ``n``.

A MONAI bundle (the zoo's ResNet-50 RetinaNet) replaces the demo network; its spacing, HU window,
anchors, patch size and box selector come from its inference.json where it states them.

This module is the model class (settings, loading, the steps run in order); step 1 and the
classifier's cubes are in :mod:`.preprocess`, the candidates and step 4 in :mod:`.nodules`, the
networks in :mod:`.network`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from dicomnode.domain import Finding, Findings, MaskRef
from dicomnode.inference import Model

from .growth import compare
from .network import (
    ZOO_ANCHORS,
    ZOO_BOX_SELECTOR,
    PatchClassifier,
    build_detector,
    build_retinanet,
)
from .nodules import Candidate, distinct, measure_nodule
from .preprocess import ZOO_HU_WINDOW, ZOO_SPACING, ModelImage, crop_cubes, to_model_space

MASK_NAME = "nodules"
#: The zoo's patch size (configs/inference.json)
ZOO_ROI = (512, 512, 192)


class LungNoduleModel(Model):
    """Lung nodules in a chest CT series (see the module's docstring)."""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        params = dict(self.params)
        self.network_spec: dict[str, Any] = dict(params.get("network", {}))
        self.anchors: dict[str, Any] = dict(params.get("anchors", ZOO_ANCHORS))
        self.box_selector: dict[str, Any] = {**ZOO_BOX_SELECTOR, **params.get("box_selector", {})}
        self.spacing: tuple[float, ...] = tuple(params.get("spacing", ZOO_SPACING))
        self.hu_window: tuple[float, ...] = tuple(params.get("hu_window", ZOO_HU_WINDOW))
        roi = self.info.inference.roi_size
        self.roi_size: tuple[int, ...] = tuple(roi) if roi else ZOO_ROI
        self.overlap = float(self.info.inference.overlap)
        self.classifier_spec: dict[str, Any] = dict(params.get("classifier", {}))
        self.candidate_threshold = float(params.get("candidate_threshold", 0.05))
        self.max_candidates = int(params.get("max_candidates", 50))
        self.classifier: Any = None
        self.detector: Any = None

    # -- loading -----------------------------------------------------------------------------

    def create_network(self) -> Any:
        """The demo network: the detector and the false-positive classifier in one module."""
        return DemoNetworks(self.network_spec, self.classifier_spec)

    def build_network(self, bundle: Any) -> Any:
        if bundle is None:
            return super().build_network(None)
        self._settings_from_bundle(bundle)
        return bundle.network

    def setup(self) -> None:
        network = self.network
        if isinstance(network, DemoNetworks):
            self.classifier = network.classifier.eval()
            network = network.detector
        self.detector = build_detector(network, self.anchors, self.selector())
        self.detector.eval()

    def selector(self) -> dict[str, Any]:
        """The box selection the detector runs: the configured one, except that boxes below
        ``candidate_threshold``, or past the best ``max_candidates``, are not kept by
        :meth:`detect` anyway, so the detector need not put them through non-maximum
        suppression (which can only remove lower-scored boxes: the kept ones are the same)."""
        selector = dict(self.box_selector)
        selector["score_thresh"] = max(float(selector["score_thresh"]), self.candidate_threshold)
        selector["detections_per_img"] = min(
            int(selector["detections_per_img"]), self.max_candidates
        )
        return selector

    def use_network(self, network: Any, *, classifier: Any = None) -> None:
        """Put a network (a RetinaNet, e.g. the zoo's) in place of the loaded one."""
        self.network = network.eval()
        self.classifier = classifier
        self.detector = build_detector(network, self.anchors, self.selector())
        self.detector.eval()

    def _settings_from_bundle(self, bundle: Any) -> None:
        """Spacing, window, anchors, patch size and box selection from the bundle's config
        (its raw values: nothing there is instantiated); the zoo's values where it is silent."""
        parser = bundle.parser
        config = parser.get("") if hasattr(parser, "get") else {}
        config = config if isinstance(config, Mapping) else {}
        self.spacing, self.hu_window = ZOO_SPACING, ZOO_HU_WINDOW
        self.anchors, self.roi_size = dict(ZOO_ANCHORS), ZOO_ROI
        self.box_selector = dict(ZOO_BOX_SELECTOR)
        anchors = config.get("anchor_generator")
        if isinstance(anchors, Mapping) and "base_anchor_shapes" in anchors:
            self.anchors = {
                "feature_map_scales": list(anchors.get("feature_map_scales", [1, 2, 4])),
                "base_anchor_shapes": [list(s) for s in anchors["base_anchor_shapes"]],
            }
        roi = config.get("infer_patch_size")
        if isinstance(roi, list | tuple) and len(roi) == 3:
            self.roi_size = tuple(int(r) for r in roi)
        preprocessing = config.get("preprocessing")
        transforms = []
        if isinstance(preprocessing, Mapping):
            transforms = preprocessing.get("transforms", [])
        for t in transforms:
            if not isinstance(t, Mapping):
                continue
            target = str(t.get("_target_", ""))
            if target.endswith("Spacingd") and isinstance(t.get("pixdim"), list | tuple):
                self.spacing = tuple(float(v) for v in t["pixdim"])
            if target.endswith("ScaleIntensityRanged") and "a_min" in t and "a_max" in t:
                self.hu_window = (float(t["a_min"]), float(t["a_max"]))
        for op in config.get("detector_ops", []) or []:
            if isinstance(op, str) and "set_box_selector_parameters" in op:
                for key, value in re.findall(r"(\w+)\s*=\s*([0-9.eE+-]+)", op):
                    if key in self.box_selector:
                        self.box_selector[key] = float(value)
        self.classifier = None  # the demo classifier was trained on the demo detector's output

    # -- running -----------------------------------------------------------------------------

    def predict(self, inputs: Any) -> Findings:
        volume = inputs if not isinstance(inputs, Mapping) else inputs[sorted(inputs)[0]]
        threshold = self.threshold("probability", 0.5)
        # probability = sqrt(detector x classifier) <= sqrt(detector): below threshold**2 a
        # candidate cannot pass, and needs no classifying
        floor = threshold**2 if self.classifier is not None else threshold
        found = self.candidates(volume, floor=floor)
        candidates = [c for c in found if c.probability >= threshold]
        return self.to_findings(volume, candidates)

    def predict_with_priors(self, inputs: Any, priors: Sequence[Any]) -> Findings:
        """The nodules now, each with its growth since the most recent prior (matched by centre
        distance; see :mod:`.growth`), when the route gave one."""
        findings = self.predict(inputs)
        if not priors:
            return findings
        return compare(findings, self.predict(priors[0].volume), priors[0])

    def preprocess(self, volume: Any) -> ModelImage:
        return to_model_space(volume.array, volume.geometry.affine, self.spacing, self.hu_window)

    def detect(self, image: ModelImage) -> list[Candidate]:
        """The detector's boxes on a preprocessed image, as candidates in patient space."""
        import torch

        from dicomnode.inference import check_cancelled

        if self.detector is None or self.device is None:
            raise RuntimeError(f"model {self.name!r} used before load()")
        device = self.device.torch
        tensor = torch.from_numpy(image.array)[None].to(device)
        fits = all(s <= r for s, r in zip(image.array.shape, self.roi_size, strict=True))
        if not fits:
            self.detector.set_sliding_window_inferer(
                roi_size=list(self.roi_size), overlap=self.overlap, sw_batch_size=1,
                mode="constant", device=device,
            )  # fmt: skip
        amp = device.type == "cuda" and self.info.inference.amp
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            out = self.detector([tensor], use_inferer=not fits)[0]
        check_cancelled()
        boxes = out["box"].float().cpu().numpy().reshape(-1, 6)
        scores = out["label_scores"].float().cpu().numpy().reshape(-1)
        keep = scores >= self.candidate_threshold
        boxes, scores = boxes[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")[: self.max_candidates]
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        result = []
        for index in order:
            box = boxes[index]
            centre = image.to_patient((box[:3] + box[3:]) / 2)
            size = (box[3:] - box[:3]) * spacing
            result.append(Candidate(centre, size, float(scores[index])))
        return result

    def classify(self, volume: Any, candidates: list[Candidate], source: Any = None) -> None:
        """The false-positive reduction stage: each candidate's classifier score."""
        import torch

        if self.classifier is None or not candidates:
            return
        crops = crop_cubes(
            volume.array if source is None else source,
            volume.geometry.affine, np.array([c.centre_mm for c in candidates]),
        )  # fmt: skip
        with torch.no_grad():
            logits = self.classifier(crops.to(self.device.torch if self.device else "cpu"))
        for candidate, p in zip(candidates, torch.sigmoid(logits).cpu().tolist(), strict=True):
            candidate.classifier_score = float(p)

    def candidates(self, volume: Any, floor: float | None = None) -> list[Candidate]:
        """Every candidate whose detector score is at least ``floor`` (default: the model's
        ``candidate_threshold``), scored; sorted, best first (FROC uses them all)."""
        image = self.preprocess(volume)
        found = self.detect(image)
        if floor is not None:
            found = [c for c in found if c.detector_score >= floor]
        self.classify(volume, found)
        return distinct(sorted(found, key=lambda c: -c.probability))

    def to_findings(self, volume: Any, candidates: Sequence[Candidate]) -> Findings:
        """Measure each candidate on the source grid; findings with the ``nodules`` mask."""
        geometry = volume.geometry
        dtype = np.uint8 if len(candidates) < 255 else np.uint16
        labels = np.zeros(geometry.shape, dtype=dtype) if candidates else None
        findings: list[Finding] = []
        for candidate in candidates:
            measured = measure_nodule(
                volume.array, geometry.affine, candidate.centre_mm, candidate.size_mm
            )
            value = len(findings) + 1
            attributes: dict[str, Any] = {
                "detector_score": round(candidate.detector_score, 4),
                "box_size_mm": [round(float(s), 2) for s in candidate.size_mm],
            }
            if candidate.classifier_score is not None:
                attributes["classifier_score"] = round(candidate.classifier_score, 4)
            if measured is not None:
                assert labels is not None
                region = labels[measured.box]
                region[measured.mask & (region == 0)] = value
                attributes["texture"] = measured.texture
                attributes["core_hu"] = round(measured.core_hu, 1)
                diameter, volume_mm3 = measured.diameter_mm, measured.volume_mm3
            else:  # nothing above the ground-glass threshold: the box's size
                diameter = float(np.mean(candidate.size_mm))
                volume_mm3 = math.pi / 6 * float(np.prod(candidate.size_mm))
            findings.append(
                self.finding(
                    "nodule",
                    candidate.probability,
                    centre_mm=tuple(round(float(v), 3) for v in candidate.centre_mm),
                    diameter_mm=round(float(diameter), 2),
                    volume_mm3=round(float(volume_mm3), 1),
                    mask=MaskRef(MASK_NAME, value) if measured is not None else None,
                    attributes=attributes,
                )
            )
        masks = {MASK_NAME: labels} if labels is not None else {}
        return self.findings(
            findings,
            masks=masks,
            reference=None,
            summary={
                "nodules": len(findings),
                "spacing_mm": list(self.spacing),
                "false_positive_reduction": self.classifier is not None,
            },
        )


class DemoNetworks(nn.Module):
    """The demo detector (``detector.*``) and classifier (``classifier.*``) as one module, so
    that weights/demo.pt is one state dict."""

    def __init__(self, network: Mapping[str, Any], classifier: Mapping[str, Any]) -> None:
        super().__init__()
        self.detector = build_retinanet(network)
        self.classifier = PatchClassifier(tuple(classifier.get("channels", (8, 16, 32))))
