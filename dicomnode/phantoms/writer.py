"""The one DICOM writer of the generated studies, so that every phantom is written alike.

A series is datasets saved as numbered files (:func:`write_series`). Each kind of object starts
from its series' shared attributes (:class:`SeriesHeader`), adds what is its own, and ends with
its pixels (:func:`set_pixels`); :func:`write_volume` does that for an array on a grid, as
single-frame slices or one Enhanced CT object.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from dicomnode.imaging.geometry import Geometry

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
OPHTHALMIC_TOMOGRAPHY_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.5.4")
OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")

SliceOrder = Literal["ascending", "descending", "shuffled"]

# ---------------------------------------------------------------------------------------------
# Values


def decimal(value: float) -> DSfloat:
    """A Decimal String (DS) value, formatted to fit."""
    return DSfloat(float(value), auto_format=True)


def decimals(values: ArrayLike) -> list[DSfloat]:
    return [decimal(v) for v in np.asarray(values, dtype=float).ravel()]


def uid_from(*parts: object) -> str:
    """A UID derived from ``parts``: the same parts, the same UID."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def study_uid_for(seed: int) -> str:
    """The Study Instance UID a phantom of ``seed`` gets when none is given."""
    return uid_from(seed, "phantom-study")


def series_uid_for(study_uid: str, seed: int, description: str) -> str:
    """The Series Instance UID of a phantom's series in ``study_uid`` when none is given."""
    return uid_from(study_uid, seed, description, "series")


def frame_of_reference_for(study_uid: str) -> str:
    """The Frame of Reference UID the series of a phantom study share."""
    return uid_from(study_uid, "frame-of-reference")


def item(**elements: object) -> Dataset:
    """A sequence item with these keyword -> value elements."""
    result = Dataset()
    for keyword, value in elements.items():
        setattr(result, keyword, value)
    return result


def seq(**elements: object) -> DicomSequence:
    """A sequence of one item (see :func:`item`)."""
    return DicomSequence([item(**elements)])


# ---------------------------------------------------------------------------------------------
# Modules


@dataclass(frozen=True)
class SeriesHeader:
    """The Patient, Study, Series and Frame of Reference attributes all objects of a series share.

    The defaults are the phantoms'. ``complete`` adds the Series and Content Date/Time and the
    Position Reference Indicator (Type 2 for a validator); ``body_part`` "" leaves it out.
    """

    study_uid: str
    series_uid: str
    modality: str
    series_description: str
    patient: tuple[str, str] = ("Phantom^Chest", "PHANTOM-1")  # name, ID
    frame_of_reference_uid: str = ""  # "": the study's (frame_of_reference_for)
    study_description: str = "Phantom chest"
    accession: str = "PHANTOM1"
    manufacturer: str = "dicomnode phantom"
    body_part: str = "CHEST"
    complete: bool = True

    def instance(self, sop_class: str, sop_instance_uid: str, number: int) -> Dataset:
        """A new object of the series: these attributes, its SOP class, UID and number."""
        ds = Dataset()
        ds.PatientName, ds.PatientID = self.patient
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.FrameOfReferenceUID = self.frame_of_reference_uid or frame_of_reference_for(
            self.study_uid
        )
        ds.StudyDate, ds.StudyTime = "20260101", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", self.accession, ""
        ds.StudyDescription = self.study_description
        ds.Modality = self.modality
        ds.SeriesNumber = 1
        ds.SeriesDescription = self.series_description
        ds.Manufacturer = self.manufacturer
        if self.body_part:
            ds.BodyPartExamined = self.body_part
        if self.complete:
            ds.PositionReferenceIndicator = ""
            ds.SeriesDate, ds.SeriesTime = "20260101", "120000"
            ds.ContentDate, ds.ContentTime = "20260101", "120000"
        ds.SOPClassUID = UID(str(sop_class))
        ds.SOPInstanceUID = sop_instance_uid
        ds.InstanceNumber = number
        return ds


