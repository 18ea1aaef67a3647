"""Key images, drawn: a source slice scaled up, each finding's outline, long axis and label on
it, and a text panel with each finding's numbers below. Pure rendering (numpy and Pillow to an
RGB array), no DICOM: the summary Secondary Captures and a review page's previews both use it.

Coordinates are those of :mod:`dicomnode.results.regions` (DICOM image coordinates, ``(column,
row)``, the top left corner of the top left pixel at ``(0, 0)``); scaled by the integer factor
``f``, ``(c, r)`` lies at ``(c * f, r * f)`` of the scaled image.

Nothing about the patient is drawn (no name, ID or date): only the model's findings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

    from dicomnode.results.regions import KeyRegion

RGB = tuple[int, int, int]

#: the long side of a key image is at least this many pixels (before the text panel)
MIN_SIDE = 512
#: each finding's colour, in the findings' order (saturated: none occurs in a grey image)
PALETTE: tuple[RGB, ...] = (
    (0, 255, 0),
    (0, 200, 255),
    (255, 0, 255),
    (255, 255, 0),
    (255, 128, 0),
    (128, 128, 255),
    (0, 255, 160),
    (255, 96, 160),
)
#: the demo-weights warning
WARNING: RGB = (255, 48, 48)
TEXT: RGB = (255, 255, 255)
BACKGROUND: RGB = (0, 0, 0)
#: outline and cross width, long axis width (pixels of the scaled image)
OUTLINE_WIDTH = 2
AXIS_WIDTH = 1
DASH = 6


def colour_of(index: int) -> RGB:
    """The colour of the finding at ``index`` (the palette repeats)."""
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class Outline:
    """A finding's region to draw on its key image, in its colour, with its short label."""

    region: KeyRegion
    colour: RGB
    label: str


@dataclass(frozen=True)
class Line:
    """One line of the text panel."""

    text: str
    colour: RGB = TEXT


def scale_factor(rows: int, columns: int, min_side: int = MIN_SIDE) -> int:
    """The integer factor that brings the long side to at least ``min_side`` (1: no smaller)."""
    return max(1, math.ceil(min_side / max(rows, columns, 1)))


def font_size(width: int) -> int:
    return max(12, min(32, round(width / 28)))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def key_image(
    image: np.ndarray,
    outlines: Sequence[Outline],
    lines: Sequence[Line],
    *,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """RGB uint8 ``[rows, columns, 3]``: ``image`` (grey 0..255 ``[rows, columns]`` or RGB
    ``[rows, columns, 3]``, as :func:`~dicomnode.results.sc.display_pixels` gives) scaled up
    (nearest neighbour) so its long side is at least ``min_side``, each outline drawn on it, and
    below it a black band with ``lines``."""
    from PIL import Image, ImageDraw

    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"a key image is drawn on grey or RGB pixels, not {pixels.shape}")
    factor = scale_factor(pixels.shape[0], pixels.shape[1], min_side)
    scaled = np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
    height, width = scaled.shape[:2]
    font = _font(font_size(width))
    wrapped = _wrap(lines, font, width - 2 * _margin(width))
    line_height = _line_height(font)
    band = 2 * _margin(width) + line_height * len(wrapped) if wrapped else 0
    canvas = Image.new("RGB", (width, height + band), BACKGROUND)
    canvas.paste(Image.fromarray(np.ascontiguousarray(scaled), "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    labels: list[tuple[float, float, float, float]] = []
    for outline in outlines:
        _draw_outline(draw, outline, factor, font, (width, height), labels)
    y = height + _margin(width)
    for line in wrapped:
        draw.text((_margin(width), y), line.text, fill=line.colour, font=font)
        y += line_height
    return np.asarray(canvas, dtype=np.uint8).copy()


def _margin(width: int) -> int:
    return max(4, width // 96)


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return int(bottom - top) + max(4, int(bottom - top) // 3)


def _wrap(
    lines: Sequence[Line], font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> list[Line]:
    """Each line broken at spaces where it is wider than ``width``."""
    out: list[Line] = []
    for line in lines:
        words = line.text.split(" ")
        current = ""
        for word in words:
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > width:
                out.append(Line(current, line.colour))
                current = "  " + word
            else:
                current = candidate
        out.append(Line(current, line.colour))
    return out


def _draw_outline(
    draw: ImageDraw.ImageDraw,
    outline: Outline,
    factor: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    size: tuple[int, int],
    labels: list[tuple[float, float, float, float]],
) -> None:
    region, colour = outline.region, outline.colour
    points = [(c * factor, r * factor) for c, r in region.points]
    if region.graphic_type == "POLYLINE":
        draw.line(points, fill=colour, width=OUTLINE_WIDTH, joint="curve")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
    elif region.graphic_type == "CIRCLE":
        (cx, cy), (ex, ey) = points
        radius = max(math.hypot(ex - cx, ey - cy), OUTLINE_WIDTH + 1.0)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, outline=colour, width=OUTLINE_WIDTH)
        xs, ys = [box[0], box[2]], [box[1], box[3]]
    else:  # POINT: a cross
        ((cx, cy),) = points
        arm = 4 * OUTLINE_WIDTH + factor
        draw.line([(cx - arm, cy), (cx + arm, cy)], fill=colour, width=OUTLINE_WIDTH)
        draw.line([(cx, cy - arm), (cx, cy + arm)], fill=colour, width=OUTLINE_WIDTH)
        xs, ys = [cx - arm, cx + arm], [cy - arm, cy + arm]
    if region.long_axis is not None:
        (c0, r0), (c1, r1) = region.long_axis
        _dashed(draw, (c0 * factor, r0 * factor), (c1 * factor, r1 * factor), colour)
    if outline.label:
        box = (min(xs), min(ys), max(xs), max(ys))
        _label(draw, outline.label, colour, font, box, size, labels)


def _dashed(
    draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], colour: RGB
) -> None:
    length = math.hypot(end[0] - start[0], end[1] - start[1])
    if length < 1:
        return
    steps = max(1, int(length // DASH))
    for n in range(0, steps, 2):
        a, b = n / steps, min(n + 1, steps) / steps
        draw.line(
            [
                (start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1])),
                (start[0] + b * (end[0] - start[0]), start[1] + b * (end[1] - start[1])),
            ],
            fill=colour,
            width=AXIS_WIDTH,
        )


def _label(
    draw: ImageDraw.ImageDraw,
    text: str,
    colour: RGB,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    placed: list[tuple[float, float, float, float]],
) -> None:
    """``text`` to the right of ``box`` (to the left where there is no room), outlined in black
    so it reads on any background, kept inside the image, below the labels ``placed`` already
    where it would cover one (added to them)."""
    width, height = size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=1)
    text_w, text_h = right - left, bottom - top
    gap = 4
    x = box[2] + gap
    if x + text_w > width:
        x = box[0] - gap - text_w
    x = min(max(x, 0), max(width - text_w, 0))
    y = min(max(box[1] - text_h - gap, 0), max(height - text_h, 0))
    for _ in range(len(placed)):
        if not any(_overlap((x, y, x + text_w, y + text_h), other) for other in placed):
            break
        y = min(y + text_h + 2, max(height - text_h, 0))
    placed.append((x, y, x + text_w, y + text_h))
    draw.text(
        (x - left, y - top), text, fill=colour, font=font, stroke_width=1, stroke_fill=BACKGROUND
    )


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
