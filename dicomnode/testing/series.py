"""Generated DICOM series with known geometry, for tests and benchmarks (no real patient data)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
OPHTHALMIC_TOMOGRAPHY_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.5.4")
OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")


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


def _base(spec: SeriesSpec, study_uid: str, series_uid: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "for"])
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.StudyID, ds.AccessionNumber = "1", "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Generated study"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Generated {modality}"
    ds.Manufacturer = "dicomnode"
    return ds


def _file_meta(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta


def ct_slices(spec: SeriesSpec) -> Iterator[Dataset]:
    """Single-frame CT slices, 16-bit signed, feet to head, with a body ellipse in HU."""
    study_uid = spec.study_uid or generate_uid(entropy_srcs=[str(spec.seed), "study"])
    series_uid = spec.series_uid or generate_uid(entropy_srcs=[str(spec.seed), "series"])
    rng = np.random.default_rng(spec.seed)
    yy, xx = np.mgrid[0 : spec.rows, 0 : spec.columns]
    body = (
        ((yy - spec.rows / 2) / (spec.rows * 0.4)) ** 2
        + ((xx - spec.columns / 2) / (spec.columns * 0.45)) ** 2
    ) <= 1
    for index in range(spec.slices):
        ds = _base(spec, study_uid, series_uid, "CT")
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(index)])
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [
            -spec.columns * spec.pixel_mm / 2,
            -spec.rows * spec.pixel_mm / 2,
            index * spec.spacing_mm,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spec.pixel_mm, spec.pixel_mm]
        ds.SliceThickness = spec.spacing_mm
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = spec.rows, spec.columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        hu = np.where(body, 40, -1000) + rng.normal(0, 10, (spec.rows, spec.columns))
        ds.PixelData = (hu + 1024).astype("<i2").tobytes()
        _file_meta(ds)
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
    study_uid = generate_uid(entropy_srcs=[str(seed), str(sop_class), "study"])
    series_uid = generate_uid(entropy_srcs=[str(seed), str(sop_class), "series"])
    ds = _base(SeriesSpec(seed=seed), study_uid, series_uid, modality)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "0"])
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    rng = np.random.default_rng(seed)
    if colour:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 255, (frames, rows, columns, 3), dtype=np.uint8).tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4095, (frames, rows, columns), dtype="<u2").tobytes()
    _file_meta(ds)
    return ds


def write_series(datasets: Iterator[Dataset] | list[Dataset], folder: Path) -> list[Path]:
    """Write datasets as DICOM files named by instance; return their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