def image_plane(
    ds: Dataset, position: object, orientation: object, pixel_spacing: object, thickness: object
) -> None:
    """The Image Plane module of a single-frame image, with the values as given."""
    ds.ImagePositionPatient = position
    ds.ImageOrientationPatient = orientation
    ds.PixelSpacing = pixel_spacing
    ds.SliceThickness = thickness


def image_pixel(
    ds: Dataset,
    rows: int,
    columns: int,
    *,
    bits_stored: int,
    bits_allocated: int = 16,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
) -> None:
    """The Image Pixel module's description of the pixels (colour ones interleaved)."""
    if photometric.startswith("MONOCHROME"):
        ds.SamplesPerPixel = 1
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def set_pixels(
    ds: Dataset,
    pixels: np.ndarray | Sequence[bytes],
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> None:
    """Pixel Data and the file meta, last, once the SOP class and instance are set.

    An array is stored native, then compressed by pydicom to ``transfer_syntax`` if that is not
    explicit VR little endian; a list of frames already encoded for ``transfer_syntax``
    (e.g. JPEG) is encapsulated as it is.
    """
    syntax = UID(str(transfer_syntax))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if isinstance(pixels, np.ndarray):
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = syntax
        ds.file_meta = meta
        ds.PixelData = encapsulate(list(pixels))
        ds["PixelData"].VR = "OB"


def write_series(datasets: Iterable[Dataset], folder: Path | str) -> list[Path]:
    """Write datasets as DICOM files numbered in order (00001.dcm, ...); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        path = folder / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# A volume on a grid


def _order(count: int, slice_order: SliceOrder, seed: int) -> np.ndarray:
    if slice_order == "ascending":
        return np.arange(count)
    if slice_order == "descending":
        return np.arange(count)[::-1]
    if slice_order == "shuffled":
        return np.random.default_rng(seed).permutation(count)
    raise ValueError(f"slice_order must be ascending, descending or shuffled, not {slice_order!r}")


def _stored(
    array_hu: np.ndarray, rescale: tuple[float, float], unsigned: bool
) -> tuple[np.ndarray, int]:
    """Stored values for the given slope/intercept, clipped to the storage type; bits stored."""
    slope, intercept = rescale
    values = np.rint((np.asarray(array_hu, dtype=np.float64) - intercept) / slope)
    if unsigned:
        return np.clip(values, 0, 4095).astype("<u2"), 12
    return np.clip(values, -32768, 32767).astype("<i2"), 16


def write_volume(
    array_hu: np.ndarray,
    geometry: Geometry,
    folder: Path | str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    slice_order: SliceOrder = "ascending",
    seed: int = 0,
    series_description: str = "Phantom chest CT",
    enhanced: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    unsigned: bool = False,
    rescale: tuple[float, float] = (1.0, -1024.0),
    patient: tuple[str, str] = ("Phantom^Chest", "PHANTOM-1"),
    patient_position: str = "HFS",
    image_type: Sequence[str] | None = None,
    sop_class_uid: str = CT_IMAGE_STORAGE,
    attributes: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write a (slices, rows, columns) HU array on ``geometry`` as a DICOM series.

    Single-frame CT Image Storage files (or one Enhanced CT object with ``enhanced``), each slice
    placed by Image Position/Orientation (Patient) from the geometry, so oblique and feet-first
    grids round-trip. ``slice_order`` sets the order of files and Instance Numbers relative to
    position; ``unsigned`` stores 12-bit unsigned pixels; ``transfer_syntax`` may be a compressed
    one pydicom can encode (RLE Lossless always, JPEG 2000 Lossless with pylibjpeg-openjpeg).
    ``image_type`` overrides Image Type (e.g. ORIGINAL PRIMARY LOCALIZER for a scout).
    ``sop_class_uid`` (single-frame only) and ``attributes`` (keyword -> value, set on every
    file last) make other series, e.g. MR Image Storage with its Series Description and
    Contrast/Bolus Agent.
    Returns the written paths in Instance Number order.
    """
    array_hu = np.asarray(array_hu)
    if array_hu.shape != geometry.shape:
        raise ValueError(f"array shape {array_hu.shape} differs from geometry {geometry.shape}")
    study_uid = study_uid or study_uid_for(seed)
    series_uid = series_uid or series_uid_for(study_uid, seed, series_description)
    header = SeriesHeader(study_uid, series_uid, modality, series_description, patient)
    order = _order(geometry.shape[0], slice_order, seed)
    # Several grids written into one series (a scout, a second stack) get distinct instance UIDs.
    grid_key = hashlib.sha256(geometry.affine.tobytes() + str(geometry.shape).encode()).hexdigest()
    stored, bits = _stored(array_hu, rescale, unsigned)

    slices, rows, columns = geometry.shape
    spacing = geometry.spacing
    direction = geometry.direction
    iop = decimals(np.concatenate([direction[:, 0], direction[:, 1]]))
    pixel_spacing = [decimal(spacing[1]), decimal(spacing[0])]  # DICOM: row, column spacing
    positions = geometry.voxel_to_patient(
        np.stack([np.zeros(slices), np.zeros(slices), np.arange(slices)], axis=1)
    )
    normal = np.cross(direction[:, 0], direction[:, 1])
    thickness = decimal(abs(float(np.dot(geometry.affine[:3, 2], normal))))

    def new(sop_class: str, sop_instance_uid: str, number: int) -> Dataset:
        ds = header.instance(sop_class, sop_instance_uid, number)
        ds.PatientPosition = patient_position
        for keyword, value in (attributes or {}).items():
            setattr(ds, keyword, value)
        return ds

    def enhanced_object() -> Iterator[Dataset]:
        ds = new(ENHANCED_CT_IMAGE_STORAGE, uid_from(series_uid, grid_key, "enhanced"), 1)
        ds.ImageType = list(image_type or ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])
        ds.NumberOfFrames = slices
        image_pixel(ds, rows, columns, bits_stored=bits, signed=not unsigned)
        _enhanced_ct(ds, positions[order], order, iop, pixel_spacing, thickness, rescale)
        set_pixels(ds, stored[order], transfer_syntax)
        yield ds

    def single_frames() -> Iterator[Dataset]:
        for number, k in enumerate(order, start=1):
            ds = new(sop_class_uid, uid_from(series_uid, grid_key, int(k)), number)
            ds.ImageType = list(image_type or ["ORIGINAL", "PRIMARY", "AXIAL"])
            ds.WindowCenter, ds.WindowWidth = decimal(-600), decimal(1500)
            image_plane(ds, decimals(positions[k]), iop, pixel_spacing, thickness)
            ds.SliceLocation = decimal(float(np.dot(positions[k], normal)))
            if modality == "CT":
                ds.KVP = decimal(120)
            ds.AcquisitionNumber = 1
            ds.RescaleIntercept, ds.RescaleSlope = decimal(rescale[1]), decimal(rescale[0])
            ds.RescaleType = "HU" if modality == "CT" else "US"
            image_pixel(ds, rows, columns, bits_stored=bits, signed=not unsigned)
            for keyword, value in (attributes or {}).items():  # last: they win
                setattr(ds, keyword, value)
            set_pixels(ds, stored[k], transfer_syntax)
            yield ds

    return write_series(enhanced_object() if enhanced else single_frames(), folder)


