"""What a model was validated on: its acquisition envelope, as a model package, a bundle's
settings or a command's settings declare it (checked by :mod:`dicomnode.pipeline.envelope`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator


class Envelope(BaseModel):
    """The acquisitions a model was validated on (a package's model.toml ``[envelope]``, or
    ``envelope`` of a bundle's or a command's settings); a key left out is not checked. Inputs
    outside it are refused or flagged, as the route says. Below both the model runtime and
    the settings, so those of a bundle or a command declare it as a package does."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()  # Body Part Examined, upper case
    pixel_spacing_mm: tuple[float, float] | None = None  # in-plane, both axes: [min, max]
    slice_thickness_mm: tuple[float, float] | None = None
    rows: tuple[int, int] | None = None
    columns: tuple[int, int] | None = None
    frames: tuple[int, int] | None = None  # slices or frames of the series
    photometric: tuple[str, ...] = ()
    contrast: Literal["required", "forbidden"] | None = None  # Contrast/Bolus Agent
    series: dict[str, str] = {}  # attribute keyword -> pattern its value must match

    @field_validator("body_parts", "modalities", "photometric")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(item.strip().upper() for item in value)

    @field_validator("pixel_spacing_mm", "slice_thickness_mm", "rows", "columns", "frames")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"range {list(value)} must be [min, max] with min <= max")
        return value

    @field_validator("series")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for keyword, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"series {keyword}: {pattern!r} is not a regular expression: {exc}"
                ) from exc
        return value
