"""A job's findings as DICOM files: the SEG, the SR, the SC images, the key images and their
KOS, written beside its masks (``results/<job id>/dicom/``), each described for the send
queue."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from dicomnode.domain import ResultObject
from dicomnode.errors import ResultsError
from dicomnode.results.common import LO_MAX, Producer
from dicomnode.results.source import SourceImages, read_headers
from dicomnode.results.uids import ResultUIDs, job_key

if TYPE_CHECKING:
    from dicomnode.config import ResultsSettings
    from dicomnode.domain import Findings
    from dicomnode.imaging import Volume
    from dicomnode.results.sr import FindingClass

logger = logging.getLogger(__name__)

#: under results/<job id>/
DICOM_DIR = "dicom"
#: the start of a "not analysed" report's series description
NOT_ANALYSED = "NOT ANALYSED: "


@dataclass(frozen=True)
class BuiltObjects:
    """The datasets of one job, before they are written."""

    datasets: tuple[tuple[str, str, Dataset], ...]  # (kind, file name, dataset)
    timing_s: Mapping[str, float]


def reference_volume(inputs: Volume | Mapping[str, Volume], reference: str | None) -> Volume:
    """The input volume the findings' masks lie on: the one whose series is ``reference``, or
    the only (else the first by input name) when the findings name none."""
    if not isinstance(inputs, Mapping):
        if reference is not None and reference != inputs.series_instance_uid:
            raise ResultsError(
                f"findings refer to series {reference}; the input is {inputs.series_instance_uid}"
            )
        return inputs
    if not inputs:
        raise ResultsError("the job has no input volume")
    if reference is None:
        return inputs[sorted(inputs)[0]]
    for volume in inputs.values():
        if volume.series_instance_uid == reference:
            return volume
    names = ", ".join(f"{n}={v.series_instance_uid}" for n, v in sorted(inputs.items()))
    raise ResultsError(f"findings refer to series {reference}, which is no input ({names})")


def build_objects(
    findings: Findings,
    inputs: Volume | Mapping[str, Volume],
    paths: Sequence[Path | str],
    settings: ResultsSettings,
    *,
    route: str,
    when: datetime,
    classes: Sequence[FindingClass] = (),
    procedure: Mapping[str, Any] | None = None,
    caution: str = "",
    not_analysed: str | None = None,
) -> BuiltObjects:
    """The SEG, SR, SC, key image and KOS datasets of ``findings`` on ``inputs`` (``paths``:
    every file of the input series); ``classes``: the model's labels; ``procedure``: the
    model's declared procedure reported, if any; ``caution``: why the results need it (an
    input outside the model's envelope), said in the SR and every series description.

    ``not_analysed``: the model did not run (its route refused the input), and why: the SR
    alone, saying so, with UIDs of its own (a later run that does analyse the study, under a
    route that flags, writes other objects than this report)."""
    from dicomnode.results.kos import build_kos
    from dicomnode.results.regions import finding_regions
    from dicomnode.results.sc import ATTENTION, build_sc
    from dicomnode.results.seg import build_seg
    from dicomnode.results.sr import build_sr, procedure_reported
    from dicomnode.results.summary import build_summary, summary_text

    started = time.perf_counter()
    volume = reference_volume(inputs, findings.reference)
    headers = read_headers(paths)
    source = SourceImages.for_volume(volume.frames, headers, volume.series_instance_uid)
    # the reference series first in the image library and the evidence
    library = [*source.datasets]
    seen = {str(ds.SOPInstanceUID) for ds in library}
    library += [ds for uid, ds in headers.items() if uid not in seen]
    key = job_key(findings.model, findings.version, route.partition("?")[0], headers)
    uids = ResultUIDs(key if not_analysed is None else f"{key}/not-analysed", settings.uid_root)
    producer = Producer(
        findings.model,
        findings.version,
        findings.demo,
        settings.manufacturer,
        settings.institution_name,
        settings.device_serial_number,
        caution,
    )
    read = time.perf_counter()
    out: list[tuple[str, str, Dataset]] = []
    order = {c.label: n for n, c in enumerate(classes)}
    attention = findings.masks.get(ATTENTION) if findings.masks else None
    # each finding's key slice and outline there: the SR's image regions and the key images
    regions = finding_regions(findings, volume.geometry, attention)
    seg = None
    if settings.seg and not_analysed is None:
        seg = build_seg(
            findings, source, producer, uids, when,
            series_number=settings.seg_series_number,
            series_description=producer.describe(settings.seg_description),
            label_order=order,
        )  # fmt: skip
        if seg is not None:
            out.append(("SEG", "seg.dcm", seg.dataset))
    segged = time.perf_counter()
    if settings.sr or not_analysed is not None:
        sites = [c.finding_site for c in classes if c.finding_site is not None]
        sites += [f.finding_site for f in findings.findings if f.finding_site is not None]
        procedure_code = procedure_reported(
            volume.modality, str(source.first.get("BodyPartExamined", "")), sites, procedure
        )
        sr = build_sr(
            findings, source, library, producer, uids, when,
            seg=seg, procedure=procedure_code,
            series_number=settings.sr_series_number,
            series_description=(
                producer.describe(settings.sr_description)
                if not_analysed is None
                else (NOT_ANALYSED + producer.describe(settings.sr_description))[:LO_MAX]
            ),
            regions=regions, classes=classes,
            pixel_spacing=volume.geometry.pixel_spacing,
            not_analysed=not_analysed,
        )  # fmt: skip
        out.append(("SR", "sr.dcm", sr))
    reported = time.perf_counter()
    if not_analysed is not None:  # the report alone
        attention = None
        keys_wanted = False
    else:
        keys_wanted = settings.summary
    if settings.sc and attention is not None:
        images = build_sc(
            attention, source, producer, uids, when,
            series_number=settings.sc_series_number,
            series_description=producer.describe(settings.sc_description),
            max_frames=settings.sc_max_frames,
            opacity=settings.sc_opacity,
        )  # fmt: skip
        out += [("SC", f"sc-{n:03d}.dcm", ds) for n, ds in enumerate(images, start=1)]
    captured = time.perf_counter()
    keys: list[Dataset] = []
    if keys_wanted:
        keys = build_summary(
            findings, regions, source, producer, uids, when,
            series_number=settings.summary_series_number,
            series_description=producer.describe(settings.summary_description),
            max_images=settings.summary_max_images,
            classes=classes,
        )  # fmt: skip
        out += [("SC", f"key-{n:03d}.dcm", ds) for n, ds in enumerate(keys, start=1)]
    summarised = time.perf_counter()
    if keys:
        kos = build_kos(
            keys, source, producer, uids, when,
            description=summary_text(findings, producer, classes),
            series_number=settings.kos_series_number,
            series_description=producer.describe(settings.kos_description),
        )  # fmt: skip
        out.append(("KO", "kos.dcm", kos))
    done = time.perf_counter()
    timing = {
        "read_sources": round(read - started, 4),
        "seg": round(segged - read, 4),
        "sr": round(reported - segged, 4),
        "sc": round(captured - reported, 4),
        "summary": round(summarised - captured, 4),
        "kos": round(done - summarised, 4),
    }
    return BuiltObjects(tuple(out), timing)


def write_objects(built: BuiltObjects, storage_dir: Path, job_id: int | str) -> list[ResultObject]:
    """Write the datasets to ``results/<job id>/dicom/`` (each file whole or not at all; files
    of an earlier attempt that this one did not write are removed)."""
    folder = storage_dir / "results" / str(job_id) / DICOM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    objects = []
    names = set()
    for kind, name, ds in built.datasets:
        path = folder / name
        partial = path.with_name(f".{name}.partial")
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, path)
        names.add(name)
        objects.append(
            ResultObject(
                kind=kind,
                path=str(path.relative_to(storage_dir)),
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
            )
        )
    for stale in folder.glob("*.dcm"):
        if stale.name not in names:
            stale.unlink()
    return objects


def build_results(
    findings: Findings,
    inputs: Volume | Mapping[str, Volume],
    paths: Sequence[Path | str],
    settings: ResultsSettings,
    storage_dir: Path,
    job_id: int | str,
    *,
    route: str,
    when: datetime,
    classes: Sequence[FindingClass] = (),
    procedure: Mapping[str, Any] | None = None,
    caution: str = "",
    not_analysed: str | None = None,
) -> tuple[list[ResultObject], dict[str, float]]:
    """Build and write a job's result objects; the objects and the time each step took."""
    started = time.perf_counter()
    built = build_objects(
        findings, inputs, paths, settings,
        route=route, when=when, classes=classes, procedure=procedure, caution=caution,
        not_analysed=not_analysed,
    )  # fmt: skip
    written = time.perf_counter()
    objects = write_objects(built, storage_dir, job_id)
    timing = {**built.timing_s, "write": round(time.perf_counter() - written, 4)}
    logger.info(
        "job %s: wrote %s in %.2f s",
        job_id,
        ", ".join(o.kind for o in objects) or "no result objects",
        time.perf_counter() - started,
        extra={"action": "results", "job_id": job_id},
    )
    return objects, timing
