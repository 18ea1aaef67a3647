"""Result objects for send tests and benchmarks: a real SEG, Comprehensive 3D SR and Secondary
Capture built with highdicom on a source series, written where a job's results go.

They stand in for what :mod:`dicomnode.results` writes, so the send queue can be exercised on
the three SOP classes a PACS receives from the node, under the source study, with UIDs derived
from a seed (the same seed gives the same UIDs, as a re-run job does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

UID_ROOT = "1.2.826.0.1.3680043.10.1447."  # test objects only


def seeded_uid(*parts: object) -> str:
    """A valid UID under UID_ROOT, the same for the same parts."""
    digest = int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:12])
    return f"{UID_ROOT}{digest}"[:64]


def write_result_objects(
    sources: Sequence[Path],
    storage_dir: Path,
    job_id: int,
    *,
    seed: str = "",
    kinds: Sequence[str] = ("SEG", "SR", "SC"),
) -> list[dict[str, str]]:
    """Build the ``kinds`` on the source series, write them to
    ``<storage_dir>/results/<job_id>/dicom/`` and return result["objects"] entries for them."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    images = sorted((dcmread(p) for p in sources), key=lambda ds: int(ds.InstanceNumber))
    first = images[0]
    out = storage_dir / "results" / str(job_id) / "dicom"
    out.mkdir(parents=True, exist_ok=True)
    key = seed or str(job_id)
    objects: list[dict[str, str]] = []

    def keep(kind: str, dataset: Any) -> None:
        path = out / f"{kind.lower()}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        objects.append(
            {
                "kind": kind,
                "path": str(path.relative_to(storage_dir)),
                "sop_class_uid": str(dataset.SOPClassUID),
                "sop_instance_uid": str(dataset.SOPInstanceUID),
                "series_instance_uid": str(dataset.SeriesInstanceUID),
                "study_instance_uid": str(dataset.StudyInstanceUID),
            }
        )

    if "SEG" in kinds:
        mask = np.zeros((len(images), first.Rows, first.Columns), dtype=bool)
        mask[len(images) // 3 : 2 * len(images) // 3 + 1, 10:20, 10:20] = True
        segment = hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="nodule",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="send-test", version="1", family=codes.DCM.ArtificialIntelligence
            ),
        )
        keep(
            "SEG",
            hd.seg.Segmentation(
                source_images=images,
                pixel_array=mask,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment],
                series_instance_uid=seeded_uid(key, "SEG", "series"),
                series_number=901,
                sop_instance_uid=seeded_uid(key, "SEG"),
                instance_number=1,
                manufacturer="dicomnode",
                manufacturer_model_name="send-test",
                software_versions="1",
                device_serial_number="0",
            ),
        )
    if "SR" in kinds:
        observer = hd.sr.ObservationContext(
            observer_person_context=None,
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=seeded_uid(key, "device"), name="send-test"
                ),
            ),
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=seeded_uid(key, "finding", 1), identifier="finding 1"
            ),
            finding_type=codes.SCT.Nodule,
            measurements=[
                hd.sr.Measurement(
                    name=codes.SCT.Diameter,
                    value=8.0,
                    unit=codes.UCUM.Millimeter,
                )
            ],
        )
        report = hd.sr.MeasurementReport(
            observation_context=observer,
            procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
            imaging_measurements=[group],
            referenced_images=images[:1],
        )
        keep(
            "SR",
            hd.sr.Comprehensive3DSR(
                evidence=images[:1],
                content=report[0],
                series_instance_uid=seeded_uid(key, "SR", "series"),
                series_number=902,
                sop_instance_uid=seeded_uid(key, "SR"),
                instance_number=1,
                manufacturer="dicomnode",
            ),
        )
    if "SC" in kinds:
        pixels = np.zeros((first.Rows, first.Columns, 3), dtype=np.uint8)
        pixels[..., 0] = np.linspace(0, 255, first.Columns, dtype=np.uint8)[None, :]
        keep(
            "SC",
            hd.sc.SCImage.from_ref_dataset(
                ref_dataset=first,
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=seeded_uid(key, "SC", "series"),
                series_number=903,
                sop_instance_uid=seeded_uid(key, "SC"),
                instance_number=1,
                manufacturer="dicomnode",
                patient_orientation=("L", "P"),
            ),
        )
    return objects
