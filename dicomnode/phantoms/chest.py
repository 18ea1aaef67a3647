"""Synthetic chest CT with nodules at known places, written as real DICOM with the truth beside it.

Used by the tests, the lung nodule model's train.py, the demo and the benchmarks. The anatomy is
drawn in patient coordinates, so axial, feet-first and oblique grids all show the same chest, and
the truth (nodule centres in patient mm) holds whatever grid, slice order or file layout is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from dicomnode.imaging.geometry import Geometry
from dicomnode.phantoms.grids import Orientation, phantom_geometry, triple
from dicomnode.phantoms.writer import series_uid_for, study_uid_for, write_volume

NoduleKind = Literal["solid", "ground_glass"]

#: Mean HU of each tissue; noise is added on top.
HU = {
    "air": -1000.0,
    "fat": -90.0,
    "soft": 40.0,
    "lung": -850.0,
    "vessel": 40.0,
    "bone": 400.0,
    "solid": 40.0,
    "ground_glass": -500.0,
}


@dataclass(frozen=True)
class Nodule:
    """A nodule to draw: its centre in patient mm, or as a voxel (i, j, k) of the phantom grid."""

    diameter_mm: float
    kind: NoduleKind = "solid"
    center_mm_patient: tuple[float, float, float] | None = None
    center_voxel: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not 3.0 <= self.diameter_mm <= 30.0:
            raise ValueError(f"nodule diameter must be 3 to 30 mm, not {self.diameter_mm}")
        if self.kind not in ("solid", "ground_glass"):
            raise ValueError(f"nodule kind must be solid or ground_glass, not {self.kind!r}")
        if (self.center_mm_patient is None) == (self.center_voxel is None):
            raise ValueError("give a nodule exactly one of center_mm_patient and center_voxel")

    def center(self, geometry: Geometry) -> np.ndarray:
        """Centre in patient mm."""
        if self.center_mm_patient is not None:
            return np.asarray(self.center_mm_patient, dtype=float)
        return geometry.voxel_to_patient(np.asarray(self.center_voxel, dtype=float))


@dataclass(frozen=True)
class NoduleTruth:
    """One drawn nodule, as a detector should report it."""

    center_mm: tuple[float, float, float]
    center_voxel: tuple[float, float, float]  # (i, j, k) on the phantom's grid
    diameter_mm: float
    volume_mm3: float
    kind: str
    label: int  # its value in ChestPhantom.nodule_labels


@dataclass(frozen=True)
class Truth:
    """What a phantom holds; saved as truth.json beside its series."""

    nodules: tuple[NoduleTruth, ...]
    study_instance_uid: str = ""
    series_instance_uid: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Truth:
        data = json.loads(text)
        nodules = tuple(
            NoduleTruth(
                **{
                    **n,
                    "center_mm": tuple(n["center_mm"]),
                    "center_voxel": tuple(n["center_voxel"]),
                }
            )
            for n in data.pop("nodules")
        )
        return cls(nodules=nodules, **data)

    def save(self, folder: Path | str) -> Path:
        path = Path(folder) / "truth.json"
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: Path | str) -> Truth:
        """From truth.json or the folder holding it."""
        path = Path(path)
        return cls.from_json((path / "truth.json" if path.is_dir() else path).read_text())


@dataclass(frozen=True, eq=False)
class ChestPhantom:
    """A chest CT in HU on its grid, its masks and its truth."""

    array: np.ndarray  # float32 HU, (slices, rows, columns)
    geometry: Geometry
    truth: Truth
    lung_mask: np.ndarray  # bool
    nodule_labels: np.ndarray  # uint16: 0 background, n for truth.nodules[n - 1]
    orientation: str = "axial"
    seed: int = 0
    nodules: tuple[Nodule, ...] = field(default=())

    def write(self, folder: Path | str, **options: Any) -> list[Path]:
        """Write the series (``write_volume`` options) and truth.json; return the DICOM paths."""
        options.setdefault("seed", self.seed)
        options.setdefault("patient_position", "FFS" if self.orientation == "feet_first" else "HFS")
        study_uid = str(options.pop("study_uid", None) or study_uid_for(self.seed))
        description = str(options.get("series_description", "Phantom chest CT"))
        series_uid = str(
            options.pop("series_uid", None) or series_uid_for(study_uid, self.seed, description)
        )
        paths = write_volume(
            self.array,
            self.geometry,
            folder,
            study_uid=study_uid,
            series_uid=series_uid,
            **options,
        )
        truth = Truth(self.truth.nodules, study_uid, series_uid)
        truth.save(folder)
        return paths


class _Grid:
    """Patient coordinates of voxels relative to the grid's centre, made per box (float32)."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        slices, rows, columns = geometry.shape
        self.center = geometry.voxel_to_patient(np.array([columns - 1, rows - 1, slices - 1]) / 2)
        spacing = geometry.spacing
        self.width = min(columns * spacing[0], rows * spacing[1])
        self.height = slices * spacing[2]
        self.voxel = min(spacing)

    def box(self, lo: np.ndarray, hi: np.ndarray, pad_mm: float) -> tuple[slice, ...] | None:
        """Array slices [k, j, i] covering the patient-space box lo..hi (relative) plus padding."""
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        ijk = self.geometry.patient_to_voxel(corners + self.center)
        pad = pad_mm / np.array(self.geometry.spacing) + 1
        start = np.floor(ijk.min(axis=0) - pad).astype(int)
        stop = np.ceil(ijk.max(axis=0) + pad).astype(int) + 1
        shape = np.array(self.geometry.shape[::-1])
        start, stop = np.clip(start, 0, shape), np.clip(stop, 0, shape)
        if np.any(stop <= start):
            return None
        return (slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0]))

    def local(self, box: tuple[slice, ...]) -> list[np.ndarray]:
        """x, y, z (mm from the centre) of the voxels in an array box [k, j, i].

        Each broadcasts to the box; an axis a coordinate does not change along is left at size 1
        (on an axial grid x varies only with i), so whole-volume work stays cheap.
        """
        a = self.geometry.affine
        index = (
            np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :],
            np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None],
            np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None],
        )
        coordinates = []
        for axis in range(3):
            value: np.ndarray = np.full((1, 1, 1), a[axis, 3] - self.center[axis], dtype=np.float32)
            for m in range(3):
                if abs(a[axis, m]) > 1e-9:
                    value = value + np.float32(a[axis, m]) * index[m]
            coordinates.append(value)
        return coordinates


