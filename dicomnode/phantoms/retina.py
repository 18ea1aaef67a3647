"""Synthetic retinal OCT volumes and fundus photographs graded for diabetic retinopathy, written
as real ophthalmic DICOM with the truth (grade, lesion boxes) beside them.

Used by the oct_grading model's train.py, the demo, its tests and benchmark. Grades follow the
international clinical diabetic retinopathy scale (ICDR, 0 to 4):

- **OCT** (Ophthalmic Tomography Image Storage, modality OPT): B-scans of a retina with its
  layers (nerve fibre, ganglion cell / plexiform, nuclear layers, ellipsoid zone, RPE), a foveal
  pit, choroid and speckle. Disease lies in a zone of B-scans around the fovea: hard exudates
  (hyperreflective foci with shadows) from grade 1, retinal thickening and intraretinal fluid
  (cysts) from grade 2, growing with the grade, and a preretinal fibrovascular membrane with
  vitreous dots at grade 4. B-scans outside the zone are normal (their truth grade is 0).
- **Fundus** (Ophthalmic Photography 8 Bit, modality OP, RGB): scikit-image's real
  ``retina.jpg`` (flipped, rotated, zoomed, recoloured per seed) with drawn microaneurysms
  (grade 1), haemorrhages, hard exudates and cotton wool spots (grade 2), haemorrhages in all four
  quadrants (grade 3) and neovascularisation, often with a preretinal haemorrhage (grade 4).

Arrays are indexed ``[frame, row, column]`` (``[..., 3]`` for colour), as
:class:`dicomnode.imaging.Volume` holds them; lesion boxes are half-open index ranges on them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit

from dicomnode.phantoms.writer import (
    OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE,
    OPHTHALMIC_TOMOGRAPHY_STORAGE,
    SeriesHeader,
    decimal,
    decimals,
    image_pixel,
    item,
    seq,
    series_uid_for,
    set_pixels,
    uid_from,
    write_series,
)

FUNDUS_LESIONS = ("microaneurysms", "haemorrhages", "hard_exudates", "cotton_wool_spots")
OCT_LESIONS = ("intraretinal_fluid", "exudates", "retinal_thickening")
#: drawn and boxed in the truth, but not a lesion type the model reports
OTHER_SIGNS = ("neovascularisation", "preretinal_haemorrhage", "preretinal_proliferation")

Kind = Literal["OPT", "OP"]


@dataclass(frozen=True)
class Lesion:
    """One lesion: its type and box ``(k0, k1, j0, j1, i0, i1)`` (half-open, array indices)."""

    kind: str
    box: tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class RetinaTruth:
    """What was drawn: the grade of the eye, each image's own grade (a B-scan outside the
    disease zone shows grade 0), and every lesion."""

    grade: int
    frame_grades: tuple[int, ...]
    lesions: tuple[Lesion, ...]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(lesion.kind for lesion in self.lesions)

    def frame_kinds(self, frame: int) -> frozenset[str]:
        """The lesion types visible in one frame."""
        return frozenset(les.kind for les in self.lesions if les.box[0] <= frame < les.box[1])

    def mask(self, shape: Sequence[int], kinds: Sequence[str] | None = None) -> np.ndarray:
        """Boolean ``[frame, row, column]`` array, True inside the boxes (of ``kinds``)."""
        out = np.zeros(tuple(shape)[:3], dtype=bool)
        for lesion in self.lesions:
            if kinds is None or lesion.kind in kinds:
                k0, k1, j0, j1, i0, i1 = lesion.box
                out[k0:k1, j0:j1, i0:i1] = True
        return out


@dataclass(frozen=True)
class RetinaPhantom:
    """A phantom's pixels (uint8), its truth, and how to place it in DICOM."""

    modality: Kind
    array: np.ndarray
    truth: RetinaTruth
    pixel_mm: tuple[float, float]  # (row spacing, column spacing) as DICOM Pixel Spacing
    frame_mm: float  # between frames (OCT B-scans); 0 for photographs
    seed: int = 0
    laterality: str = "R"
    extra: dict[str, float] = field(default_factory=dict)

    def write(self, folder: Path | str, **options: Any) -> list[Path]:
        """Write as DICOM (see :func:`write_ophthalmic`)."""
        return write_ophthalmic(self, folder, **options)


