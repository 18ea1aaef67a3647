"""Diabetic retinopathy grading of retinal OCT volumes and colour fundus photographs, with the
lesion types found and a Grad-CAM attention map of every graded image.

The pipeline, for a :class:`~dicomnode.imaging.Volume` of ophthalmic frames (an OCT volume's
B-scans ``[frame, depth, lateral]``, or photographs ``[image, row, column, RGB]``):

1. **Images**: each frame scaled to 0..1 (photographs: 8-bit data by 255, wider data by the
   series' 99.9th percentile; OCT B-scans always by the series' 99.9th percentile, since OCT
   devices' gain and display settings differ), grey repeated to three channels, resized
   (antialiased) to the model's square (``oct_size`` / ``fundus_size``), standardised.
2. **Network**: one MONAI 2D backbone (:mod:`.network`) with two heads: the ICDR grade (softmax
   over 0..4) and lesion types (sigmoid each), and Grad-CAM on its last convolution with the
   expected grade as target.
3. **Aggregation** to one grade per series. OCT: B-scans are graded one by one; the series'
   probabilities are the mean over its top quarter of B-scans ranked by expected grade (at
   least one), since disease shows in the B-scans through the lesions and a normal periphery
   must not dilute it. Photographs: the most diseased image (the worse eye decides). The grade is
   the argmax of those probabilities, calibrated (softmax of the logits over ``[calibration]
   temperature``). **Indeterminate, not guessed**: the grade is reported indeterminate
   (``attributes["indeterminate"]``, its ``grade`` None, the most likely one beside it) when
   its probability is in ``[calibration] indeterminate``, or when it would be grade 0 (absent)
   with P(grade 0) below ``[calibration] absent_confidence``: absent needs confident evidence,
   so that a missed severe grade becomes a referral, not a normal report. A lesion type is
   reported when its probability on some graded image reaches ``[thresholds] lesion``.
4. **Attention**: each image's Grad-CAM upsampled to its own rows x columns, scaled to 0..255
   by the series' maximum times the probability of any retinopathy (a confident grade 0 gives a
   faint map); ``masks["attention"]`` (uint8, the shape of the frames) for the Secondary Capture.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dicomnode.domain import Finding, Findings
from dicomnode.errors import InputsRejected, ModelError
from dicomnode.inference import Model

from .network import RetinaGrader, grad_cam

ATTENTION = "attention"
GRADE_MEANINGS = (
    "No apparent retinopathy",
    "Mild non-proliferative diabetic retinopathy",
    "Moderate non-proliferative diabetic retinopathy",
    "Severe non-proliferative diabetic retinopathy",
    "Proliferative diabetic retinopathy",
)
INDETERMINATE_MEANING = "Indeterminate"
MEAN, STD = 0.5, 0.25


def is_colour(array: np.ndarray) -> bool:
    return array.ndim == 4 and array.shape[-1] == 3


def intensity_scale(array: np.ndarray, fundus: bool = True) -> float:
    """What maps a series' values to 0..1: for photographs, 255 for 8-bit data, else the
    99.9th percentile; for OCT, always the 99.9th percentile (gain and display differ by device).
    One scale for the whole series, so its frames stay comparable."""
    top = float(array.max()) if array.size else 0.0
    if fundus and 1.0 < top <= 255.0:
        return 255.0
    return max(float(np.percentile(array, 99.9)), 1e-6)


def to_images(array: np.ndarray, size: int, scale: float | None = None) -> Any:
    """Frames ``[N, rows, columns]`` or ``[N, rows, columns, 3]`` -> ``[N, 3, size, size]``
    float tensor, standardised as the network was trained (``scale``: see
    :func:`intensity_scale`, computed on ``array`` when not given)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    if array.ndim not in (3, 4) or (array.ndim == 4 and not is_colour(array)):
        raise InputsRejected(
            f"expected frames [N, rows, columns] or [N, rows, columns, 3], not shape {array.shape}"
        )
    values = np.asarray(array, dtype=np.float32)
    if scale is None:
        scale = intensity_scale(values)
    t = torch.from_numpy(np.ascontiguousarray(values)) / scale
    t = t.permute(0, 3, 1, 2) if t.dim() == 4 else t[:, None].expand(-1, 3, -1, -1)
    t = t.clamp(0.0, 1.0)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)  # fmt: skip
    return (t - MEAN) / STD


