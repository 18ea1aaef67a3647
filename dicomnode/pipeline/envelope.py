"""The acquisition envelope check: is a job's input what its model was validated on?

A model declares its envelope in model.toml (``[envelope]``, :class:`Envelope`); the pipeline
checks the loaded input against it before the model runs, from the series' first header and
the loaded volume (no pixels read twice). Outside, the route decides: ``envelope = "refuse"``
ends the job at once (an input does not change between attempts), ``"flag"`` runs the model and
marks the job and every result object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import InputsRefused

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicomnode.envelope import Envelope
    from dicomnode.imaging import Volume


class OutsideEnvelope(InputsRefused):
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


@dataclass(frozen=True)
class Acquisition:
    """What the envelope is checked on, for one series: its first header and its size."""

    header: Dataset
    frames: int
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float] | None  # row, column
    slice_thickness_mm: float | None

    @classmethod
    def of_volume(cls, header: Dataset, volume: Volume) -> Acquisition:
        """A loaded series: sizes and spacing from the volume (Slice Thickness as written,
        else the distance between its slices)."""
        frames, rows, columns = (int(n) for n in volume.array.shape[:3])
        thickness = _number(header, "SliceThickness")
        if thickness is None:
            thickness = float(volume.geometry.spacing[2])
        return cls(header, frames, rows, columns, volume.geometry.pixel_spacing, thickness)

    @classmethod
    def of_headers(cls, headers: Sequence[Dataset]) -> Acquisition:
        """A series known by its headers only (``route explain``): its instances' frames."""
        first = headers[0]
        frames = sum(int(ds.get("NumberOfFrames") or 1) for ds in headers)
        measures = _pixel_measures(first)
        spacing = measures.get("PixelSpacing") or first.get("PixelSpacing")
        pixel = (float(spacing[0]), float(spacing[1])) if spacing else None
        thickness = _number(first, "SliceThickness")
        if thickness is None:
            thickness = _number(measures, "SliceThickness")
        rows, columns = int(first.get("Rows") or 0), int(first.get("Columns") or 0)
        return cls(first, frames, rows, columns, pixel, thickness)


def check_headers(envelope: Envelope, series: Iterable[Sequence[Path | str]]) -> Verdict:
    """Each series, given as its files, against ``envelope`` from their headers alone (a model
    that reads the files itself, as a command does)."""
    from pydicom import dcmread

    return check_envelope(
        envelope,
        (
            Acquisition.of_headers([dcmread(path, stop_before_pixels=True) for path in paths])
            for paths in series
            if paths
        ),
    )


def check_envelope(envelope: Envelope, inputs: Iterable[Acquisition]) -> Verdict:
    """Each input series against ``envelope``; each reason once."""
    reasons: list[str] = []
    for acquisition in inputs:
        reasons += _series_reasons(envelope, acquisition)
    return Verdict(tuple(dict.fromkeys(reasons)))


def _series_reasons(envelope: Envelope, acquisition: Acquisition) -> list[str]:
    header = acquisition.header
    reasons: list[str] = []
    modality = str(header.get("Modality", "")).upper()
    if envelope.modalities and modality not in envelope.modalities:
        reasons.append(f"modality {modality or '(none)'} is not {'/'.join(envelope.modalities)}")
    part = str(header.get("BodyPartExamined", "")).strip().upper()
    if envelope.body_parts and part not in envelope.body_parts:
        expected = "/".join(envelope.body_parts)
        reasons.append(f"body part {part or '(none)'} is not {expected}")
    spacing = acquisition.pixel_spacing_mm
    checks: list[tuple[str, float | None, Any, str]] = [
        ("pixel spacing", min(spacing) if spacing else None, envelope.pixel_spacing_mm, " mm"),
        ("pixel spacing", max(spacing) if spacing else None, envelope.pixel_spacing_mm, " mm"),
        ("slice thickness", acquisition.slice_thickness_mm, envelope.slice_thickness_mm, " mm"),
        ("rows", acquisition.rows, envelope.rows, ""),
        ("columns", acquisition.columns, envelope.columns, ""),
        ("frames", acquisition.frames, envelope.frames, ""),
    ]
    for name, value, bounds, unit in checks:
        if bounds is None:
            continue
        if value is None:
            reasons.append(
                f"{name} unknown (not in the header); expected {bounds[0]:g}-{bounds[1]:g}{unit}"
            )
        elif not bounds[0] <= value <= bounds[1]:
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


def _number(ds: Dataset | dict[str, Any], keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _pixel_measures(ds: Dataset) -> dict[str, Any]:
    """An enhanced multi-frame object's shared Pixel Measures (spacing, thickness), if any."""
    try:
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    except (AttributeError, IndexError):
        return {}
    return {k: measures.get(k) for k in ("PixelSpacing", "SliceThickness")}


def _multi(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