# ---------------------------------------------------------------------------------------------
# OCT


def _ellipse(
    shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Soft-edged ellipse weights in a local window, and the window (j0, j1, i0, i1)."""
    j0, j1 = max(int(cy - ry - 2), 0), min(int(cy + ry + 3), shape[0])
    i0, i1 = max(int(cx - rx - 2), 0), min(int(cx + rx + 3), shape[1])
    jj, ii = np.mgrid[j0:j1, i0:i1]
    d = np.sqrt(((jj - cy) / max(ry, 0.5)) ** 2 + ((ii - cx) / max(rx, 0.5)) ** 2)
    return np.clip((1.0 - d) * max(ry, rx) + 0.5, 0.0, 1.0), (j0, j1, i0, i1)


def oct_volume(
    grade: int,
    seed: int = 0,
    *,
    frames: int = 25,
    rows: int = 128,
    columns: int = 128,
    width_mm: float = 6.0,
    depth_mm: float = 2.0,
    speckle: float = 2.0,
    noise: float = 0.015,
    blur: int = 1,
    gain: float | None = None,
    gamma: float = 1.0,
) -> RetinaPhantom:
    """A macular OCT cube (``frames`` B-scans of ``rows`` depth x ``columns`` lateral pixels).

    How the device renders it (what differs between vendors and settings, so that a model can be
    trained and tested across them): ``speckle`` is the speckle's gamma shape (smaller: coarser),
    ``noise`` the additive noise's standard deviation (of a reflectivity of 0..1), ``blur`` the
    lateral blur's half-width in pixels, ``gain`` the signal's gain (None: drawn 0.85-1.15) and
    ``gamma`` the display gamma after log compression. Lesions keep their size in mm: their
    pixel sizes scale with ``rows`` and ``columns`` (given for 128 x 128)."""
    if grade not in range(5):
        raise ValueError(f"grade must be 0 to 4 (ICDR), not {grade!r}")
    if speckle <= 0 or noise < 0 or blur < 0 or gamma <= 0 or (gain is not None and gain <= 0):
        raise ValueError(
            f"speckle, gamma and gain must be > 0, noise and blur >= 0; got speckle={speckle}, "
            f"noise={noise}, blur={blur}, gain={gain}, gamma={gamma}"
        )
    rng = np.random.default_rng(seed)
    sz, sx = rows / 128, columns / 128  # pixels per pixel of the 128 x 128 cube lesions are for
    dx, dz = width_mm / columns, depth_mm / rows
    dy = width_mm / frames if frames > 1 else 0.0
    x = (np.arange(columns) - (columns - 1) / 2) * dx
    y = (np.arange(frames) - (frames - 1) / 2) * dy
    fx, fy = rng.uniform(-0.3, 0.3, 2) if frames > 1 else (rng.uniform(-0.3, 0.3), 0.0)
    xx = x[None, :] - fx
    yy = y[:, None] - fy
    r2 = xx**2 + yy**2
    zone_mm = 1.3 + 0.15 * grade + rng.uniform(0.0, 0.3)
    in_zone = np.abs(y - fy) < zone_mm if grade > 0 else np.zeros(frames, bool)
    thick = (0.0, 0.0, 0.3, 0.5, 0.6)[grade] * rng.uniform(0.85, 1.15)
    zone_w = np.clip((zone_mm - np.abs(yy)) / 0.3, 0, 1) * np.exp(-(xx**2) / (2 * 1.8**2))

    # boundaries in mm of depth, [frame, column]
    rpe = 1.35 + rng.uniform(-0.1, 0.1) + 0.05 * (xx / 3) ** 2 + rng.uniform(-0.02, 0.02) * xx
    rpe = np.broadcast_to(rpe, (frames, columns))
    thickness = (0.30 - 0.17 * np.exp(-r2 / (2 * 0.45**2))) * (1 + thick * zone_w)
    ilm = rpe - thickness
    inner = 1 - np.exp(-r2 / (2 * 0.5**2))  # inner layers vanish in the foveal pit
    b_rnfl = ilm + 0.045 * inner * (1 + 0.5 * np.clip(-xx / 3, 0, 1))
    b_ipl = b_rnfl + 0.075 * inner
    b_inl = b_ipl + 0.035 * inner
    b_opl = b_inl + 0.03 * inner
    b_elm = rpe - 0.06
    b_ez = rpe - 0.035
    b_rpe = rpe + 0.03
    z = (np.arange(rows) * dz)[None, :, None]

    def between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (z >= a[:, None, :]) & (z < b[:, None, :])

    refl = np.full((frames, rows, columns), 0.04, dtype=np.float32)
    layers = (
        (ilm, b_rnfl, 0.80), (b_rnfl, b_ipl, 0.50), (b_ipl, b_inl, 0.24),
        (b_inl, b_opl, 0.55), (b_opl, b_elm, 0.18), (b_elm, b_ez, 0.30),
        (b_ez, rpe, 0.85), (rpe, b_rpe, 1.0),
    )  # fmt: skip
    for a, b, value in layers:
        refl[between(a, b)] = value
    elm_line = np.abs(z - (b_elm[:, None, :] + 0.005)) < dz * 0.6
    refl[elm_line] = 0.45
    choroid = z >= b_rpe[:, None, :]
    depth_below = z - b_rpe[:, None, :]
    refl = np.where(choroid, 0.5 * np.exp(-np.maximum(depth_below, 0) / 0.35), refl)
    # choroidal vessels: dark lumens
    for _ in range(int(columns / 10)):
        cx = rng.uniform(0, columns)
        ci = int(np.clip(cx, 0, columns - 1))
        for k in range(frames):
            cz = (b_rpe[k, ci] + rng.uniform(0.06, 0.2)) / dz
            w, (j0, j1, i0, i1) = _ellipse(
                (rows, columns), cz, cx, rng.uniform(2, 4) * sz, rng.uniform(3, 6) * sx
            )
            refl[k, j0:j1, i0:i1] *= 1 - 0.45 * w

    lesions: list[Lesion] = []
    frame_grades = tuple(int(grade) if in_zone[k] else 0 for k in range(frames))
    col_lo, col_hi = np.searchsorted(x - fx, -2.2), np.searchsorted(x - fx, 2.2)
    exudates = grade >= 1 and (grade == 1 or rng.random() < 0.85)
    cysts = grade >= 3 or (grade == 2 and rng.random() < 0.75)
    for k in map(int, np.flatnonzero(in_zone)):  # the frames in the disease zone
        if thick > 0:
            band = np.flatnonzero(zone_w[k] > 0.3)
            if band.size:
                j0 = int(ilm[k, band].min() / dz)
                j1 = int(np.ceil(rpe[k, band].max() / dz)) + 1
                lesions.append(
                    Lesion("retinal_thickening", (k, k + 1, j0, j1, band[0], band[-1] + 1))
                )
        if cysts:
            count = int(rng.integers(*((1, 3), (2, 5), (2, 5))[grade - 2]))
            size = ((2.5, 4.0), (3.5, 6.5), (4.5, 7.5))[grade - 2]
            for _ in range(count):
                cx = rng.uniform(col_lo + 6 * sx, col_hi - 6 * sx)
                ci = int(cx)
                top, bottom = b_ipl[k, ci] / dz, b_elm[k, ci] / dz
                ry = min(rng.uniform(*size) * 0.7 * sz, max((bottom - top) / 2 - sz, 1.5 * sz))
                rx = ry * rng.uniform(1.0, 1.8) * sx / sz
                cy = rng.uniform(top + ry + 0.5, max(bottom - ry - 0.5, top + ry + 0.6))
                w, (j0, j1, i0, i1) = _ellipse((rows, columns), cy, cx, ry, rx)
                refl[k, j0:j1, i0:i1] = refl[k, j0:j1, i0:i1] * (1 - w) + 0.02 * w
                lesions.append(Lesion("intraretinal_fluid", (k, k + 1, j0, j1, i0, i1)))
        if exudates:
            count = int(rng.integers(*((2, 5), (1, 4), (2, 5), (2, 5))[grade - 1]))
            for _ in range(count):
                cx = rng.uniform(col_lo + 4 * sx, col_hi - 4 * sx)
                ci = int(cx)
                cy = rng.uniform(b_inl[k, ci] / dz, b_elm[k, ci] / dz - sz)
                ry, rx = rng.uniform(2.0, 3.0) * sz, rng.uniform(2.5, 4.0) * sx
                w, (j0, j1, i0, i1) = _ellipse((rows, columns), cy, cx, ry, rx)
                refl[k, j0:j1, i0:i1] = np.maximum(refl[k, j0:j1, i0:i1], 1.0 * w)
                shadow = (
                    slice(j1, rows),
                    slice(max(int(cx - rx), 0), min(int(cx + rx) + 1, columns)),
                )
                refl[k][shadow] *= 0.45
                lesions.append(Lesion("exudates", (k, k + 1, j0, j1, i0, i1)))
        if grade == 4:
            span = int(columns * rng.uniform(0.3, 0.6))
            start = int(rng.uniform(col_lo, max(col_hi - span, col_lo + 1)))
            cols = np.arange(start, min(start + span, columns))
            lift = rng.uniform(3, 8) + 3 * np.sin(np.linspace(0, rng.uniform(2, 6), cols.size))
            top = ilm[k, cols] / dz - lift * sz
            for offset in range(int(rng.integers(2, 4)) * max(round(sz), 1)):
                jj = np.clip(np.rint(top + offset).astype(int), 0, rows - 1)
                refl[k, jj, cols] = 0.9
            dots = rng.integers(10, 25)
            dj = rng.uniform(2, np.maximum(top.min() - 2, 3), dots).astype(int)
            di = rng.integers(0, columns, dots)
            refl[k, dj, di] = 0.7
            j0 = max(int(top.min()) - 1, 0)
            box = (k, k + 1, j0, int(top.max()) + 4, int(cols[0]), int(cols[-1]) + 1)
            lesions.append(Lesion("preretinal_proliferation", box))

    # speckle (multiplicative, fully developed), a little lateral blur, log compression
    grains = rng.gamma(speckle, 1.0 / speckle, refl.shape).astype(np.float32)
    signal = refl * grains + rng.normal(0, noise, refl.shape).astype(np.float32)
    if blur:
        blurred = signal.copy()
        for d in range(1, blur + 1):
            blurred += np.roll(signal, d, axis=2) + np.roll(signal, -d, axis=2)
        signal = blurred / (2 * blur + 1)
    drawn_gain = rng.uniform(0.85, 1.15)
    image = np.log1p(60 * np.clip(signal * (drawn_gain if gain is None else gain), 0, None))
    image = (image / np.log1p(60)) ** gamma
    array = np.clip(image * 235 + rng.uniform(0, 12), 0, 255).astype(np.uint8)
    return RetinaPhantom(
        "OPT", array, RetinaTruth(int(grade), frame_grades, tuple(lesions)), (dz, dx), dy,
        seed=seed, laterality="R" if seed % 2 == 0 else "L",
        extra={"zone_mm": float(zone_mm), "thickening": float(thick)},
    )  # fmt: skip


#: the OCT acquisition settings training draws from (domain randomisation): frame counts, B-scan
#: shapes (depth x lateral), speckle shape, noise, lateral blur, gain and gamma; a benchmark of
#: generalisation draws its settings outside these or from seeds training never used
OCT_TRAINING_RANGES: dict[str, tuple[float, float]] = {
    "frames": (16, 64),
    "rows": (96, 256),
    "columns": (128, 512),
    "speckle": (1.3, 3.5),
    "noise": (0.005, 0.04),
    "blur": (0, 2),
    "gain": (0.6, 1.5),
    "gamma": (0.7, 1.4),
}


def random_oct_settings(
    rng: np.random.Generator, ranges: dict[str, tuple[float, float]] | None = None
) -> dict[str, Any]:
    """Keyword arguments of :func:`oct_volume` drawn uniformly within ``ranges`` (default
    :data:`OCT_TRAINING_RANGES`): integers for counts and sizes, gain and gamma log-uniform."""
    ranges = OCT_TRAINING_RANGES if ranges is None else ranges
    out: dict[str, Any] = {}
    for key, (low, high) in ranges.items():
        if key in ("frames", "rows", "columns", "blur"):
            out[key] = int(rng.integers(int(low), int(high) + 1))
        elif key in ("gain", "gamma"):
            out[key] = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        else:
            out[key] = float(rng.uniform(low, high))
    return out


# ---------------------------------------------------------------------------------------------
# Fundus photographs


@lru_cache(maxsize=4)
def _retina(size: int) -> np.ndarray:
    """scikit-image's retina.jpg (a real fundus photograph) at ``size`` pixels, float 0..1."""
    from skimage import data
    from skimage.transform import resize

    return resize(data.retina(), (size, size), anti_aliasing=True).astype(np.float32)


def _blend(
    image: np.ndarray, cy: float, cx: float, ry: float, rx: float, colour: Sequence[float],
    opacity: float, angle: float = 0.0, soft: float = 1.0,
) -> tuple[int, int, int, int]:  # fmt: skip
    """Paint a soft ellipse of ``colour`` (rotated by ``angle``); returns its box."""
    size = image.shape[0]
    reach = max(ry, rx) + 2 * soft + 1
    j0, j1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
    i0, i1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
    if j1 <= j0 or i1 <= i0:
        return (j0, j0, i0, i0)
    jj, ii = np.mgrid[j0:j1, i0:i1]
    c, s = math.cos(angle), math.sin(angle)
    u = ((ii - cx) * c + (jj - cy) * s) / rx
    v = (-(ii - cx) * s + (jj - cy) * c) / ry
    d = np.sqrt(u**2 + v**2)
    alpha = np.clip((1 - d) * min(rx, ry) / soft + 0.5, 0, 1)[..., None] * opacity
    patch = image[j0:j1, i0:i1]
    patch[...] = patch * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    inside = np.argwhere(alpha[..., 0] > 0.2)
    if inside.size == 0:
        return (j0, j0, i0, i0)
    (a0, b0), (a1, b1) = inside.min(0), inside.max(0)
    return (j0 + int(a0), j0 + int(a1) + 1, i0 + int(b0), i0 + int(b1) + 1)


def fundus_photo(grade: int, seed: int = 0, *, size: int = 384) -> RetinaPhantom:
    """A colour fundus photograph (``size`` x ``size``) with lesions of ``grade``."""
    from scipy import ndimage
    from skimage.transform import SimilarityTransform, warp

    if grade not in range(5):
        raise ValueError(f"grade must be 0 to 4 (ICDR), not {grade!r}")
    rng = np.random.default_rng(seed)
    base = _retina(size)
    flip = bool(rng.random() < 0.5)
    if flip:  # the other eye
        base = base[:, ::-1]
    centre = (size - 1) / 2
    scale = rng.uniform(0.95, 1.08)
    angle = math.radians(rng.uniform(-12, 12))
    shift = rng.uniform(-0.03, 0.03, 2) * size
    to_centre = SimilarityTransform(translation=(-centre, -centre))
    turn = SimilarityTransform(scale=scale, rotation=angle)
    back = SimilarityTransform(translation=(centre + shift[0], centre + shift[1]))
    forward = to_centre + turn + back  # source -> output
    image = warp(base, forward.inverse, order=1, mode="constant", cval=0.0).astype(np.float32)
    gains = rng.uniform(0.9, 1.1, 3) * rng.uniform(0.85, 1.15)
    image = np.clip(image * gains, 0, 1) ** rng.uniform(0.85, 1.2)
    luminance = image.mean(-1)
    fov = ndimage.binary_erosion(luminance > 0.06, iterations=max(size // 24, 1))
    disc_col = 68 / 384 * size if not flip else size - 1 - 68 / 384 * size
    disc = forward(np.array([[disc_col, 179 / 384 * size]]))[0]  # (x, y)
    s = size / 384  # lesion sizes are given for a 384-pixel photograph

    def spot(quadrant: int | None = None) -> tuple[float, float]:
        for _ in range(200):
            cy, cx = rng.uniform(0, size, 2)
            if quadrant is not None and ((cy < centre) * 2 + (cx < centre)) != quadrant:
                continue
            if fov[int(cy), int(cx)] and math.hypot(cx - disc[0], cy - disc[1]) > 40 * s:
                return float(cy), float(cx)
        return centre, centre

    lesions: list[Lesion] = []

    def add(kind: str, box: tuple[int, int, int, int]) -> None:
        if box[1] > box[0] and box[3] > box[2]:
            lesions.append(Lesion(kind, (0, 1, *box)))

    def microaneurysms(count: int) -> None:
        for _ in range(count):
            cy, cx = spot()
            r = rng.uniform(2.8, 3.8) * s
            add("microaneurysms", _blend(image, cy, cx, r, r, (0.38, 0.04, 0.03), 0.95, soft=0.6))

    def haemorrhages(count: int, quadrants: bool = False) -> None:
        for n in range(count):
            cy, cx = spot(n % 4 if quadrants else None)
            ry, rx = rng.uniform(3.5, 8.0, 2) * s
            flame = rng.random() < 0.3
            if flame:
                rx, ry = rx * 1.8, ry * 0.5
            colour = (0.32 + rng.uniform(-0.04, 0.04), 0.03, 0.02)
            box = _blend(image, cy, cx, ry, rx, colour, rng.uniform(0.8, 0.95),
                         rng.uniform(0, math.pi), soft=1.2)  # fmt: skip
            add("haemorrhages", box)

    def exudates(clusters: int) -> None:
        for _ in range(clusters):
            cy, cx = spot()
            boxes = []
            for _ in range(int(rng.integers(3, 9))):
                oy, ox = rng.normal(0, 7 * s, 2)
                r = rng.uniform(1.8, 3.8) * s
                boxes.append(_blend(image, cy + oy, cx + ox, r, r * rng.uniform(0.8, 1.4),
                                    (0.97, 0.88, 0.42), 0.95, soft=0.5))  # fmt: skip
            box = np.array([b for b in boxes if b[1] > b[0]])
            if box.size:
                add(
                    "hard_exudates",
                    (box[:, 0].min(), box[:, 1].max(), box[:, 2].min(), box[:, 3].max()),
                )

    def cotton_wool(count: int) -> None:
        for _ in range(count):
            cy, cx = spot()
            ry, rx = rng.uniform(6, 11, 2) * s
            box = _blend(image, cy, cx, ry, rx, (0.93, 0.87, 0.74), rng.uniform(0.65, 0.85),
                         rng.uniform(0, math.pi), soft=3.0 * s)  # fmt: skip
            add("cotton_wool_spots", box)

    def neovascularisation(clusters: int) -> None:
        for _ in range(clusters):
            near_disc = rng.random() < 0.5
            if near_disc:
                cy, cx = disc[1] + rng.uniform(-25, 25) * s, disc[0] + rng.uniform(-25, 25) * s
            else:
                cy, cx = spot()
            points = []
            for _ in range(int(rng.integers(8, 14))):
                py, px = cy + rng.normal(0, 8 * s), cx + rng.normal(0, 8 * s)
                heading = rng.uniform(0, 2 * math.pi)
                for _ in range(int(rng.integers(12, 26))):
                    heading += rng.normal(0, 0.45)
                    py += math.sin(heading) * 1.2 * s
                    px += math.cos(heading) * 1.2 * s
                    if 0 <= py < size and 0 <= px < size:
                        r = 1.6 * s
                        _blend(image, py, px, r, r, (0.55, 0.06, 0.06), 0.8, soft=0.5)
                        points.append((py, px))
            if points:
                p = np.array(points)
                box = (int(p[:, 0].min() - 2), int(p[:, 0].max() + 3), int(p[:, 1].min() - 2),
                       int(p[:, 1].max() + 3))  # fmt: skip
                y0, y1, x0, x1 = (int(np.clip(v, 0, size)) for v in box)
                add("neovascularisation", (y0, y1, x0, x1))

    if grade >= 1:
        microaneurysms(int(rng.integers(*((5, 11), (6, 15), (10, 20), (8, 18))[grade - 1])))
    if grade == 2:
        present = rng.random(3) < (0.85, 0.7, 0.35)
        if not present.any():
            present[0] = True
        if present[0]:
            haemorrhages(int(rng.integers(2, 7)))
        if present[1]:
            exudates(int(rng.integers(1, 4)))
        if present[2]:
            cotton_wool(int(rng.integers(1, 3)))
    if grade >= 3:
        haemorrhages(int(rng.integers(20, 32)) if grade == 3 else int(rng.integers(6, 28)),
                     quadrants=grade == 3)  # fmt: skip
        if rng.random() < 0.8:
            exudates(int(rng.integers(2, 6)))
        if rng.random() < 0.85:
            cotton_wool(int(rng.integers(2, 6)))
    if grade == 4:
        neovascularisation(int(rng.integers(1, 4)))
        if rng.random() < 0.6:  # boat-shaped, in front of the retina
            cy, cx = spot()
            ry, rx = rng.uniform(9, 15) * s, rng.uniform(14, 24) * s
            add("preretinal_haemorrhage", _blend(image, cy, cx, ry, rx, (0.42, 0.04, 0.03), 0.92))
    image = image + rng.normal(0, 0.01, image.shape).astype(np.float32)
    image *= (luminance > 0.02)[..., None]
    array = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)[None]
    return RetinaPhantom(
        "OP", array, RetinaTruth(int(grade), (int(grade),), tuple(lesions)),
        (12.0 / size, 12.0 / size), 0.0, seed=seed, laterality="L" if flip else "R",
    )  # fmt: skip


def retina_phantom(modality: Kind, grade: int, seed: int = 0, **options: int) -> RetinaPhantom:
    """An OCT volume (``OPT``) or a fundus photograph (``OP``) of one grade."""
    if modality == "OPT":
        return oct_volume(grade, seed, **options)
    if modality == "OP":
        return fundus_photo(grade, seed, **options)
    raise ValueError(f"modality must be 'OPT' or 'OP', not {modality!r}")


# ---------------------------------------------------------------------------------------------
# DICOM


def _jpeg(frame: np.ndarray) -> bytes:
    """One RGB frame as a baseline JPEG (4:2:2 chroma), as fundus cameras store them."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buffer, "JPEG", quality=95, subsampling=1)
    return buffer.getvalue()


def write_ophthalmic(
    phantom: RetinaPhantom,
    folder: Path | str,
    *,
    multiframe: bool = True,
    positions: bool = True,
    jpeg: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient: tuple[str, str] = ("Phantom^Retina", "PHANTOM-EYE"),
) -> list[Path]:
    """Write a phantom as Ophthalmic Tomography (OPT) or Ophthalmic Photography 8 Bit (OP).

    ``multiframe``: all frames in one object (else one object per frame, each with one frame);
    ``positions``: per-frame Plane Position / shared Plane Orientation (Patient) in a nominal eye
    frame (without them a loader has only Pixel Measures); ``jpeg``: colour frames as baseline
    JPEG, YBR_FULL_422 (OP only).
    """
    array = np.ascontiguousarray(phantom.array)
    colour = array.ndim == 4
    if jpeg and not colour:
        raise ValueError("jpeg=True needs a colour (RGB) phantom")
    oct_ = phantom.modality == "OPT"
    sop_class = OPHTHALMIC_TOMOGRAPHY_STORAGE if oct_ else OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE
    study_uid = study_uid or uid_from(phantom.seed, phantom.modality, "retina-study")
    series_uid = series_uid or series_uid_for(study_uid, phantom.seed, phantom.modality)
    header = SeriesHeader(
        study_uid,
        series_uid,
        phantom.modality,
        "Macular cube OCT" if oct_ else "Colour fundus photograph",
        patient,
        study_description="Phantom retina",
        body_part="EYE",
    )
    frames, rows, columns = array.shape[:3]
    groups = [list(range(frames))] if multiframe else [[k] for k in range(frames)]
    photometric = ("YBR_FULL_422" if jpeg else "RGB") if colour else "MONOCHROME2"
    row_mm, col_mm = phantom.pixel_mm

    def objects() -> Iterator[Dataset]:
        for number, members in enumerate(groups, start=1):
            instance = uid_from(series_uid, phantom.seed, number, len(groups))
            ds = header.instance(sop_class, instance, number)
            ds.ImageLaterality = phantom.laterality
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.AcquisitionDateTime = "20260101120000"
            ds.BurnedInAnnotation = "NO"
            image_pixel(ds, rows, columns, bits_stored=8, bits_allocated=8, photometric=photometric)
            if oct_:
                _oct_frames(ds, phantom, members, positions)
            else:
                ds.PixelSpacing = decimals([row_mm, col_mm])
                if len(members) > 1:
                    ds.NumberOfFrames = len(members)
            pixels = array[members]
            if jpeg:
                ds.LossyImageCompression = "01"
                ds.LossyImageCompressionMethod = "ISO_10918_1"
                set_pixels(ds, [_jpeg(frame) for frame in pixels], JPEGBaseline8Bit)
            else:
                set_pixels(ds, pixels)
            yield ds

    return write_series(objects(), folder)


def _oct_frames(ds: Dataset, phantom: RetinaPhantom, members: list[int], positions: bool) -> None:
    """The multi-frame functional groups of OCT B-scans: pixel measures, and (``positions``)
    plane orientation and per-frame positions in a nominal eye frame."""
    frames, _, columns = phantom.array.shape[:3]
    row_mm, col_mm = phantom.pixel_mm
    ds.NumberOfFrames = len(members)
    shared = item(
        PixelMeasuresSequence=seq(
            PixelSpacing=decimals([row_mm, col_mm]),
            SliceThickness=decimal(phantom.frame_mm or row_mm),
        )
    )
    if positions:
        # rows run posterior (depth), columns to the patient's left, B-scans superior
        orientation = decimals([1, 0, 0, 0, 1, 0])
        shared.PlaneOrientationSequence = seq(ImageOrientationPatient=orientation)
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in members:
        content = seq(StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1])
        frame = item(FrameContentSequence=content)
        if positions:
            origin = [-(columns - 1) / 2 * col_mm, 0.0, (k - (frames - 1) / 2) * phantom.frame_mm]
            frame.PlanePositionSequence = seq(ImagePositionPatient=decimals(origin))
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = per_frame


__all__ = [
    "FUNDUS_LESIONS",
    "OCT_LESIONS",
    "OCT_TRAINING_RANGES",
    "OTHER_SIGNS",
    "Lesion",
    "RetinaPhantom",
    "RetinaTruth",
    "fundus_photo",
    "oct_volume",
    "random_oct_settings",
    "retina_phantom",
    "write_ophthalmic",
]
