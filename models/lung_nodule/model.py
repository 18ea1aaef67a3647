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
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from dicomnode.domain import Findings, MaskRef
from dicomnode.inference import Model
from dicomnode.inference.regions import bounding_box

from .network import (
    ZOO_ANCHORS,
    ZOO_BOX_SELECTOR,
    PatchClassifier,
    build_detector,
    build_retinanet,
)

MASK_NAME = "nodules"
#: The zoo's preprocessing (configs/inference.json)
ZOO_SPACING = (0.703125, 0.703125, 1.25)
ZOO_HU_WINDOW = (-1024.0, 300.0)
ZOO_ROI = (512, 512, 192)
#: LPS (DICOM) <-> RAS (MONAI) on patient coordinates
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class ModelImage:
    """The network's input grid: ``array`` [x, y, z] float32 0..1; ``affine`` maps its voxel
    indices (x, y, z, 1) to patient LPS mm (the zoo's RAS affine, in LPS)."""

    array: np.ndarray
    affine: np.ndarray

    def to_patient(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, float) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_voxel(self, lps: np.ndarray) -> np.ndarray:
        points = np.asarray(lps, float) - self.affine[:3, 3]
        return np.linalg.solve(self.affine[:3, :3], points.T).T


def ras_axes(affine: np.ndarray) -> tuple[list[int], list[bool]]:
    """For each of R, A, S: which voxel axis (0=i column, 1=j row, 2=k slice) runs closest to
    it, and whether that axis runs against it (nibabel's io_orientation, as MONAI uses)."""
    ras = LPS_TO_RAS @ affine[:3, :3]
    ras = ras / np.linalg.norm(ras, axis=0)
    order: list[int] = [-1, -1, -1]
    flips: list[bool] = [False, False, False]
    used: set[int] = set()
    weights = np.abs(ras)  # [world axis, voxel axis]
    for _ in range(3):
        masked = weights.copy()
        for o in range(3):
            if order[o] >= 0:
                masked[o, :] = -1
        for v in used:
            masked[:, v] = -1
        o, v = np.unravel_index(int(np.argmax(masked)), masked.shape)
        order[o] = int(v)
        flips[o] = bool(ras[o, v] < 0)
        used.add(int(v))
    return order, flips


def _positions(n: int, step: float, reverse: bool) -> np.ndarray:
    """Sample positions 0, step, 2*step, ... voxels along an axis of ``n`` (counted from the
    axis' end, which also flips it, when ``reverse``)."""
    count = math.floor((n - 1) / step + 1e-6) + 1
    pos = np.arange(count, dtype=np.float64) * step
    return (n - 1) - pos if reverse else pos


def _whole_voxel_slice(pos: np.ndarray) -> slice | None:
    """``pos`` as a slice when it is an evenly stepped run of whole voxels (a view, no copy)."""
    step = pos[1] - pos[0] if len(pos) > 1 else 1.0
    if not np.all(pos == np.round(pos)) or step != round(step) or step == 0:
        return None
    if len(pos) > 1 and not np.all(np.diff(pos) == step):
        return None
    first, step = int(pos[0]), int(step)
    stop = first + step * len(pos)
    return slice(first, stop if stop >= 0 else None, step)


def _sample_axis(t: Any, axis: int, pos: np.ndarray) -> Any:
    """Linear interpolation of one axis at ``pos``."""
    import torch

    n = t.shape[axis]
    lo = np.clip(np.floor(pos), 0, n - 1).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * t.dim()
    shape[axis] = len(pos)
    w = torch.from_numpy((pos - lo).astype(np.float32)).view(shape)
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    return torch.lerp(t.index_select(axis, lo_t), t.index_select(axis, hi_t), w)


def _sample_plane(t: Any, axes: tuple[int, int], pos: tuple[np.ndarray, np.ndarray]) -> Any:
    """Bilinear interpolation of two axes at once: ``grid_sample`` over the planes along the
    third axis, each plane its own batch item of one channel, all sharing one small grid.
    (The planes as channels of one item give the same values 5 times slower: each output
    pixel then strides across every plane.)"""
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

    (a, b), (pa, pb) = axes, pos
    other = 3 - a - b
    planes = t.permute(other, a, b)[:, None]
    ga = torch.from_numpy(pa * (2.0 / max(t.shape[a] - 1, 1)) - 1.0).float()
    gb = torch.from_numpy(pb * (2.0 / max(t.shape[b] - 1, 1)) - 1.0).float()
    rows, columns = torch.meshgrid(ga, gb, indexing="ij")
    grid = torch.stack((columns, rows), dim=-1)[None]  # grid_sample's (x, y) = (b, a)
    grid = grid.expand(planes.shape[0], -1, -1, -1)
    out = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inverse = np.argsort([other, a, b])
    return out[:, 0].permute(*[int(v) for v in inverse])


