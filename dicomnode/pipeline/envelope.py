"""The acquisition envelope check: is a job's input what its model was validated on?

A model declares its envelope in model.toml (``[envelope]``, :class:`Envelope`); the pipeline
checks the loaded input against it before the model runs, from the series' first header and
the loaded volume (no pixels read twice). Outside, the route decides: ``envelope = "refuse"``
ends the job at once (an input does not change between attempts), ``"flag"`` runs the model and
marks the job and every result object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dicomnode.errors import InputsRejected

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicomnode.imaging import Volume
    from dicomnode.inference.protocol import Envelope


class OutsideEnvelope(InputsRejected):
    """The input is outside the acquisitions the model was validated on."""


@dataclass(frozen=True)
class Verdict:
    """Inside the envelope, or the reasons it is not (each names the value and the range)."""

    reasons: tuple[str, ...] = ()

    @property
    def inside(self) -> bool:
        return not self.reasons

    def as_json(self, policy: str) -> dict[str, Any]:
        """As the job's result records it."""
        return {"inside": self.inside, "reasons": list(self.reasons), "policy": policy}

    def sentence(self, model: str) -> str:
        return f"{model} was not validated for this input: {'; '.join(self.reasons)}"


def check_envelope(envelope: Envelope, inputs: Iterable[tuple[Dataset, Volume]]) -> Verdict:
    """Each input series (its first header and its loaded volume) against ``envelope``."""
    reasons: list[str] = []
    for header, volume in inputs:
        reasons += _series_reasons(envelope, header, volume)
    return Verdict(tuple(dict.fromkeys(reasons)))


def _series_reasons(envelope: Envelope, header: Dataset, volume: Volume) -> list[str]:
    reasons: list[str] = []
    modality = str(header.get("Modality", "") or volume.modality).upper()
    if envelope.modalities and modality not in envelope.modalities:
        reasons.append(f"modality {modality or '(none)'} is not {'/'.join(envelope.modalities)}")
    part = str(header.get("BodyPartExamined", "")).strip().upper()
    if envelope.body_parts and part not in envelope.body_parts:
        expected = "/".join(envelope.body_parts)
        reasons.append(f"body part {part or '(none)'} is not {expected}")
    frames, rows, columns = (int(n) for n in volume.array.shape[:3])
    row_mm, column_mm = volume.geometry.pixel_spacing
    for name, value, bounds, unit in (
        ("pixel spacing", min(row_mm, column_mm), envelope.pixel_spacing_mm, " mm"),
        ("pixel spacing", max(row_mm, column_mm), envelope.pixel_spacing_mm, " mm"),
        ("slice thickness", _thickness(header, volume), envelope.slice_thickness_mm, " mm"),
        ("rows", rows, envelope.rows, ""),
        ("columns", columns, envelope.columns, ""),
        ("frames", frames, envelope.frames, ""),
    ):
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            reasons.append(f"{name} {value:g}{unit} is outside {bounds[0]:g}-{bounds[1]:g}{unit}")
    photometric = str(header.get("PhotometricInterpretation", "")).upper()
    if envelope.photometric and photometric not in envelope.photometric:
        expected = "/".join(envelope.photometric)
        reasons.append(f"photometric interpretation {photometric or '(none)'} is not {expected}")
    contrast = bool(str(header.get("ContrastBolusAgent", "")).strip())
    if envelope.contrast == "required" and not contrast:
        reasons.append("no contrast agent (Contrast/Bolus Agent empty); contrast is required")
    if envelope.contrast == "forbidden" and contrast:
        reasons.append("a contrast agent was given; the model was validated without contrast")
    for keyword, pattern in envelope.series.items():
        value = header.get(keyword, "")
        text = "\\".join(str(v) for v in value) if _multi(value) else str(value)
        if not re.search(pattern, text, flags=re.IGNORECASE):
            reasons.append(f"{keyword} {text!r} does not match {pattern!r}")
    return reasons


def _thickness(header: Dataset, volume: Volume) -> float:
    """Slice Thickness as written, else the distance between the volume's slices."""
    try:
        return float(header.SliceThickness)
    except (AttributeError, TypeError, ValueError):
        return float(volume.geometry.spacing[2])


def _multi(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
