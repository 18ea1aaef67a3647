"""Brain tumor sub-regions in four-sequence MRI: SegResNet after MONAI's brats_mri_segmentation.

The pipeline, for a study's T1c, T1, T2 and FLAIR volumes (one Frame of Reference):

1. **One grid**: the series' boxes (any orientation, resolution, field of view) are covered by a
   grid along the patient's L, P, S axes at the model's spacing (the zoo: 1 mm; the demo
   network: 2 mm), each series is resampled onto it (linear); voxels outside any series' box,
   and the air round the head (below a tenth of every channel's 99th percentile), are zeroed in
   every channel, and the grid is cropped to the head plus a margin, sizes multiples of 8.
2. **Normalisation** as the zoo's ``NormalizeIntensityd(nonzero=True, channel_wise=True)``, so
   over the head whatever the field of view (the zoo's skull-stripped BraTS images: the brain);
   the array in MONAI's ``[C, x, y, z]`` layout, which on this grid is the BraTS layout (x to
   the left, y to the back, z up). A missing sequence (a route that runs with what is there) is
   a channel of zeros.
3. **Segmentation**: three sigmoid channels, tumor core (TC), whole tumor (WT), enhancing tumor
   (ET), whole grid or sliding window.
4. **Back to a source series**: the probabilities are resampled (linear) onto the grid of the
   reference series (``params.reference_input``, FLAIR by default), thresholded, and turned
   into sub-regions as the BraTS labels nest: enhancing = ET; necrotic core = TC minus ET;
   edema = WT minus TC; parts of the tumor with no core in them are dropped. Resampling the
   probabilities, not a label map, keeps thin rims that a 2 mm working grid would otherwise
   shift by a voxel.

A MONAI bundle (the zoo's brats_mri_segmentation directory) replaces the demo network; its
sliding window and channel order come from its config and metadata.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dicomnode.domain import Findings, MaskRef
from dicomnode.errors import InputsRejected
from dicomnode.inference import Model
from dicomnode.inference.regions import bounding_box

from .network import ZOO_CHANNELS, ZOO_NETWORK, ZOO_ROI, ZOO_SPACING, build_segresnet

MASK_NAME = "tumor"
#: label name -> voxel value in the ``tumor`` mask (model.toml [[labels]])
SUB_REGIONS = {"necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}
#: sub-region -> the output channel whose probability it reports (TC 0, WT 1, ET 2)
CHANNEL_OF = {"necrotic_core": 0, "edema": 1, "enhancing_tumor": 2}
#: the output channels (TC, WT, ET) by the name of their own threshold in model.toml
CHANNEL_THRESHOLDS = ("tumor_core", "whole_tumor", "enhancing_tumor")


@dataclass(frozen=True)
class ModelInput:
    """The network's input: ``array`` ``[C, x, y, z]`` float32 on ``grid`` (patient space),
    the input names by channel, and which were missing."""

    array: np.ndarray
    grid: Any  # dicomnode.imaging.Geometry, indexed [k, j, i] = [z, y, x]
    channels: tuple[str, ...]
    missing: tuple[str, ...]


def normalise_nonzero(array: np.ndarray) -> np.ndarray:
    """Each channel's non-zero voxels to zero mean, unit variance; zeros stay zero (MONAI's
    NormalizeIntensity with ``nonzero=True, channel_wise=True``)."""
    out = np.zeros_like(array, dtype=np.float32)
    for c in range(array.shape[0]):
        channel = array[c]
        mask = channel != 0
        if not mask.any():
            continue
        values = channel[mask]
        std = float(values.std())
        out[c][mask] = (values - float(values.mean())) / (std if std > 0 else 1.0)
    return out


def head_mask(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Voxels above a tenth of their channel's 99th percentile in any channel: the head, not
    the air (nor much of the skull) around it."""
    mask = np.zeros(arrays[0].shape, dtype=bool)
    for array in arrays:
        positive = array[array > 0]
        if positive.size:
            mask |= array > 0.1 * float(np.percentile(positive, 99))
    return mask


def with_core(tumor: np.ndarray, core: np.ndarray) -> np.ndarray:
    """The connected parts (6-connected) of ``tumor`` that hold some of ``core``: edema with no
    tumor core in it is a false positive (a brighter patch of grey matter on FLAIR), as BraTS
    post-processing treats it. Without any core, ``tumor`` as it is."""
    import SimpleITK as sitk  # noqa: N813

    if not (tumor & core).any():
        return tumor
    parts = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray(tumor.astype(np.uint8)), False)
    )
    kept = np.unique(parts[core & tumor])
    return np.isin(parts, kept[kept > 0])