def to_model_space(
    array_hu: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    hu_window: Sequence[float] = ZOO_HU_WINDOW,
) -> ModelImage:
    """A volume ``[k, j, i]`` in HU with its voxel->LPS affine, as the network sees it."""
    import torch

    order, flips = ras_axes(affine)
    shape_xyz = [array_hu.shape[2 - v] for v in order]
    # affine of the reoriented grid: index a_o -> voxel axis order[o] (flipped: n - 1 - a_o)
    to_voxel = np.zeros((4, 4))
    to_voxel[3, 3] = 1
    for o, v in enumerate(order):
        if flips[o]:
            to_voxel[v, o] = -1.0
            to_voxel[v, 3] = shape_xyz[o] - 1
        else:
            to_voxel[v, o] = 1.0
    oriented = affine @ to_voxel
    in_spacing = np.linalg.norm(oriented[:3, :3], axis=0)
    steps = [float(spacing[o]) / float(in_spacing[o]) for o in range(3)]
    # Sample in the array's own layout (voxel axis v is array axis 2 - v); a flipped axis is
    # sampled from its end. Whole-voxel steps (every second slice) are strided views, two
    # fractional axes one bilinear pass, a third a linear pass; then reorient the small result.
    # The window (scale, then clamp) applies to the resampled values.
    positions = {2 - order[o]: _positions(shape_xyz[o], steps[o], flips[o]) for o in range(3)}
    view = [slice(None)] * 3
    fractional = []
    for axis, pos in positions.items():
        whole = _whole_voxel_slice(pos)
        if whole is not None and whole.step > 0:
            view[axis] = whole
        else:
            fractional.append(axis)
    t = torch.from_numpy(np.asarray(array_hu, dtype=np.float32))[tuple(view)]
    # the two axes that shrink the most go first, in one bilinear pass
    fractional.sort(key=lambda axis: len(positions[axis]) / array_hu.shape[axis])
    fractional_sampled = bool(fractional)
    if len(fractional) >= 2:
        first, second = sorted(fractional[:2])
        t = _sample_plane(t, (first, second), (positions[first], positions[second]))
        fractional = fractional[2:]
    for axis in fractional:
        t = _sample_axis(t, axis, positions[axis])
    if not fractional_sampled:  # t may still be a view of the caller's array
        t = t.clone()
    lo, hi = float(hu_window[0]), float(hu_window[1])
    t.sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
    t = t.permute(*[2 - v for v in order])
    scale = np.eye(4)
    scale[:3, :3] = np.diag(steps)
    return ModelImage(np.ascontiguousarray(t.numpy(), dtype=np.float32), oriented @ scale)


# ---------------------------------------------------------------------------------------------
# Candidate crops for the false-positive reduction stage

CROP = 24  # voxels per side
CROP_MM = 1.25  # isotropic: a 30 mm cube


