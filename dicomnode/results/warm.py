"""Load highdicom's standard tables before the first job: the first SEG and SR a process builds
cost about a second more than the next (highdicom reads its IOD and module tables then)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.domain import Code, Finding, Findings, MaskRef

logger = logging.getLogger(__name__)

_WARM = False


def _slice(k: int) -> Dataset:
    """A 4x4 CT slice header: enough for highdicom to build a SEG and an SR on it."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = f"2.25.1{k}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "2.25.2", "2.25.3", "2.25.4"
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = (
        "CT",
        "",
        "",
        "",
        "",
    )
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "", "", "", ""
    ds.ReferringPhysicianName = ""
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, k]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    return ds


def warm_up() -> float:
    """Build a SEG and an SR on a 2-slice synthetic CT in memory, once per process; the
    seconds it took (0 when already done)."""
    global _WARM
    if _WARM:
        return 0.0
    from dicomnode.results.common import Producer
    from dicomnode.results.regions import mask_region
    from dicomnode.results.seg import build_seg
    from dicomnode.results.source import SourceImages
    from dicomnode.results.sr import CT_CHEST, build_sr
    from dicomnode.results.uids import ResultUIDs

    started = time.perf_counter()
    datasets = (_slice(0), _slice(1))
    source = SourceImages(datasets, ((0, None), (1, None)), "2.25.3")
    mask = np.zeros((2, 4, 4), dtype=np.uint8)
    mask[1, 1:3, 1:3] = 1
    nodule = Code("27925004", "SCT", "Nodule")
    finding = Finding("nodule", nodule, 0.5, centre_mm=(1.5, 1.5, 1.0), mask=MaskRef("m", 1))
    findings = Findings("warm-up", "0", False, (finding,), {"m": mask})
    producer, uids = Producer("warm-up", "0", False), ResultUIDs("warm-up")
    when = datetime(2026, 1, 1, tzinfo=UTC)
    seg = build_seg(findings, source, producer, uids, when, series_number=1,
                    series_description="warm-up")  # fmt: skip
    region = mask_region(mask, 1)
    assert region is not None
    build_sr(findings, source, datasets, producer, uids, when, seg=seg, procedure=CT_CHEST,
             series_number=2, series_description="warm-up", regions=[region],
             pixel_spacing=(1.0, 1.0))  # fmt: skip
    _WARM = True
    seconds = time.perf_counter() - started
    logger.debug("results: highdicom warmed up in %.2f s", seconds, extra={"action": "results"})
    return seconds