_SLAB = 16  # slices per step of whole-volume work, so temporaries stay small


def _anatomy(grid: _Grid, box: tuple[slice, ...], bones: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU and lung mask of a slab: air, body (fat rim, soft tissue), spine, ribs, two lungs."""
    shape = tuple(b.stop - b.start for b in box)
    x, y, z = grid.local(box)
    w, h = grid.width, grid.height
    body = np.square(x / np.float32(0.46 * w)) + np.square(y / np.float32(0.34 * w))
    tissue = np.where(body <= 0.85**2, HU["soft"], np.where(body <= 1, HU["fat"], HU["air"]))
    hu = np.array(np.broadcast_to(tissue.astype(np.float32), shape))
    if bones:
        shell = (body > 0.88**2) & (body < 0.93**2) & (y > -0.15 * w)
        ribs = shell & (np.cos(np.float32(2 * np.pi / 28.0) * z) > 0.55)
        spine = np.square(x / np.float32(0.055 * w)) + np.square((y - 0.24 * w) / (0.055 * w)) <= 1
        hu[np.broadcast_to(ribs | spine, shape)] = HU["bone"]
    lungs = np.zeros(shape, dtype=bool)
    across = np.square((y + np.float32(0.02 * w)) / np.float32(0.25 * w))
    along = np.square((z - np.float32(0.05 * h)) / np.float32(0.55 * h))
    for side in (-1.0, 1.0):
        lungs |= (
            np.square((x - np.float32(side * 0.21 * w)) / np.float32(0.16 * w)) + across + along
            <= 1
        )
    hu[lungs] = HU["lung"]
    return hu, lungs


def _segment_fraction(
    grid: _Grid, a: np.ndarray, b: np.ndarray, radius: float
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Partial-volume fraction of a tube from a to b (relative mm), inside its bounding box."""
    box = grid.box(np.minimum(a, b), np.maximum(a, b), radius + grid.voxel)
    if box is None:
        return None
    x, y, z = grid.local(box)
    d = b - a
    t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / d.dot(d), 0, 1)
    dist = np.sqrt(
        (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
    )
    return box, np.clip((radius - dist) / grid.voxel + 0.5, 0, 1)


def _blend(hu: np.ndarray, box: tuple[slice, ...], fraction: np.ndarray, value: float) -> None:
    region = hu[box]
    region += (value - region) * fraction


def _vessel_tree(
    rng: np.random.Generator, root: np.ndarray, heading: np.ndarray, length: float, radius: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Branching segments: each splits in two thinner, shorter, turned children."""
    segments = []
    stack = [(root, heading / np.linalg.norm(heading), length, radius, 0)]
    while stack:
        start, direction, size, r, depth = stack.pop()
        end = start + direction * size
        segments.append((start, end, r))
        if depth >= 5:
            continue
        for _ in range(2):
            turn = rng.normal(0, 0.6, 3)
            child = direction + turn - np.dot(turn, direction) * direction * 0.5
            stack.append((end, child / np.linalg.norm(child), size * 0.75, r * 0.75, depth + 1))
    return segments


def random_nodules(
    rng: np.random.Generator,
    lung_mask: np.ndarray,
    geometry: Geometry,
    n: int,
    sizes: tuple[float, float] = (3.0, 30.0),
    *,
    ground_glass_fraction: float = 0.3,
    margin_mm: float = 2.0,
    avoid: Sequence[tuple[np.ndarray, float]] = (),
) -> list[Nodule]:
    """``n`` nodules with diameters drawn from ``sizes`` (mm), wholly inside the lungs, apart.

    A nodule is kept only when points all round it at its radius plus ``margin_mm`` are in the lung
    mask and it keeps that margin from the others (and from ``avoid``: (centre mm, radius) pairs).
    """
    if n <= 0:
        return []
    candidates = np.flatnonzero(lung_mask)
    if candidates.size == 0:
        raise ValueError("the lung mask is empty: there is nowhere to place nodules")
    golden = np.pi * (3 - np.sqrt(5))
    count = 48
    z = np.linspace(1 - 1 / count, -1 + 1 / count, count)
    ring = np.sqrt(1 - z * z)
    sphere = np.stack(
        [ring * np.cos(golden * np.arange(count)), ring * np.sin(golden * np.arange(count)), z], 1
    )
    shape = np.array(lung_mask.shape)
    placed: list[tuple[np.ndarray, float]] = list(avoid)
    nodules = []
    diameters = sorted(rng.uniform(sizes[0], sizes[1], n), reverse=True)
    for diameter in diameters:
        radius = diameter / 2
        for _ in range(400):
            k, j, i = np.unravel_index(candidates[rng.integers(candidates.size)], lung_mask.shape)
            center = geometry.voxel_to_patient(np.array([i, j, k]) + rng.uniform(-0.5, 0.5, 3))
            points = np.vstack([center, center + sphere * (radius + margin_mm)])
            index = np.rint(geometry.patient_to_voxel(points)[:, ::-1]).astype(int)
            if np.any(index < 0) or np.any(index >= shape):
                continue
            if not lung_mask[index[:, 0], index[:, 1], index[:, 2]].all():
                continue
            if any(np.linalg.norm(center - c) < radius + r + margin_mm for c, r in placed):
                continue
            placed.append((center, radius))
            kind: NoduleKind = "ground_glass" if rng.random() < ground_glass_fraction else "solid"
            px, py, pz = (float(v) for v in center)
            nodules.append(Nodule(float(diameter), kind, center_mm_patient=(px, py, pz)))
            break
        else:
            raise ValueError(f"no room for a {diameter:.1f} mm nodule in the lungs of this grid")
    return nodules


def chest_ct(
    shape: tuple[int, int, int] = (100, 256, 256),
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.25),
    orientation: Orientation | ArrayLike = "axial",
    nodules: Sequence[Nodule] | int = (),
    seed: int = 0,
    *,
    sizes: tuple[float, float] = (3.0, 30.0),
    ground_glass_fraction: float = 0.3,
    vessels: bool = True,
    bones: bool = True,
    noise_hu: float = 10.0,
) -> ChestPhantom:
    """A chest: body with fat and soft tissue, two lungs with branching vessels, spine and ribs,
    and nodules (given, or ``nodules=n`` placed at random in the lungs), with noise.

    ``shape`` is (slices, rows, columns), ``spacing`` (column, row, slice) mm, ``orientation`` as
    for ``phantom_geometry``. The same seed gives the same phantom.
    """
    rng = np.random.default_rng(seed)
    geometry = phantom_geometry(shape, spacing, orientation)
    grid = _Grid(geometry)
    w = grid.width
    hu = np.empty(shape, dtype=np.float32)
    lung_mask = np.empty(shape, dtype=bool)
    box: tuple[slice, ...] | None
    for start in range(0, shape[0], _SLAB):
        box = (slice(start, min(start + _SLAB, shape[0])), slice(0, shape[1]), slice(0, shape[2]))
        hu[box], lung_mask[box] = _anatomy(grid, box, bones)

    if vessels:
        for side in (-1.0, 1.0):
            root = np.array([side * 0.10 * w, 0.0, 0.05 * grid.height])
            for _ in range(8):
                heading = np.array([side * 0.8, 0.0, 0.0]) + rng.normal(0, 0.7, 3)
                tree = _vessel_tree(rng, root, heading, 0.13 * w, min(3.0, 0.02 * w))
                for a, b, r in tree:
                    drawn = _segment_fraction(grid, a, b, r)
                    if drawn is not None:
                        box, f = drawn
                        _blend(hu, box, f * lung_mask[box], HU["vessel"])

    if isinstance(nodules, int):
        nodules = random_nodules(
            rng, lung_mask, geometry, nodules, sizes, ground_glass_fraction=ground_glass_fraction
        )
    labels = np.zeros(shape, dtype=np.uint16)
    truths = []
    for label, nodule in enumerate(nodules, start=1):
        center = nodule.center(geometry)
        local = center - grid.center
        radius = nodule.diameter_mm / 2
        box = grid.box(local, local, radius + grid.voxel)
        if box is None:
            raise ValueError(f"nodule at {center.round(1).tolist()} mm is outside the grid")
        nx, ny, nz = grid.local(box)
        dist = np.sqrt((nx - local[0]) ** 2 + (ny - local[1]) ** 2 + (nz - local[2]) ** 2)
        f = np.clip((radius - dist) / grid.voxel + 0.5, 0, 1)
        _blend(hu, box, f, HU[nodule.kind])
        labels[box][f >= 0.5] = label
        truths.append(
            NoduleTruth(
                center_mm=triple(round(float(v), 4) for v in center),
                center_voxel=triple(round(float(v), 4) for v in geometry.patient_to_voxel(center)),
                diameter_mm=float(nodule.diameter_mm),
                volume_mm3=round(math.pi / 6 * nodule.diameter_mm**3, 3),
                kind=nodule.kind,
                label=label,
            )
        )

    if noise_hu > 0:
        for start in range(0, shape[0], _SLAB):
            slab = hu[start : start + _SLAB]
            slab += rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(noise_hu)
    np.clip(hu, -1024, 3071, out=hu)
    return ChestPhantom(
        array=hu,
        geometry=geometry,
        truth=Truth(tuple(truths)),
        lung_mask=lung_mask,
        nodule_labels=labels,
        orientation=orientation if isinstance(orientation, str) else "custom",
        seed=seed,
        nodules=tuple(nodules),
    )


def chest_ct_with_room(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: Orientation | ArrayLike,
    count: int,
    seed: int,
    **options: Any,
) -> ChestPhantom:
    """:func:`chest_ct` with ``count`` nodules placed at random, or two fewer each time the
    lungs of a small grid have no room for them (four tries, at least one nodule), so a
    generator's random draws never fail on a crowded grid."""
    for attempt in range(4):
        try:
            return chest_ct(shape, spacing, orientation,
                            nodules=max(count - 2 * attempt, 1), seed=seed, **options)  # fmt: skip
        except ValueError:  # no room for that many nodules
            continue
    raise RuntimeError(f"chest phantom {seed}: no room for {count} nodules or fewer")