def crop_cubes(
    array_hu: Any,
    affine: np.ndarray,
    centres_lps: np.ndarray,
    size: int = CROP,
    mm: float = CROP_MM,
) -> Any:
    """``[N, 2, size, size, size]`` cubes of ``mm`` voxels around patient points, read from the
    source HU (trilinear, axes along L, P, S): a lung window and a soft-tissue window."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    centres = np.asarray(centres_lps, float).reshape(-1, 3)
    if len(centres) == 0:
        return torch.zeros((0, 2, size, size, size))
    source = (
        array_hu
        if isinstance(array_hu, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(array_hu, dtype=np.float32))
    )
    nk, nj, ni = source.shape
    offsets = (np.arange(size) - (size - 1) / 2) * mm
    # patient grid [z, y, x] of the cube, LPS
    gz, gy, gx = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    local = np.stack([gx, gy, gz], -1).reshape(-1, 3)
    inverse = np.linalg.inv(affine)
    crops = []
    for centre in centres:
        ijk = (local + centre) @ inverse[:3, :3].T + inverse[:3, 3]
        norm = np.stack(
            [2 * ijk[:, 0] / max(ni - 1, 1) - 1, 2 * ijk[:, 1] / max(nj - 1, 1) - 1,
             2 * ijk[:, 2] / max(nk - 1, 1) - 1], -1,
        )  # fmt: skip
        # only the slab of the source that the cube touches
        k0 = max(int(np.floor(ijk[:, 2].min())), 0)
        k1 = min(int(np.ceil(ijk[:, 2].max())) + 1, nk)
        if k1 <= k0:
            crops.append(torch.full((size, size, size), -1024.0))
            continue
        slab = source[k0:k1]
        if k1 - k0 == 1:
            slab = torch.cat([slab, slab])
        norm[:, 2] = 2 * (ijk[:, 2] - k0) / max(slab.shape[0] - 1, 1) - 1
        grid = torch.from_numpy(norm.astype(np.float32)).view(1, size, size, size, 3)
        out = F.grid_sample(
            slab[None, None].float(), grid, mode="bilinear", padding_mode="border",
            align_corners=True,
        )  # fmt: skip
        crops.append(out[0, 0])
    hu = torch.stack(crops)
    lung = ((hu + 1024.0) / 1324.0).clamp(0, 1)
    soft = ((hu + 160.0) / 400.0).clamp(0, 1)
    return torch.stack([lung, soft], 1)


# ---------------------------------------------------------------------------------------------
# Measurement: a nodule's voxels on the source grid


def _image(mask: np.ndarray) -> Any:
    import SimpleITK as sitk  # noqa: N813

    return sitk.GetImageFromArray(mask.astype(np.uint8))


def _array(image: Any) -> np.ndarray:
    import SimpleITK as sitk  # noqa: N813

    return sitk.GetArrayFromImage(image).astype(bool)


def _morph(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Binary erosion or dilation by a ball of ``radius`` voxels."""
    import SimpleITK as sitk  # noqa: N813

    f = sitk.BinaryErodeImageFilter() if erode else sitk.BinaryDilateImageFilter()
    f.SetKernelType(sitk.sitkBall)
    f.SetKernelRadius(int(radius))
    f.SetForegroundValue(1)
    if erode:
        f.SetBoundaryToForeground(False)
    return _array(f.Execute(_image(mask)))


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Voxels of ``allowed`` connected (26-neighbourhood) to ``seed``."""
    import SimpleITK as sitk  # noqa: N813

    start = seed & allowed
    if not start.any():
        return start
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(_image(allowed), True))
    ids = np.unique(labels[start])
    return np.isin(labels, ids[ids > 0])


def _open_by_reconstruction(region: np.ndarray, seed: np.ndarray, steps: int) -> np.ndarray:
    """``region`` opened by a ball of ``steps`` voxels, then grown back within itself from
    ``seed``: what a thin vessel joined to the nodule leaves out. Computed on the region's own
    box plus one voxel (all outside it is background either way, so the result is the same),
    a few times smaller than the measuring box."""
    inner = bounding_box(region, margin=1)
    assert inner is not None
    kept = _grow(seed[inner], _morph(region[inner], steps, erode=True))
    if not kept.any():
        return region
    opened = np.zeros_like(region)
    opened[inner] = _morph(kept, steps, erode=False) & region[inner]
    return opened


@dataclass
class Measurement:
    volume_mm3: float
    diameter_mm: float
    texture: str
    core_hu: float
    box: tuple[slice, slice, slice]  # where ``mask`` sits in the source array
    mask: np.ndarray  # bool, the box's shape


def measure_nodule(
    array_hu: np.ndarray,
    affine: np.ndarray,
    centre_lps: np.ndarray,
    size_mm: np.ndarray,
    solid_hu: float = -300.0,
    ground_glass_hu: float = -750.0,
) -> Measurement | None:
    """Segment one nodule around ``centre_lps`` (its detected box ``size_mm`` along L, P, S)."""
    inverse = np.linalg.inv(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)  # (i, j, k)
    centre = centre_lps @ inverse[:3, :3].T + inverse[:3, 3]
    radius_mm = float(np.clip(np.max(size_mm) * 0.75 + 3.0, 4.0, 40.0))
    half = np.ceil(radius_mm / spacing).astype(int)
    shape_ijk = np.array(array_hu.shape[::-1])
    c = np.rint(centre).astype(int)
    lo = np.clip(c - half, 0, shape_ijk - 1)
    hi = np.clip(c + half + 1, 1, shape_ijk)
    if np.any(hi <= lo):
        return None
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    hu = np.asarray(array_hu[box], dtype=np.float32)
    # distances (mm) from the centre, in patient space (any orientation)
    kk, jj, ii = np.meshgrid(*[np.arange(lo[a], hi[a]) - centre[a] for a in (2, 1, 0)],
                             indexing="ij", sparse=True)  # fmt: skip
    m = affine[:3, :3]
    dist = np.sqrt(sum((m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * kk) ** 2 for r in range(3)))
    core_r = max(float(np.min(size_mm)) * 0.2, float(spacing.max()) * 0.75, 1.0)
    core_voxels = hu[dist <= core_r]
    if core_voxels.size == 0:
        return None
    core = float(np.median(core_voxels))
    shell = hu[(dist > radius_mm * 0.8) & (dist <= radius_mm)]
    background = float(np.quantile(shell, 0.25)) if shell.size else -850.0
    texture = "solid" if core > solid_hu else "ground_glass"
    threshold = float(np.clip((core + min(background, -600.0)) / 2, ground_glass_hu, solid_hu))
    if core <= ground_glass_hu:
        return None
    limit_mm = min(radius_mm, 0.6 * float(np.max(size_mm)) + float(spacing.max()))
    inside = (hu > threshold) & (dist <= limit_mm)
    seed = dist <= max(core_r * 0.5, float(spacing.max()) * 0.6)
    if not (seed & inside).any():
        seed = dist <= core_r
    region = _grow(seed, inside)
    # cut vessels off: an opening by reconstruction, its size a third of the nodule's radius
    steps = int(0.3 * float(np.min(size_mm)) / 2 / float(spacing.max()))
    if steps >= 1 and region.any():
        region = _open_by_reconstruction(region, seed, steps)
    voxels = int(region.sum())
    if voxels == 0:
        return None
    volume = voxels * float(abs(np.linalg.det(affine[:3, :3])))
    diameter = (6.0 * volume / math.pi) ** (1.0 / 3.0)
    return Measurement(volume, diameter, texture, core, box, region)


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Candidate:
    """One detection, before the probability threshold."""

    centre_mm: np.ndarray  # LPS
    size_mm: np.ndarray  # box extent along the model grid's axes (R, A, S), mm
    detector_score: float
    classifier_score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def probability(self) -> float:
        if self.classifier_score is None:
            return self.detector_score
        return math.sqrt(self.detector_score * self.classifier_score)


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
        return _distinct(sorted(found, key=lambda c: -c.probability))

    def to_findings(self, volume: Any, candidates: Sequence[Candidate]) -> Findings:
        """Measure each candidate on the source grid; findings with the ``nodules`` mask."""
        geometry = volume.geometry
        dtype = np.uint8 if len(candidates) < 255 else np.uint16
        labels = np.zeros(geometry.shape, dtype=dtype) if candidates else None
        findings = []
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


def _distinct(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Best first, without candidates that overlap a better one deeply (centres closer than
    0.6 of their radii's sum): a second box on one nodule, offset or of another size, can
    overlap it too little for the detector's non-maximum suppression; two real nodules that
    touch are a radii's sum apart."""
    kept: list[Candidate] = []
    for candidate in candidates:
        inside = any(
            np.linalg.norm(candidate.centre_mm - other.centre_mm)
            < 0.6 * (float(np.max(other.size_mm)) + float(np.max(candidate.size_mm))) / 2
            for other in kept
        )
        if not inside:
            kept.append(candidate)
    return kept


class DemoNetworks(nn.Module):
    """The demo detector (``detector.*``) and classifier (``classifier.*``) as one module, so
    that weights/demo.pt is one state dict."""

    def __init__(self, network: Mapping[str, Any], classifier: Mapping[str, Any]) -> None:
        super().__init__()
        self.detector = build_retinanet(network)
        self.classifier = PatchClassifier(tuple(classifier.get("channels", (8, 16, 32))))