def nested_labels(probabilities: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Labels (1 necrotic, 2 edema, 3 enhancing) from the three probabilities (TC, WT, ET) at
    their ``thresholds``, nested as the BraTS labels nest (tumor parts with no core dropped)."""
    tc, wt, et = (probabilities[c] >= thresholds[c] for c in range(3))
    wt = with_core(wt | tc | et, tc)
    tc, et = tc & wt, et & wt
    labels = np.zeros(probabilities.shape[1:], dtype=np.uint8)
    labels[wt] = SUB_REGIONS["edema"]
    labels[tc] = SUB_REGIONS["necrotic_core"]
    labels[et] = SUB_REGIONS["enhancing_tumor"]
    return labels


class BrainTumorModel(Model):
    """Necrotic core, edema and enhancing tumor, with their volumes, on a reference series."""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        params = self.params
        self.spacing = float(params.get("spacing", ZOO_SPACING))
        self.channels: tuple[str, ...] = tuple(params.get("channels", ZOO_CHANNELS))
        self.reference_input = str(params.get("reference_input", "FLAIR"))
        roi = self.info.inference.roi_size
        self.roi_size: tuple[int, ...] = tuple(roi) if roi else ZOO_ROI
        self.margin = int(params.get("margin_voxels", 4))

    # -- loading -----------------------------------------------------------------------------

    def create_network(self) -> Any:
        return build_segresnet({**ZOO_NETWORK, **dict(self.params.get("network", {}))})

    def build_network(self, bundle: Any) -> Any:
        if bundle is not None:
            self._settings_from_bundle(bundle)
        return super().build_network(bundle)

    def _settings_from_bundle(self, bundle: Any) -> None:
        """The zoo's 1 mm grid, its sliding window, and its channel order (metadata.json
        ``channel_def``), where the bundle states them."""
        self.spacing, self.roi_size, self.channels = ZOO_SPACING, ZOO_ROI, ZOO_CHANNELS
        parser = bundle.parser
        config = parser.get("") if hasattr(parser, "get") else {}
        inferer = config.get("inferer") if isinstance(config, Mapping) else None
        if isinstance(inferer, Mapping) and isinstance(inferer.get("roi_size"), list | tuple):
            self.roi_size = tuple(int(v) for v in inferer["roi_size"])
        image = bundle.metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
        names = image.get("channel_def") if isinstance(image, Mapping) else None
        if isinstance(names, Mapping) and len(names) == 4:
            order = [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
            if sorted(n.upper() for n in order) == sorted(n.upper() for n in ZOO_CHANNELS):
                by_upper = {n.upper(): n for n in ZOO_CHANNELS}
                self.channels = tuple(by_upper[n.upper()] for n in order)

    # -- the steps ---------------------------------------------------------------------------

    def preprocess(self, volumes: Mapping[str, Any]) -> ModelInput:
        """The four sequences on one grid, cropped to the head, normalised (``[C, x, y, z]``)."""
        from dicomnode.imaging import Geometry, on_grid, patient_grid

        present = {name: volumes[name] for name in self.channels if name in volumes}
        if not present:
            raise InputsRejected(
                f"model {self.name!r} needs the inputs {', '.join(self.channels)}; it got "
                f"{', '.join(sorted(volumes)) or 'none'}"
            )
        grid = patient_grid([v.geometry for v in present.values()], self.spacing)
        arrays = on_grid(present, grid, order=1, fill=np.nan)
        # only where every series has data: a voxel seen by one series alone (the top of the
        # head on a sagittal T1 whose axials stop lower) is no tumor's business
        covered = np.logical_and.reduce([np.isfinite(a) for a in arrays.values()])
        for array in arrays.values():
            array[~covered] = 0.0
        # the air goes to zero too, so "non-zero" is the head whatever the field of view (the
        # zoo's BraTS images are skull-stripped: there, non-zero is the brain)
        head = head_mask(list(arrays.values()))
        for array in arrays.values():
            array[~head] = 0.0
        box = bounding_box(head, self.margin) or tuple(slice(0, n) for n in head.shape)
        # grow the box to multiples of 8 (SegResNet halves the grid three times)
        starts, sizes = [], []
        for part in box:
            size = -(-(part.stop - part.start) // 8) * 8
            start = part.start - (size - (part.stop - part.start)) // 2
            starts.append(start)
            sizes.append(size)
        crop = Geometry.from_parts(
            grid.voxel_to_patient([starts[2], starts[1], starts[0]]),
            grid.direction,
            grid.spacing,
            (sizes[0], sizes[1], sizes[2]),
        )
        stacked = np.zeros((len(self.channels), *crop.shape), dtype=np.float32)
        for c, name in enumerate(self.channels):
            if name in arrays:
                stacked[c] = _crop(arrays[name], starts, sizes)
        stacked = normalise_nonzero(stacked)
        missing = tuple(name for name in self.channels if name not in present)
        # [C, k, j, i] -> MONAI's [C, x, y, z]
        layout = np.ascontiguousarray(stacked.transpose(0, 3, 2, 1))
        return ModelInput(layout, crop, self.channels, missing)

    def segment(self, image: ModelInput) -> np.ndarray:
        """Sigmoid probabilities ``[3, k, j, i]`` (TC, WT, ET) on ``image.grid``."""
        import torch

        fits = all(s <= r for s, r in zip(image.array.shape[1:], self.roi_size, strict=True))
        logits = self.infer(image.array[None], roi_size=None if fits else self.roi_size)
        probabilities = torch.sigmoid(logits[0]).cpu().numpy()
        return np.ascontiguousarray(probabilities.transpose(0, 3, 2, 1))

    def sub_regions(
        self, probabilities: np.ndarray, grid: Any, reference: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels (1 necrotic, 2 edema, 3 enhancing) on ``reference``'s grid, and the three
        probabilities there (``[3, k, j, i]``)."""
        from dicomnode.imaging import resample_array

        on_reference = np.stack(
            [resample_array(p, grid, reference, order=1, fill=0.0) for p in probabilities]
        )
        return nested_labels(on_reference, self.channel_thresholds()), on_reference

    def channel_thresholds(self) -> tuple[float, float, float]:
        """The TC, WT and ET thresholds: model.toml's ``[thresholds]`` ``tumor_core``,
        ``whole_tumor``, ``enhancing_tumor`` where it gives them (train.py fits the demo
        network's on held-out phantoms), else its ``probability``."""
        default = self.threshold("probability", 0.5)
        tc, wt, et = (self.threshold(name, default) for name in CHANNEL_THRESHOLDS)
        return tc, wt, et

    # -- running -----------------------------------------------------------------------------

    def predict(self, inputs: Any) -> Findings:
        from dicomnode.inference import check_cancelled

        volumes: Mapping[str, Any] = inputs if isinstance(inputs, Mapping) else {"FLAIR": inputs}
        image = self.preprocess(volumes)
        probabilities = self.segment(image)
        check_cancelled()
        reference_name = self._reference_name(volumes)
        reference = volumes[reference_name]
        labels, on_reference = self.sub_regions(probabilities, image.grid, reference.geometry)
        return self.to_findings(labels, on_reference, reference, reference_name, image)

    def _reference_name(self, volumes: Mapping[str, Any]) -> str:
        """The configured reference input, else the first present of FLAIR, T1c, T2, T1."""
        for name in (self.reference_input, "FLAIR", "T1c", "T2", "T1", *sorted(volumes)):
            if name in volumes:
                return name
        raise InputsRejected(f"model {self.name!r}: no input volumes")

    def to_findings(
        self,
        labels: np.ndarray,
        probabilities: np.ndarray,
        reference: Any,
        reference_name: str,
        image: ModelInput,
    ) -> Findings:
        geometry = reference.geometry
        voxel_mm3 = float(abs(np.linalg.det(geometry.affine[:3, :3])))
        findings = []
        volumes: dict[str, float] = {}  # mm3, as the findings say
        for name, value in SUB_REGIONS.items():
            region = labels == value
            voxels = int(region.sum())
            if voxels == 0:
                continue
            k, j, i = np.nonzero(region)
            centre = geometry.voxel_to_patient([i.mean(), j.mean(), k.mean()])
            volume = voxels * voxel_mm3
            volumes[name] = round(volume, 1)
            findings.append(
                self.finding(
                    name,
                    float(probabilities[CHANNEL_OF[name]][region].mean()),
                    centre_mm=tuple(round(float(v), 3) for v in centre),
                    diameter_mm=round((6.0 * volume / math.pi) ** (1.0 / 3.0), 2),
                    volume_mm3=volumes[name],
                    mask=MaskRef(MASK_NAME, value),
                    attributes={"voxels": voxels},
                )
            )
        core = volumes.get("necrotic_core", 0.0) + volumes.get("enhancing_tumor", 0.0)
        return self.findings(
            findings,
            masks={MASK_NAME: labels} if findings else {},
            reference=reference.series_instance_uid,
            summary={
                "reference_input": reference_name,
                "whole_tumor_mm3": round(core + volumes.get("edema", 0.0), 1),
                "tumor_core_mm3": round(core, 1),
                "enhancing_tumor_mm3": round(volumes.get("enhancing_tumor", 0.0), 1),
                "channels": list(image.channels),
                "missing_inputs": list(image.missing),
                "spacing_mm": self.spacing,
                "grid_shape": list(image.grid.shape),
            },
        )


def _crop(array: np.ndarray, starts: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """``array[start:start+size]`` per axis, zero where the window passes the array's edge."""
    out = np.zeros(tuple(sizes), dtype=np.float32)
    source, target = [], []
    for axis in range(3):
        lo, hi = starts[axis], starts[axis] + sizes[axis]
        a, b = max(lo, 0), min(hi, array.shape[axis])
        source.append(slice(a, b))
        target.append(slice(a - lo, b - lo))
    out[tuple(target)] = array[tuple(source)]
    return out
