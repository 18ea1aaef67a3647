"""A model's acquisition envelope: the inputs it was validated for, and the verdict on one input.

A result a radiologist cannot trust is worse than none: a model declares the modality, body
part, pixel spacing, slice thickness, matrix, frame count, photometric interpretation, contrast
and identifying series attributes it was validated for (``[envelope]`` of model.toml, or
``envelope`` of a bundle's or command's settings), and the pipeline checks each input's header
against it before the model runs. The route's ``envelope`` policy says what an input outside
does: ``refuse`` (the job is skipped, with the reasons and a "not analysed" SR) or ``flag``
(the model runs; every result object says the input was outside).

An attribute the input does not record is not judged: it is listed as unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict

#: what a route does with an input outside its model's envelope
EnvelopePolicy = Literal["refuse", "flag"]
#: the prefix of every result object's Series Description made from an input outside
UNVALIDATED_PREFIX = "UNVALIDATED INPUT: "

Range = tuple[float, float]


@dataclass(frozen=True)
class InputHeader:
    """What the envelope check reads of one input series: its first header, and the frame
    count of the loaded volume (or of the stored files, when nothing is loaded)."""

    series_instance_uid: str = ""
    modality: str = ""
    body_part: str = ""
    #: Pixel Spacing (row, column) mm; None when not recorded
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int | None = None
    photometric: str = ""
    #: Contrast/Bolus Agent; None when the attribute is absent (then "no contrast")
    contrast_agent: str | None = None
    #: series attribute keyword -> its text (multiple values joined with a backslash)
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvelopeVerdict:
    """Whether an input is inside a model's envelope, and if not, why (one reason per
    attribute: the attribute, the value found and what is expected)."""

    inside: bool
    reasons: tuple[str, ...] = ()
    #: attributes the envelope names that the input does not record
    unchecked: tuple[str, ...] = ()

    def as_json(self, policy: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"inside": self.inside}
        if not self.inside:
            out["reasons"] = list(self.reasons)
        if self.unchecked:
            out["unchecked"] = list(self.unchecked)
        if policy is not None:
            out["policy"] = policy
        return out

    @property
    def text(self) -> str:
        """The reasons in one line."""
        return "; ".join(self.reasons)

    @staticmethod
    def combine(verdicts: Mapping[str, EnvelopeVerdict]) -> EnvelopeVerdict:
        """Several inputs' verdicts (input name -> verdict) as one: inside when every input is;
        each reason names its input when there are several."""
        several = len(verdicts) > 1
        reasons = tuple(
            f"{name}: {reason}" if several else reason
            for name, verdict in verdicts.items()
            for reason in verdict.reasons
        )
        unchecked = tuple(
            dict.fromkeys(item for verdict in verdicts.values() for item in verdict.unchecked)
        )
        return EnvelopeVerdict(not reasons, reasons, unchecked)


def _range(name: str, value: Range | None, *, positive: bool = True) -> None:
    if value is None:
        return
    low, high = value
    if low > high or (positive and low < 0):
        raise ValueError(f"{name} = [{low}, {high}] must be [min, max] with 0 <= min <= max")


def _mm(value: float) -> str:
    """A millimetre value as DICOM gives it (10.0, 0.703125)."""
    return str(float(value))


def _count(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Envelope:
    """What a model was validated for; every key optional (absent: not checked). Pydantic
    builds it from a TOML table with exactly these keys."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()  # Body Part Examined, compared case-insensitively
    pixel_spacing_mm: Range | None = None  # in-plane, both axes
    slice_thickness_mm: Range | None = None
    rows: Range | None = None
    columns: Range | None = None
    frames: Range | None = None  # slices or frames of the series
    photometric: tuple[str, ...] = ()
    contrast: Literal["required", "forbidden"] | None = None  # Contrast/Bolus Agent
    #: series attribute keyword -> regular expression its value must match (searched)
    series: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("pixel_spacing_mm", "slice_thickness_mm", "rows", "columns", "frames"):
            _range(name, getattr(self, name))
        object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities))
        object.__setattr__(self, "body_parts", tuple(p.strip().upper() for p in self.body_parts))
        object.__setattr__(self, "photometric", tuple(p.strip().upper() for p in self.photometric))
        for keyword, pattern in self.series.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"series.{keyword}: {pattern!r} is not a regular expression: {exc}"
                ) from exc
        object.__setattr__(self, "series", dict(self.series))

    @property
    def empty(self) -> bool:
        """Nothing is checked."""
        return self == Envelope()

    def check(self, header: InputHeader) -> EnvelopeVerdict:
        """The verdict on one input series."""
        reasons: list[str] = []
        unchecked: list[str] = []

        def within(name: str, value: float | None, limits: Range | None, unit: str) -> None:
            shown = _mm if unit else _count
            if limits is None:
                return
            if value is None:
                unchecked.append(name)
                return
            low, high = limits
            if not low <= value <= high:
                reasons.append(
                    f"{name} {shown(value)}{unit} is outside {shown(low)}-{shown(high)}{unit}"
                )

        def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if not allowed:
                return
            if not value.strip():
                unchecked.append(name)
            elif value.strip().upper() not in allowed:
                reasons.append(f"{name} {value.strip()} is not {' or '.join(allowed)}")

        one_of("modality", header.modality, self.modalities)
        one_of("body part", header.body_part, self.body_parts)
        if self.pixel_spacing_mm is not None:
            if header.pixel_spacing is None:
                unchecked.append("pixel spacing")
            else:
                low, high = self.pixel_spacing_mm
                if not all(low <= s <= high for s in header.pixel_spacing):
                    found = " x ".join(_mm(s) for s in header.pixel_spacing)
                    reasons.append(f"pixel spacing {found} mm is outside {_mm(low)}-{_mm(high)} mm")
        within("slice thickness", header.slice_thickness, self.slice_thickness_mm, " mm")
        within("rows", header.rows, self.rows, "")
        within("columns", header.columns, self.columns, "")
        within("frames", header.frames, self.frames, "")
        one_of("photometric interpretation", header.photometric, self.photometric)
        if self.contrast is not None:
            given = bool((header.contrast_agent or "").strip())
            if self.contrast == "required" and not given:
                reasons.append("no contrast agent recorded; the model is validated with contrast")
            elif self.contrast == "forbidden" and given:
                reasons.append(
                    f"contrast agent {(header.contrast_agent or '').strip()} recorded; "
                    "the model is validated without contrast"
                )
        for keyword, pattern in self.series.items():
            value = header.attributes.get(keyword)
            if value is None:
                reasons.append(f"{keyword} is not recorded; expected to match {pattern!r}")
            elif not re.search(pattern, value):
                reasons.append(f"{keyword} {value!r} does not match {pattern!r}")
        return EnvelopeVerdict(not reasons, tuple(reasons), tuple(unchecked))

    def describe(self) -> str:
        """The envelope in one line, for listings."""
        parts = []
        if self.modalities:
            parts.append("modality " + "/".join(self.modalities))
        if self.body_parts:
            parts.append("body part " + "/".join(self.body_parts))
        for name, limits, unit in (
            ("pixel spacing", self.pixel_spacing_mm, " mm"),
            ("slice thickness", self.slice_thickness_mm, " mm"),
            ("rows", self.rows, ""),
            ("columns", self.columns, ""),
            ("frames", self.frames, ""),
        ):
            if limits is not None:
                shown = _mm if unit else _count
                parts.append(f"{name} {shown(limits[0])}-{shown(limits[1])}{unit}")
        if self.photometric:
            parts.append("photometric " + "/".join(self.photometric))
        if self.contrast is not None:
            parts.append(f"contrast {self.contrast}")
        parts += [f"{keyword} ~ {pattern!r}" for keyword, pattern in self.series.items()]
        return ", ".join(parts) or "any input"


