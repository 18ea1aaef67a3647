"""Simple generated objects, for storing, routing and indexing where anatomy does not matter.

CT slices of a body ellipse of any size, and one small multi-frame object of an enhanced or
ophthalmic class; written with :func:`dicomnode.phantoms.writer.write_series`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomnode.phantoms.writer import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    ENHANCED_MR_IMAGE_STORAGE,
    OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE,
    OPHTHALMIC_TOMOGRAPHY_STORAGE,
    SeriesHeader,
    image_pixel,
    image_plane,
    set_pixels,
    uid_from,
)


@dataclass(frozen=True)
class SeriesSpec:
    """What to generate; the UIDs are fixed here so a test knows what to look for."""

    slices: int = 10
    rows: int = 64
    columns: int = 64
    spacing_mm: float = 1.25
    pixel_mm: float = 0.7
    study_uid: str = ""
    series_uid: str = ""
    patient_id: str = "PHANTOM-1"
    patient_name: str = "Phantom^Chest"
    seed: int = 0


def _header(spec: SeriesSpec, study_uid: str, series_uid: str, modality: str) -> SeriesHeader:
    return SeriesHeader(
        study_uid,
        series_uid,
        modality,
        f"Generated {modality}",
        (spec.patient_name, spec.patient_id),
        frame_of_reference_uid=uid_from(series_uid, "for"),
        study_description="Generated study",
        accession="ACC0001",
        manufacturer="dicomnode",
        body_part="",
        complete=False,
    )


def ct_slices(spec: SeriesSpec) -> Iterator[Dataset]:
    """Single-frame CT slices, 16-bit signed, feet to head, with a body ellipse in HU."""
    study_uid = spec.study_uid or uid_from(spec.seed, "study")
    series_uid = spec.series_uid or uid_from(spec.seed, "series")
    header = _header(spec, study_uid, series_uid, "CT")
    rng = np.random.default_rng(spec.seed)
    yy, xx = np.mgrid[0 : spec.rows, 0 : spec.columns]
    body = (
        ((yy - spec.rows / 2) / (spec.rows * 0.4)) ** 2
        + ((xx - spec.columns / 2) / (spec.columns * 0.45)) ** 2
    ) <= 1
    for index in range(spec.slices):
        ds = header.instance(CT_IMAGE_STORAGE, uid_from(series_uid, index), index + 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        position = [
            -spec.columns * spec.pixel_mm / 2,
            -spec.rows * spec.pixel_mm / 2,
            index * spec.spacing_mm,
        ]
        pixel_spacing = [spec.pixel_mm, spec.pixel_mm]
        image_plane(ds, position, [1, 0, 0, 0, 1, 0], pixel_spacing, spec.spacing_mm)
        image_pixel(ds, spec.rows, spec.columns, bits_stored=16, signed=True)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        hu = np.where(body, 40, -1000) + rng.normal(0, 10, (spec.rows, spec.columns))
        set_pixels(ds, (hu + 1024).astype("<i2"))
        yield ds


def multiframe(
    sop_class: UID,
    *,
    frames: int = 4,
    rows: int = 32,
    columns: int = 32,
    colour: bool = False,
    seed: int = 0,
) -> Dataset:
    """A minimal multi-frame object of an enhanced or ophthalmic class (enough for storage)."""
    modality = {
        ENHANCED_CT_IMAGE_STORAGE: "CT",
        ENHANCED_MR_IMAGE_STORAGE: "MR",
        OPHTHALMIC_TOMOGRAPHY_STORAGE: "OPT",
        OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE: "OP",
    }.get(sop_class, "OT")
    study_uid = uid_from(seed, sop_class, "study")
    series_uid = uid_from(seed, sop_class, "series")
    ds = _header(SeriesSpec(seed=seed), study_uid, series_uid, modality).instance(
        sop_class, uid_from(series_uid, 0), 1
    )
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(seed)
    pixels: np.ndarray
    if colour:
        image_pixel(ds, rows, columns, bits_stored=8, bits_allocated=8, photometric="RGB")
        pixels = rng.integers(0, 255, (frames, rows, columns, 3), dtype=np.uint8)
    else:
        image_pixel(ds, rows, columns, bits_stored=12)
        pixels = rng.integers(0, 4095, (frames, rows, columns), dtype="<u2")
    set_pixels(ds, pixels)
    return ds
