"""A job's key images (the summary's RGB Secondary Captures, ``key-NNN.dcm``) as PNG, for the
dashboard's job page: the same pixels a PACS viewer shows, outline and numbers drawn in."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dicomnode.domain import ResultObject
from dicomnode.errors import PreviewNotFound

KEY_PREFIX = "key-"


@dataclass(frozen=True)
class Preview:
    """One key image of a job: its number (1-based, in the order written) and object."""

    n: int
    object: ResultObject


def key_images(result: Mapping[str, Any] | None) -> list[Preview]:
    """The key images a job's result lists, numbered from 1 (none for a result without)."""
    keys = [
        o
        for o in ResultObject.listed_in(result)
        if o.kind == "SC" and PurePosixPath(o.path).name.startswith(KEY_PREFIX)
    ]
    return [Preview(n, o) for n, o in enumerate(keys, start=1)]


def find(result: Mapping[str, Any] | None, n: int, job_id: int) -> Preview:
    """Key image ``n`` of the job; PreviewNotFound naming how many it has."""
    previews = key_images(result)
    if not 1 <= n <= len(previews):
        raise PreviewNotFound(
            f"job {job_id} has no key image {n}: it has {len(previews)}"
            + (f" (1 to {len(previews)})" if previews else "")
        )
    return previews[n - 1]


def size(path: Path) -> tuple[int, int]:
    """(columns, rows) of a key image, from its header only."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return int(ds.Columns), int(ds.Rows)


def png(path: Path) -> bytes:
    """The key image at ``path`` as PNG bytes (its first frame; RGB as written, or grey).
    PreviewNotFound when the file is missing (removed by retention)."""
    import numpy as np
    from PIL import Image
    from pydicom import dcmread

    try:
        ds = dcmread(path)
    except FileNotFoundError:
        raise PreviewNotFound(f"key image {path.name} is gone (removed by retention?)") from None
    pixels = np.asarray(ds.pixel_array)
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.dtype != np.uint8:  # a grey key image of another depth: to 8 bits for a browser
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) * (255.0 / max(high - low, 1.0))).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
