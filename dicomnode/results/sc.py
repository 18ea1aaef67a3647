"""A classification's attention map as Secondary Capture images: the map blended as a colour
heat map over the source frame, one RGB image per frame shown.

Which frames: every frame when the input has at most ``max_frames`` (a photograph, a few
B-scans), else the ``max_frames`` frames with the highest mean attention, in slice order.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.errors import ResultsError
from dicomnode.results.common import DEMO_NOTE, Producer, lo, stamp
from dicomnode.results.source import SourceImages
from dicomnode.results.uids import ResultUIDs

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ATTENTION = "attention"
#: Purpose of reference (CID 7202): the image this one was made from
SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")


def select_frames(attention: np.ndarray, max_frames: int) -> list[int]:
    """The slices to show: all of them, or the ``max_frames`` most attended, in slice order."""
    count = attention.shape[0]
    if count <= max_frames:
        return list(range(count))
    scores = attention.reshape(count, -1).astype(np.float64).mean(axis=1)
    ranked = sorted(range(count), key=lambda k: (-scores[k], k))
    return sorted(ranked[:max_frames])


#: the heat scale: blue (cold), cyan, yellow, red (hot) at 0, 1/3, 2/3, 1
HEAT_KNOTS = (0.0, 1 / 3, 2 / 3, 1.0)
HEAT_RGB = ((0.0, 0.0, 1.0, 1.0), (0.0, 1.0, 1.0, 0.0), (1.0, 1.0, 0.0, 0.0))


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``values`` 0..1 as RGB 0..1 on the heat scale (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, HEAT_KNOTS, channel) for channel in HEAT_RGB], axis=-1)


def blend(image: np.ndarray, attention: np.ndarray, opacity: float) -> np.ndarray:
    """RGB uint8: ``image`` (grey 0..255 [rows, columns] or RGB [rows, columns, 3]) under the
    heat map of ``attention`` (0..255), more opaque where the attention is higher."""
    base = image.astype(np.float32) / 255.0
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    level = attention.astype(np.float32) / 255.0
    alpha = (opacity * level)[..., None]
    out = (1.0 - alpha) * base + alpha * heat_colours(level)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def display_pixels(ds: Dataset, frame: int | None) -> np.ndarray:
    """One source frame for display: grey 0..255 (1st to 99th percentile, MONOCHROME1
    inverted) or RGB 0..255."""
    from pydicom.pixels import pixel_array

    filename = getattr(ds, "filename", None)
    if not filename:
        raise ResultsError(f"source instance {ds.SOPInstanceUID} has no file to read pixels from")
    try:
        pixels = pixel_array(filename, index=None if frame is None else frame - 1)
    except Exception as exc:
        raise ResultsError(
            f"pixels of source instance {ds.SOPInstanceUID} cannot be decoded: {exc}"
        ) from exc
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if pixels.dtype != np.uint8:
            top = float(pixels.max()) or 1.0
            pixels = np.rint(pixels.astype(np.float32) * (255.0 / top)).astype(np.uint8)
        return pixels
    values = pixels.astype(np.float32)
    lo_, hi = np.percentile(values, [1.0, 99.0])
    grey = np.clip((values - lo_) / max(float(hi - lo_), 1e-6), 0.0, 1.0) * 255.0
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255.0 - grey
    return grey.astype(np.uint8)


def build_sc(
    attention: np.ndarray,
    source: SourceImages,
    producer: Producer,
    uids: ResultUIDs,
    when: datetime,
    *,
    series_number: int,
    series_description: str,
    max_frames: int = 3,
    opacity: float = 0.5,
) -> list[Dataset]:
    """Secondary Capture images of ``attention`` (uint8, [frames, rows, columns] on the source
    grid) over the source frames chosen by :func:`select_frames`."""
    attention = np.asarray(attention)
    first = source.first
    shape = (len(source.slices), int(first.Rows), int(first.Columns))
    if attention.shape != shape:
        raise ResultsError(
            f"attention map is {attention.shape}; the source series {source.series_instance_uid} "
            f"is {shape} (frames, rows, columns)"
        )
    if attention.dtype != np.uint8:
        raise ResultsError(f"attention map is {attention.dtype}; expected uint8 0..255")
    chosen = select_frames(attention, max_frames)
    images: list[Dataset] = []  # highdicom SCImages
    for number, k in enumerate(chosen, start=1):
        ds, frame = source.dataset_of(k)
        rgb = blend(display_pixels(ds, frame), attention[k], opacity)
        where = f"frame {frame} of " if frame is not None else ""
        note = (
            f"{producer.model} {producer.version} attention (Grad-CAM) over {where}"
            f"{ds.SOPInstanceUID}; {len(chosen)} of {shape[0]} frames shown"
            + (", the most attended" if len(chosen) < shape[0] else "")
        )
        if producer.demo:
            note += f"; {DEMO_NOTE}"
        sc = secondary_capture(
            rgb, ds, frame, producer, when,
            series_instance_uid=uids.series("sc"),
            sop_instance_uid=uids.instance("sc", number),
            instance_number=number,
            series_number=series_number,
            series_description=series_description,
            comments=note,
            derivation=f"{producer.model} attention map over the source",
        )  # fmt: skip
        images.append(sc)
    return images


def secondary_capture(
    rgb: np.ndarray,
    ds: Dataset,
    frame: int | None,
    producer: Producer,
    when: datetime,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    series_number: int,
    series_description: str,
    comments: str,
    derivation: str,
) -> Dataset:
    """An RGB Secondary Capture image made from frame ``frame`` of source ``ds``: its patient,
    study, orientation and laterality, a reference to the source frame, no burned-in patient
    text, dated ``when``."""
    import highdicom as hd

    try:
        sc = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=producer.manufacturer,
            patient_id=str(ds.PatientID),
            patient_name=ds.PatientName,
            patient_birth_date=str(ds.PatientBirthDate),
            patient_sex=str(ds.PatientSex),
            accession_number=str(ds.AccessionNumber),
            study_id=str(ds.StudyID),
            study_date=str(ds.StudyDate),
            study_time=str(ds.StudyTime),
            referring_physician_name=ds.ReferringPhysicianName,
            patient_orientation=("L", "P"),  # replaced below with the source's
            laterality=_laterality(ds),
            series_description=series_description,
            institution_name=producer.institution_name or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"SC of instance {ds.SOPInstanceUID} could not be built: {exc}") from exc
    sc.PatientOrientation = _patient_orientation(ds)
    body_part = str(ds.get("BodyPartExamined", "") or "").strip()
    if body_part:
        sc.BodyPartExamined = body_part  # tells a validator whether laterality is needed
    elif "Laterality" not in sc:
        sc.Laterality = ""  # type 2C: unknown (neither the body part nor the side is known)
    sc.BurnedInAnnotation = "NO"
    sc.ImageComments = comments[:10240]
    sc.DerivationDescription = lo(derivation)
    sc.SourceImageSequence = [_source_reference(ds, frame)]
    stamp(sc, when)
    return sc


def _source_reference(ds: Dataset, frame: int | None) -> Dataset:
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_FOR_PROCESSING
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _laterality(ds: Dataset) -> str | None:
    value = str(ds.get("Laterality", "") or ds.get("ImageLaterality", "")).strip()
    return value if value in ("L", "R") else None


def _orientation(ds: Dataset) -> list[float] | None:
    if "ImageOrientationPatient" in ds:
        return [float(v) for v in ds.ImageOrientationPatient]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group) or []
        if items and "PlaneOrientationSequence" in items[0]:
            return [float(v) for v in items[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    return None


def _patient_orientation(ds: Dataset) -> Any:
    """Patient Orientation of rows and columns from the source's orientation, dominant axis
    first (e.g. ``L\\P``); empty when the source has none (type 2)."""
    cosines = _orientation(ds)
    if cosines is None:
        return ""
    letters = []
    for vector in (cosines[:3], cosines[3:]):
        ranked = sorted(range(3), key=lambda a: -abs(vector[a]))
        text = "".join(
            "LPH"[a] if vector[a] > 0 else "RAF"[a] for a in ranked if abs(vector[a]) > 1e-3
        )
        letters.append(text)
    return letters