@dataclass(frozen=True)
class GradedImages:
    """The network's output for each frame of a series."""

    grades: np.ndarray  # [N, 5] probabilities
    lesions: np.ndarray  # [N, L] probabilities, the model's lesion order
    cams: np.ndarray  # [N, h, w] Grad-CAM, >= 0

    @property
    def expected(self) -> np.ndarray:
        return self.grades @ np.arange(5, dtype=np.float64)


def aggregate(grades: np.ndarray, top_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One grade distribution for a series: the mean over its ``top_fraction`` most diseased
    images by expected grade (at least one); returns it and the images used (ascending)."""
    expected = grades @ np.arange(5, dtype=np.float64)
    count = max(1, math.ceil(len(grades) * top_fraction))
    chosen = np.sort(np.argsort(-expected, kind="stable")[:count])
    mean = grades[chosen].mean(axis=0)
    return mean / mean.sum(), chosen


class OctGradingModel(Model):
    """ICDR grade, lesion types and attention maps from OPT volumes and OP photographs."""

    @property
    def fundus_lesions(self) -> tuple[str, ...]:
        return tuple(self.params.get("fundus_lesions", ()))

    @property
    def oct_lesions(self) -> tuple[str, ...]:
        return tuple(self.params.get("oct_lesions", ()))

    @property
    def lesion_names(self) -> tuple[str, ...]:
        """The lesion head's outputs, in order."""
        return self.fundus_lesions + self.oct_lesions

    def create_network(self) -> Any:
        return RetinaGrader(self.params.get("network", {}), lesions=len(self.lesion_names))

    def build_network(self, bundle: Any) -> Any:
        if bundle is not None:
            raise ModelError(
                f"model {self.name!r}: the Model Zoo has no retina bundle; remove "
                f"[models] bundles.{self.name} and use the package's weights"
            )
        return super().build_network(bundle)

    # -- running -----------------------------------------------------------------------------

    def fundus(self, volume: Any) -> bool:
        """Photographs (colour, or modality OP) rather than OCT B-scans."""
        return is_colour(volume.array) or str(volume.modality).upper() == "OP"

    def grade_images(self, array: np.ndarray, fundus: bool) -> GradedImages:
        """Grade every frame; Grad-CAM for each."""
        import torch

        from dicomnode.inference import check_cancelled

        if self.network is None or self.device is None:
            raise ModelError(f"model {self.name!r} used before load()")
        size = int(self.params.get("fundus_size" if fundus else "oct_size", 192))
        batch = int(self.params.get("batch", 16))
        device = self.device.torch
        scale = intensity_scale(np.asarray(array), fundus)
        grades, lesions, cams = [], [], []
        for start in range(0, array.shape[0], batch):
            x = to_images(array[start : start + batch], size, scale).to(device)
            grade_logits, lesion_logits, cam = grad_cam(self.network, x)
            grades.append(self.calibrated(grade_logits))
            lesions.append(torch.sigmoid(lesion_logits.float()).cpu().numpy())
            cams.append(cam.float().cpu().numpy())
            check_cancelled()
        return GradedImages(
            np.concatenate(grades).astype(np.float64),
            np.concatenate(lesions).astype(np.float64),
            np.concatenate(cams),
        )

    def grade_finding(self, probabilities: np.ndarray, frames: list[int]) -> Finding:
        """The series' grade finding from its calibrated probabilities: indeterminate when the
        top probability is in the band, or when absent (grade 0) lacks confident evidence."""
        from dicomnode.inference.calibration import mark_indeterminate

        grade = int(np.argmax(probabilities))
        finding = self.finding(
            "dr_grade",
            probabilities[grade],
            attributes={
                "grade": grade,
                "probabilities": [round(float(v), 4) for v in probabilities],
                "scale": "ICDR",
                "grade_meaning": GRADE_MEANINGS[grade],
                "expected_grade": round(float(probabilities @ np.arange(5)), 3),
                "frames": frames,
            },
        )
        needed = self.spec.info.calibration.absent_confidence
        if grade == 0 and needed is not None and probabilities[0] < needed:
            finding = mark_indeterminate(
                finding, f"P(grade 0) {probabilities[0]:.2f} below {needed:.2f} (absent needs "
                "confident evidence)"
            )  # fmt: skip
        if finding.indeterminate:
            attributes = {**finding.attributes, "grade": None, "most_likely_grade": grade,
                          "grade_meaning": INDETERMINATE_MEANING}  # fmt: skip
            finding = dataclasses.replace(finding, attributes=attributes)
        return finding

    def attention(self, cams: np.ndarray, shape: Sequence[int], weight: float) -> np.ndarray:
        """Grad-CAM maps upsampled to ``shape`` (frames, rows, columns), uint8 0..255."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        maps = F.interpolate(torch.from_numpy(cams)[:, None], size=tuple(shape[1:3]),
                             mode="bilinear", align_corners=False)[:, 0].numpy()  # fmt: skip
        top = float(maps.max())
        if top <= 0:
            return np.zeros(tuple(shape[:3]), dtype=np.uint8)
        return np.clip(maps / top * 255.0 * weight + 0.5, 0, 255).astype(np.uint8)

    def predict(self, inputs: Any) -> Findings:
        volume = inputs if not isinstance(inputs, Mapping) else inputs[sorted(inputs)[0]]
        array = np.asarray(volume.array)
        fundus = self.fundus(volume)
        graded = self.grade_images(array, fundus)
        top = (
            1.0 / len(graded.grades) if fundus else float(self.params.get("oct_top_fraction", 0.25))
        )
        probabilities, chosen = aggregate(graded.grades, top)
        grade = int(np.argmax(probabilities))
        frames = [int(k) + 1 for k in chosen]
        p = [round(float(v), 4) for v in probabilities]
        grade_finding = self.grade_finding(probabilities, frames)
        undecided = grade_finding.indeterminate
        findings = [grade_finding]
        threshold = self.threshold("lesion", 0.5)
        names = self.fundus_lesions if fundus else self.oct_lesions
        lesion_probabilities = {}
        for name in names:
            column = graded.lesions[:, self.lesion_names.index(name)]
            best = float(column.max())
            lesion_probabilities[name] = round(best, 4)
            if best >= threshold:
                where = [int(k) + 1 for k in np.flatnonzero(column >= threshold)]
                findings.append(self.finding(name, best, attributes={"frames": where}))
        weight = float(1.0 - probabilities[0])
        attention = self.attention(graded.cams, array.shape, weight)
        return self.findings(
            findings,
            masks={ATTENTION: attention},
            reference=None,
            summary={
                "grade": None if undecided else grade,
                "indeterminate": undecided,
                "most_likely_grade": grade,
                "probabilities": p,
                "grade_meaning": INDETERMINATE_MEANING if undecided else GRADE_MEANINGS[grade],
                "scale": "ICDR",
                "kind": "fundus" if fundus else "oct",
                "images": int(array.shape[0]),
                "graded_frames": frames,
                "lesion_probabilities": lesion_probabilities,
                "aggregation": "worst image" if fundus else f"mean of top {len(frames)} B-scans",
                "attention": "Grad-CAM of the expected grade on the last convolution",
            },
        )