def _enhanced_ct(
    ds: Dataset,
    positions: np.ndarray,
    order: np.ndarray,
    iop: list[DSfloat],
    pixel_spacing: list[DSfloat],
    thickness: DSfloat,
    rescale: tuple[float, float],
) -> None:
    """The Enhanced CT modules: shared groups (measures, orientation, rescale, acquisition) and
    per-frame positions, complete enough for dciodvfy."""
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = "20260101120000"
    ds.AcquisitionDuration = 5.0
    ds.ContentQualification = "RESEARCH"
    ds.ManufacturerModelName, ds.DeviceSerialNumber = "phantom", "0"
    ds.SoftwareVersions = "dicomnode"
    ds.PixelPresentation, ds.VolumetricProperties = "MONOCHROME", "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    frame_type = list(ds.ImageType)
    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [
            item(
                PixelMeasuresSequence=seq(
                    PixelSpacing=pixel_spacing,
                    SliceThickness=thickness,
                    SpacingBetweenSlices=thickness,
                ),
                PlaneOrientationSequence=seq(ImageOrientationPatient=iop),
                PixelValueTransformationSequence=seq(
                    RescaleIntercept=decimal(rescale[1]),
                    RescaleSlope=decimal(rescale[0]),
                    RescaleType="HU",
                ),
                FrameVOILUTSequence=seq(WindowCenter=decimal(-600), WindowWidth=decimal(1500)),
                CTImageFrameTypeSequence=seq(
                    FrameType=frame_type,
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                ),
                FrameAnatomySequence=seq(
                    AnatomicRegionSequence=seq(
                        CodeValue="51185008", CodingSchemeDesignator="SCT", CodeMeaning="Thorax"
                    ),
                    FrameLaterality="U",
                ),
                IrradiationEventIdentificationSequence=seq(
                    IrradiationEventUID=uid_from(ds.SOPInstanceUID, "irradiation")
                ),
                CTAcquisitionTypeSequence=seq(
                    AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"
                ),
                CTAcquisitionDetailsSequence=seq(
                    DataCollectionDiameter=decimal(500),
                    GantryDetectorTilt=decimal(0),
                    TableHeight=decimal(150),
                    RotationDirection="CW",
                    RevolutionTime=0.5,
                    SingleCollimationWidth=0.625,
                    TotalCollimationWidth=40.0,
                ),
                CTTableDynamicsSequence=seq(
                    TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0
                ),
                CTGeometrySequence=seq(
                    DistanceSourceToDetector=decimal(1085.6),
                    DistanceSourceToDataCollectionCenter=595.0,
                ),
                CTReconstructionSequence=seq(
                    ReconstructionAlgorithm="FILTER_BACK_PROJ",
                    ConvolutionKernel="STANDARD",
                    ConvolutionKernelGroup="LUNG",
                    ReconstructionDiameter=decimal(360),
                    ReconstructionPixelSpacing=[float(v) for v in pixel_spacing],
                    ReconstructionAngle=360.0,
                    ImageFilter="NONE",
                ),
                CTExposureSequence=seq(
                    ExposureTimeInms=500.0,
                    XRayTubeCurrentInmA=200.0,
                    ExposureInmAs=100.0,
                    ExposureModulationType="NONE",
                ),
                CTXRayDetailsSequence=seq(
                    KVP=decimal(120),
                    FocalSpots=[decimal(1.2)],
                    FilterType="FLAT",
                    FilterMaterial="ALUMINUM",
                ),
            )
        ]
    )
    organization = uid_from(ds.SOPInstanceUID, "dimensions")
    ds.DimensionOrganizationSequence = seq(DimensionOrganizationUID=organization)
    ds.DimensionIndexSequence = DicomSequence(
        [
            item(
                DimensionOrganizationUID=organization,
                DimensionIndexPointer=0x00209056,  # Stack ID
                FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
            ),
            item(
                DimensionOrganizationUID=organization,
                DimensionIndexPointer=0x00209057,  # In-Stack Position Number
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [
            item(
                FrameContentSequence=seq(
                    FrameAcquisitionDateTime="20260101120000",
                    FrameReferenceDateTime="20260101120000",
                    FrameAcquisitionDuration=500.0,
                    StackID="1",
                    InStackPositionNumber=int(k) + 1,
                    DimensionIndexValues=[1, int(k) + 1],
                ),
                PlanePositionSequence=seq(ImagePositionPatient=decimals(position)),
                CTPositionSequence=seq(
                    TablePosition=float(position[2]),
                    DataCollectionCenterPatient=[0.0, 0.0, float(position[2])],
                    ReconstructionTargetCenterPatient=[0.0, 0.0, float(position[2])],
                ),
            )
            for position, k in zip(positions, order, strict=True)
        ]
    )