def input_header(ds: Any, frames: int | None = None, series: Iterable[str] = ()) -> InputHeader:
    """An input's header values from its first dataset (pixels not read): the pixel measures
    of a multi-frame object from its functional groups when the top level has none;
    ``frames``: the series' slices or frames (default: Number of Frames, else 1); ``series``:
    the keywords of the envelope's series patterns to read."""

    def measures(keyword: str) -> Any:
        if keyword in ds:
            return ds.get(keyword)
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            items = ds.get(group) or ()
            if items:
                pixel = items[0].get("PixelMeasuresSequence") or ()
                if pixel and keyword in pixel[0]:
                    return pixel[0].get(keyword)
        return None

    spacing = measures("PixelSpacing")
    thickness = measures("SliceThickness")
    pixel_spacing = None
    if spacing is not None and len(spacing) == 2:
        pixel_spacing = (float(spacing[0]), float(spacing[1]))
    if frames is None:
        frames = int(ds.get("NumberOfFrames") or 1)
    attributes: dict[str, str] = {}
    for keyword in series:
        if keyword in ds and ds.get(keyword) is not None:
            value = ds.get(keyword)
            many = isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
            attributes[keyword] = "\\".join(map(str, value)) if many else str(value)
    agent = ds.get("ContrastBolusAgent")
    return InputHeader(
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "") or ""),
        body_part=str(ds.get("BodyPartExamined", "") or ""),
        pixel_spacing=pixel_spacing,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        rows=int(ds.Rows) if ds.get("Rows") else None,
        columns=int(ds.Columns) if ds.get("Columns") else None,
        frames=frames,
        photometric=str(ds.get("PhotometricInterpretation", "") or ""),
        contrast_agent=str(agent) if agent is not None else None,
        attributes=attributes,
    )


def series_header(datasets: Sequence[Any], series: Iterable[str] = ()) -> InputHeader:
    """A stored series' header values from its instances' headers (no pixels): the first
    one's values, and its frames: Number of Frames of a single multi-frame instance, else the
    number of instances."""
    first = datasets[0]
    frames = int(first.get("NumberOfFrames") or 1) if len(datasets) == 1 else len(datasets)
    return input_header(first, frames=frames, series=series)
