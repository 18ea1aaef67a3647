"""Synthetic brain MRI studies with a tumor at a known place: T1, T1 post-contrast, T2, FLAIR.

Used by the brain tumor model's train.py, the demo, the tests and the benchmarks. The anatomy
(scalp, skull, CSF, grey and white matter, lateral ventricles) and the tumor (necrotic core,
enhancing rim, surrounding edema) are defined in patient coordinates, so each series can be
written on its own grid (axial, sagittal, tilted; any resolution and field of view) while sharing
one Frame of Reference, and the truth holds on every grid: :meth:`BrainPhantom.truth_on` samples
the tumor's sub-regions (1 necrotic core, 2 edema, 3 enhancing tumor, as the model labels them)
on any grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from dicomnode.imaging.geometry import Geometry
from dicomnode.imaging.volume import FrameRef, Volume
from dicomnode.phantoms.grids import rotation, triple
from dicomnode.phantoms.writer import (
    MR_IMAGE_STORAGE,
    frame_of_reference_for,
    series_uid_for,
    uid_from,
    write_volume,
)

CONTRASTS = ("T1c", "T1", "T2", "FLAIR")

# Tissue codes of :meth:`BrainPhantom.tissue`
AIR, SCALP, SKULL, CSF, GREY, WHITE, VENTRICLE, NECROSIS, EDEMA, ENHANCING = range(10)
#: tissue code -> the tumor label the model segments (0 elsewhere)
TUMOR_LABEL = np.zeros(10, dtype=np.uint8)
TUMOR_LABEL[[NECROSIS, EDEMA, ENHANCING]] = (1, 2, 3)

#: Signal of each tissue per contrast (arbitrary units, white matter's T1 = 700): fat-rich scalp
#: bright on T1, CSF bright on T2 and dark on FLAIR, edema bright on T2 and FLAIR, the rim
#: enhancing after gadolinium, the necrotic core dark on T1 and bright on T2.
SIGNAL: dict[str, tuple[float, ...]] = {
    #         air scalp skull  CSF  grey white vent necro edema enh
    "T1": (0, 900, 90, 220, 520, 700, 220, 260, 440, 480),
    "T1c": (0, 900, 90, 230, 540, 720, 230, 280, 460, 1250),
    "T2": (0, 600, 70, 1700, 950, 640, 1700, 1450, 1300, 1000),
    "FLAIR": (0, 500, 60, 140, 820, 600, 140, 450, 1350, 1000),
}


@dataclass(frozen=True)
class SeriesPlan:
    """One series to write: its contrast, description and grid."""

    contrast: str  # T1c, T1, T2 or FLAIR
    description: str
    orientation: str  # axial, sagittal, coronal, or axial tilted by ``tilt_deg`` about L-R
    spacing: tuple[float, float, float]  # (column, row, slice) mm
    fov_mm: tuple[float, float, float]  # extent along (column, row, slice)
    tilt_deg: float = 0.0
    protocol: str = ""
    sequence: str = ""

    def geometry(self, centre: ArrayLike) -> Geometry:
        """The grid centred on ``centre`` (patient LPS mm)."""
        if self.orientation == "axial":  # columns to the left, rows to the back, slices up
            direction = np.eye(3)
        elif self.orientation == "sagittal":  # columns to the back, rows down, slices right
            direction = np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])
        elif self.orientation == "coronal":  # columns left, rows down, slices to the back
            direction = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
        else:
            raise ValueError(
                f"orientation must be axial, sagittal or coronal, not {self.orientation!r}"
            )
        if self.tilt_deg:
            direction = rotation("x", self.tilt_deg) @ direction
        spacing = np.asarray(self.spacing, float)
        counts = np.maximum(1, np.rint(np.asarray(self.fov_mm, float) / spacing)).astype(int)
        half = (counts - 1) / 2 * spacing
        origin = np.asarray(centre, float) - direction @ half
        shape = (int(counts[2]), int(counts[1]), int(counts[0]))
        return Geometry.from_parts(origin, direction, tuple(spacing), shape)

    def scaled(self, factor: float) -> SeriesPlan:
        """The same series at ``factor`` times its voxel size (coarser: faster to make)."""
        return replace(self, spacing=triple(s * factor for s in self.spacing))


#: A routine brain tumor protocol: a 3D post-contrast T1, a sagittal T1 spin echo, and thick
#: axial T2 and (tilted, as planned along the AC-PC line) FLAIR, each with its own field of view.
STUDY: tuple[SeriesPlan, ...] = (
    SeriesPlan("T1", "SAG T1 SE", "sagittal", (1.0, 1.0, 3.0), (230, 200, 156),
               protocol="t1_se_sag", sequence="*se2d1"),
    SeriesPlan("T2", "AX T2 TSE", "axial", (0.9, 0.9, 3.0), (200, 230, 144),
               protocol="t2_tse_tra", sequence="*tse2d1_15"),
    SeriesPlan("FLAIR", "AX FLAIR", "axial", (1.0, 1.0, 3.0), (210, 240, 150), tilt_deg=12.0,
               protocol="t2_tirm_tra_dark-fluid", sequence="*tir2d1_16"),
    SeriesPlan("T1c", "AX T1 MPRAGE POST GD", "axial", (1.0, 1.0, 1.0), (190, 220, 150),
               protocol="t1_mprage_tra_iso", sequence="*tfl3d1"),
)  # fmt: skip


@dataclass(frozen=True)
class Tumor:
    """A tumor: its centre (patient mm), orientation and the radii of its three shells (mm).

    A point's distance from the centre is taken in the tumor's own (rotated, stretched) frame
    and divided by a smooth function of direction, so the shells are lumpy, not spheres.
    """

    centre: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]  # 3x3, columns the tumor's axes
    stretch: tuple[float, float, float]
    necrotic_mm: float  # 0: no necrotic core
    enhancing_mm: float
    edema_mm: float
    lumps: tuple[tuple[float, float, float, float], ...]  # (unit vector, amplitude) pairs
    edema_lumps: tuple[tuple[float, float, float, float], ...]

    def distances(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised distances (mm) of ``points`` (..., 3): for the core shells, for edema."""
        local = (points - np.asarray(self.centre, np.float32)) @ np.asarray(
            self.rotation, np.float32
        )
        local = local / np.asarray(self.stretch, np.float32)
        d = np.sqrt(np.sum(local * local, axis=-1))
        unit = local / np.maximum(d, 1e-6)[..., None]

        def modulation(lumps: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
            m = np.ones(d.shape, np.float32)
            for x, y, z, a in lumps:
                m += np.float32(a) * np.cos(
                    np.float32(2.0) * (unit @ np.array([x, y, z], np.float32))
                )
            return np.maximum(m, 0.5)

        return d / modulation(self.lumps), d / modulation(self.edema_lumps)


@dataclass(frozen=True)
class BrainTruth:
    """What a written study holds; saved as truth.json beside its series."""

    seed: int
    study_instance_uid: str
    frame_of_reference_uid: str
    series: Mapping[str, str]  # contrast -> Series Instance UID
    descriptions: Mapping[str, str]  # contrast -> Series Description
    tumor_centre_mm: tuple[float, float, float]
    volumes_mm3: Mapping[str, float]  # necrotic_core, edema, enhancing_tumor (1 mm grid)

    def save(self, folder: Path | str) -> Path:
        path = Path(folder) / "truth.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path | str) -> BrainTruth:
        """From truth.json or the folder holding it."""
        path = Path(path)
        data = json.loads((path / "truth.json" if path.is_dir() else path).read_text())
        data["tumor_centre_mm"] = tuple(data["tumor_centre_mm"])
        return cls(**data)


@dataclass(frozen=True)
class BrainStudy:
    """A written study: the DICOM files of each series (by contrast) and its truth."""

    folder: Path
    paths: Mapping[str, list[Path]]
    geometries: Mapping[str, Geometry]
    truth: BrainTruth


_SLAB = 8  # slices per step, so temporaries stay small


@dataclass(frozen=True, eq=False)
class BrainPhantom:
    """A head with a tumor, in patient coordinates; render it on any grid in any contrast."""

    seed: int
    centre: tuple[float, float, float]  # the head's centre, patient mm
    head: tuple[float, float, float]  # semi-axes of the scalp's outer surface (L, P, S), mm
    tumor: Tumor
    #: per contrast: signal scale (scanner gain), bias field gradient (per 100 mm along L, P, S)
    gain: Mapping[str, float] = field(default_factory=dict)
    bias: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    jitter: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # per-tissue factors
    noise: float = 0.03  # Rician noise sigma as a fraction of white matter's signal

    # -- anatomy -----------------------------------------------------------------------------

    def tissue(self, points: np.ndarray) -> np.ndarray:
        """The tissue code (AIR ... ENHANCING) at each patient point ``(..., 3)``."""
        p = np.asarray(points, np.float32) - np.asarray(self.centre, np.float32)
        a = np.asarray(self.head, np.float32)
        r = np.sqrt(np.sum(np.square(p / a), axis=-1))  # 1 on the scalp's outer surface
        out = np.zeros(p.shape[:-1], np.uint8)
        out[r <= 1.0] = SCALP
        out[r <= 0.93] = SKULL
        out[r <= 0.86] = CSF
        brain = r <= 0.82
        # a wavy cortex, 3 to 6 mm thick
        folds = (
            np.sin(p[..., 0] * np.float32(0.3))
            * np.sin(p[..., 1] * np.float32(0.27))
            * (np.sin(p[..., 2] * np.float32(0.33)))
        )
        cortex = brain & (r > np.float32(0.75) + np.float32(0.025) * folds)
        out[brain] = WHITE
        out[cortex] = GREY
        # two lateral ventricles either side of the midline
        for side in (-1.0, 1.0):
            v = (p - np.array([side * 0.11 * a[0], 0.02 * a[1], 0.15 * a[2]], np.float32)) / (
                np.array([0.09, 0.28, 0.14], np.float32) * a
            )
            out[brain & (np.sum(v * v, axis=-1) <= 1.0)] = VENTRICLE
        # the tumor, where it can reach (most of the head is not worth its distances)
        offset = np.asarray(points, np.float32) - np.asarray(self.tumor.centre, np.float32)
        near = brain & (np.sum(offset * offset, axis=-1) <= np.float32(self.tumor_reach_mm() ** 2))
        if not near.any():
            return out
        core, spread = self.tumor.distances(np.asarray(points, np.float32)[near])
        tissue = out[near]
        parenchyma = (tissue == WHITE) | (tissue == GREY)
        tissue[parenchyma & (spread <= self.tumor.edema_mm)] = EDEMA
        inside = core <= self.tumor.enhancing_mm
        tissue[inside] = ENHANCING
        tissue[inside & (core <= self.tumor.necrotic_mm)] = NECROSIS
        out[near] = tissue
        return out

    # -- grids -------------------------------------------------------------------------------

    @staticmethod
    def _points(geometry: Geometry, k: np.ndarray | float) -> np.ndarray:
        """Patient points ``[k, j, i, 3]`` of the voxels of slices ``k`` (may be fractional)."""
        _, rows, columns = geometry.shape
        kk = np.atleast_1d(np.asarray(k, np.float32))
        jj = np.arange(rows, dtype=np.float32)
        ii = np.arange(columns, dtype=np.float32)
        a = geometry.affine.astype(np.float32)
        return (
            a[:3, 2] * kk[:, None, None, None]
            + a[:3, 1] * jj[None, :, None, None]
            + a[:3, 0] * ii[None, None, :, None]
            + a[:3, 3]
        )

    def tissue_on(self, geometry: Geometry) -> np.ndarray:
        """Tissue codes at the voxel centres of ``geometry`` ``[k, j, i]``."""
        out = np.empty(geometry.shape, np.uint8)
        for start in range(0, geometry.shape[0], _SLAB):
            k = np.arange(start, min(start + _SLAB, geometry.shape[0]))
            out[k[0] : k[-1] + 1] = self.tissue(self._points(geometry, k))
        return out

    def truth_on(self, geometry: Geometry) -> np.ndarray:
        """The tumor's sub-regions on ``geometry`` ``[k, j, i]``: 1 necrotic core, 2 edema,
        3 enhancing tumor, 0 elsewhere (sampled at voxel centres)."""
        return TUMOR_LABEL[self.tissue_on(geometry)]

    def render(self, contrast: str, geometry: Geometry, *, seed: int | None = None) -> np.ndarray:
        """The image of one contrast on ``geometry`` (float32 ``[k, j, i]``): signal averaged
        through each slice's thickness (partial volume), a smooth bias field, Rician noise."""
        if contrast not in SIGNAL:
            raise ValueError(f"contrast must be one of {', '.join(SIGNAL)}, not {contrast!r}")
        jitter = np.asarray(self.jitter.get(contrast, (1.0,) * 10), np.float32)
        table = (
            np.asarray(SIGNAL[contrast], np.float32)
            * jitter
            * np.float32(self.gain.get(contrast, 1.0))
        )
        thickness = geometry.spacing[2]
        steps = min(max(1, math.ceil(thickness / 1.0)), 4)  # partial volume, roughly
        offsets = (np.arange(steps, dtype=np.float32) + 0.5) / steps - 0.5
        out = np.empty(geometry.shape, np.float32)
        for k in range(geometry.shape[0]):
            points = self._points(geometry, k + offsets)
            out[k] = table[self.tissue(points)].mean(axis=0)
        # bias field: exp of a linear gradient across the head
        bias = np.asarray(self.bias.get(contrast, (0.0, 0.0, 0.0)), np.float32) / 100.0
        for start in range(0, geometry.shape[0], _SLAB):
            ks = np.arange(start, min(start + _SLAB, geometry.shape[0]))
            p = self._points(geometry, ks) - np.asarray(self.centre, np.float32)
            out[ks[0] : ks[-1] + 1] *= np.exp(p @ bias)
        rng = np.random.default_rng(self.seed * 31 + CONTRASTS.index(contrast) if seed is None
                                    else seed)  # fmt: skip
        if self.noise > 0:
            sigma = np.float32(self.noise * SIGNAL[contrast][WHITE] * self.gain.get(contrast, 1))
            real = out + rng.standard_normal(out.shape, dtype=np.float32) * sigma
            imaginary = rng.standard_normal(out.shape, dtype=np.float32) * sigma
            out = np.sqrt(real * real + imaginary * imaginary)
        return out

    def tumor_reach_mm(self) -> float:
        """How far from its centre (mm) any part of the tumor, edema included, can reach."""
        lumps = 1.0 + sum(abs(a) for *_, a in self.tumor.edema_lumps)
        return self.tumor.edema_mm * lumps * max(self.tumor.stretch)

    def volumes_mm3(self, spacing: float = 1.0) -> dict[str, float]:
        """Each sub-region's volume, counted on an axial grid of ``spacing`` mm over the tumor
        (within the brain)."""
        brain = np.asarray(self.head) * 0.82
        centre = np.asarray(self.tumor.centre)
        lo = np.maximum(centre - self.tumor_reach_mm(), np.asarray(self.centre) - brain) - spacing
        hi = np.minimum(centre + self.tumor_reach_mm(), np.asarray(self.centre) + brain) + spacing
        counts = np.ceil((hi - lo) / spacing).astype(int)
        grid = Geometry.from_parts(
            lo, np.eye(3), (spacing, spacing, spacing), (counts[2], counts[1], counts[0])
        )
        labels = self.truth_on(grid)
        voxel = spacing**3
        names = ("necrotic_core", "edema", "enhancing_tumor")
        return {name: float((labels == v).sum() * voxel) for v, name in enumerate(names, 1)}

    def volumes(self, plans: Sequence[SeriesPlan] = STUDY) -> dict[str, Volume]:
        """The planned series as in-memory volumes by contrast, as ``load_series`` would give
        them from the written files (without the DICOM round trip: for training)."""
        out = {}
        for plan in plans:
            geometry = plan.geometry(self.centre)
            uid = uid_from(self.seed, plan.description, "series")
            frames = tuple(
                FrameRef(uid_from(uid, k), MR_IMAGE_STORAGE, None, "")
                for k in range(geometry.shape[0])
            )
            image = np.rint(np.clip(self.render(plan.contrast, geometry), 0, 4095))
            out[plan.contrast] = Volume(image.astype(np.float32), geometry, frames, "MR", uid)
        return out

    # -- DICOM -------------------------------------------------------------------------------

    def write(
        self,
        folder: Path | str,
        plans: Sequence[SeriesPlan] = STUDY,
        *,
        study_uid: str | None = None,
        patient: tuple[str, str] = ("Phantom^Brain", "PHANTOM-BRAIN"),
    ) -> BrainStudy:
        """Write each planned series as MR Image Storage files in ``folder/<contrast>/`` (one
        study, one Frame of Reference), and truth.json; the paths and the truth."""
        folder = Path(folder)
        study_uid = study_uid or uid_from(self.seed, "brain-phantom-study")
        frame_of_reference = frame_of_reference_for(study_uid)  # as write_volume sets it
        paths: dict[str, list[Path]] = {}
        geometries: dict[str, Geometry] = {}
        series: dict[str, str] = {}
        for number, plan in enumerate(plans, start=1):
            geometry = plan.geometry(self.centre)
            image = self.render(plan.contrast, geometry)
            series_uid = series_uid_for(study_uid, self.seed, plan.description)
            attributes: dict[str, object] = {
                "StudyDescription": "MR BRAIN WITH AND WITHOUT CONTRAST",
                "BodyPartExamined": "HEAD",
                "SeriesNumber": number,
                "ProtocolName": plan.protocol or plan.description,
                "SequenceName": plan.sequence,
                "ImageType": ["ORIGINAL", "PRIMARY", "M", "NORM"],
                "ScanningSequence": "GR" if "mprage" in plan.protocol else "SE",
                "SequenceVariant": "SP",
                "ScanOptions": "",
                "MRAcquisitionType": "3D" if plan.spacing[2] <= 1.0 else "2D",
                "MagneticFieldStrength": 3,
                "WindowCenter": int(np.percentile(image, 99) / 2),
                "WindowWidth": int(np.percentile(image, 99)),
            }
            if plan.contrast == "T1c":
                attributes["ContrastBolusAgent"] = "Gadobutrol"
            paths[plan.contrast] = write_volume(
                image,
                geometry,
                folder / plan.contrast,
                study_uid=study_uid,
                series_uid=series_uid,
                modality="MR",
                seed=self.seed,
                series_description=plan.description,
                unsigned=True,
                rescale=(1.0, 0.0),
                patient=patient,
                sop_class_uid=MR_IMAGE_STORAGE,
                attributes=attributes,
            )
            geometries[plan.contrast] = geometry
            series[plan.contrast] = series_uid
        truth = BrainTruth(
            seed=self.seed,
            study_instance_uid=study_uid,
            frame_of_reference_uid=frame_of_reference,
            series=series,
            descriptions={plan.contrast: plan.description for plan in plans},
            tumor_centre_mm=self.tumor.centre,
            volumes_mm3=self.volumes_mm3(),
        )
        truth.save(folder)
        return BrainStudy(folder, paths, geometries, truth)


def random_plans(
    rng: np.random.Generator, coarsen: tuple[float, float] = (1.0, 1.0)
) -> list[SeriesPlan]:
    """A random protocol: each contrast axial, sagittal or coronal (tilted up to 15 degrees),
    its own resolution (voxels ``coarsen`` times the usual) and field of view; descriptions
    from :data:`STUDY`."""
    plans = []
    for base in STUDY:
        orientation = str(rng.choice(["axial", "axial", "sagittal", "coronal"]))
        thin = base.contrast == "T1c" or rng.random() < 0.25
        pixel = float(rng.uniform(0.8, 1.2))
        thickness = float(rng.uniform(0.9, 1.3)) if thin else float(rng.uniform(2.5, 5.0))
        factor = float(rng.uniform(*coarsen))
        fov = triple(rng.uniform([190, 200, 140], [240, 250, 170]))
        if orientation == "sagittal":  # columns A-P, rows S-I, slices L-R
            fov = (fov[1], fov[2], fov[0])
        elif orientation == "coronal":  # columns L-R, rows S-I, slices A-P
            fov = (fov[0], fov[2], fov[1])
        plans.append(
            replace(
                base,
                orientation=orientation,
                spacing=(pixel * factor, pixel * factor, thickness * factor),
                fov_mm=fov,
                tilt_deg=float(rng.uniform(-15, 15)) if rng.random() < 0.5 else 0.0,
            )
        )
    return plans


def _lumps(rng: np.random.Generator, count: int, amplitude: float) -> tuple:
    vectors = rng.standard_normal((count, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    amplitudes = rng.uniform(-amplitude, amplitude, count)
    return tuple(
        (float(x), float(y), float(z), float(a))
        for (x, y, z), a in zip(vectors, amplitudes, strict=True)
    )


def brain_phantom(
    seed: int = 0,
    *,
    tumor_mm: tuple[float, float] = (9.0, 22.0),
    centre: tuple[float, float, float] = (0.0, 10.0, 40.0),
    noise: float = 0.03,
) -> BrainPhantom:
    """A random head (size within 8 %) with a tumor at a random place in the brain: enhancing
    radius drawn from ``tumor_mm``, a necrotic core (in most) of 35 to 70 % of it, edema 4 to
    20 mm beyond it; random scanner gain, tissue contrast (within 8 %) and bias per series. The
    same seed gives the same phantom."""
    rng = np.random.default_rng(seed)
    head = triple(np.array([75.0, 95.0, 72.0]) * rng.uniform(0.92, 1.08, 3))
    enhancing = float(rng.uniform(*tumor_mm))
    necrotic = enhancing * float(rng.uniform(0.35, 0.7)) if rng.random() < 0.85 else 0.0
    edema = enhancing + float(rng.uniform(4.0, 20.0))
    brain = np.array(head) * 0.82
    # the centre: inside the brain, the enhancing shell clear of the cortex' outer edge
    for _ in range(1000):
        offset = rng.uniform(-1, 1, 3) * (brain - enhancing - 8)
        if np.sum((offset / (brain - enhancing - 8)) ** 2) <= 1:
            break
    axes, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    tumor = Tumor(
        centre=triple(np.asarray(centre) + offset),
        rotation=tuple(triple(row) for row in axes),
        stretch=triple(rng.uniform(0.8, 1.2, 3)),
        necrotic_mm=necrotic,
        enhancing_mm=enhancing,
        edema_mm=edema,
        lumps=_lumps(rng, 4, 0.12),
        edema_lumps=_lumps(rng, 6, 0.25),
    )
    return BrainPhantom(
        seed=seed,
        centre=centre,
        head=head,
        tumor=tumor,
        gain={c: float(rng.uniform(0.6, 1.6)) for c in CONTRASTS},
        bias={c: triple(rng.normal(0, 0.12, 3)) for c in CONTRASTS},
        jitter={c: tuple(float(v) for v in rng.uniform(0.92, 1.08, 10)) for c in CONTRASTS},
        noise=noise,
    )
