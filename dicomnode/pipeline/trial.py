"""One run of a model on DICOM files, outside the queue: ``dicomnode models run`` and
``models check``.

The files are indexed in a scratch SQLite index in a temporary folder (never the node's
database), and the model runs as the worker runs it (:func:`dicomnode.pipeline.job_models`,
``load``, ``run``) on a job of all their series, so a package, a bundle, a command model and a
builtin are tried by the same code that runs them in production. The objects it would send are
copied out; :func:`check_objects` reads each back.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import InputsRejected
from dicomnode.pipeline.job import TRIAL_ROUTE

if TYPE_CHECKING:
    from pydicom import Dataset

    from dicomnode.config import Settings
    from dicomnode.pipeline.models import BuiltinModels

logger = logging.getLogger(__name__)

#: the storage classes of the objects a job sends, by kind
SOP_CLASSES = {
    "SEG": ("1.2.840.10008.5.1.4.1.1.66.4",),
    "SC": ("1.2.840.10008.5.1.4.1.1.7",),
    "KO": ("1.2.840.10008.5.1.4.1.1.88.59",),  # Key Object Selection Document Storage
}
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: the phantom ``models check`` writes for a model that accepts the modality
PHANTOM_MODALITIES = ("CT", "MR", "OPT")


@dataclass(frozen=True)
class TrialRun:
    """What one run found and wrote."""

    model: str
    study_instance_uid: str
    inputs: tuple[str, ...]  # series UIDs
    #: the objects it would send, copied into the output folder (kind, path, SOP class, UIDs)
    objects: tuple[dict[str, str], ...]
    result: Mapping[str, Any]


@dataclass(frozen=True)
class ObjectCheck:
    """One object read back: what is wrong with it (nothing: ``problems`` is empty)."""

    path: Path
    kind: str
    problems: tuple[str, ...]


def read_series(files: Sequence[Path]) -> dict[str, list[tuple[Path, Dataset]]]:
    """The files' headers by series UID; InputsRejected naming a file that is no DICOM
    instance (or lacks its UIDs)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    if not files:
        raise InputsRejected("no input files given")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
            raise InputsRejected(
                f"{str(path)!r} is not a DICOM file ({type(exc).__name__}: {exc})"
            ) from exc
        missing = [
            key
            for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            if not str(ds.get(key, "")).strip()
        ]
        if missing:
            raise InputsRejected(f"{str(path)!r} lacks {', '.join(missing)}")
        series.setdefault(str(ds.SeriesInstanceUID), []).append((Path(path).resolve(), ds))
    studies = {str(ds.StudyInstanceUID) for items in series.values() for _, ds in items}
    if len(studies) != 1:
        raise InputsRejected(
            f"the files are of {len(studies)} studies; a run takes the series of one study"
        )
    return series


def _index(sessions: Callable[[], Any], series: Mapping[str, list[tuple[Path, Dataset]]]) -> None:
    """The scratch index: one patient, study, series and instance row per file."""
    from dicomnode.db.models import Instance, Patient, Series, Study

    now = datetime.now(UTC)
    first = next(iter(series.values()))[0][1]
    with sessions() as session:
        patient = Patient(patient_id=str(first.get("PatientID", "")), issuer_of_patient_id="",
                          patient_name="", birth_date="", sex="")  # fmt: skip
        session.add(patient)
        session.flush()
        study = Study(study_instance_uid=str(first.StudyInstanceUID), patient_pk=patient.id,
                      study_date="", study_time="", study_id="", accession_number="",
                      study_description="", referring_physician_name="",
                      first_received_at=now, last_received_at=now)  # fmt: skip
        session.add(study)
        session.flush()
        for uid, items in series.items():
            ds = items[0][1]
            row = Series(series_instance_uid=uid, study_pk=study.id,
                         modality=str(ds.get("Modality", "")), series_number=None,
                         series_description=str(ds.get("SeriesDescription", ""))[:64],
                         body_part_examined="",
                         frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
                         first_received_at=now, last_received_at=now)  # fmt: skip
            session.add(row)
            session.flush()
            for path, instance in items:
                number = instance.get("InstanceNumber")
                instance_row = Instance(
                    sop_instance_uid=str(instance.SOPInstanceUID),
                    series_pk=row.id,
                    sop_class_uid=str(instance.SOPClassUID),
                    transfer_syntax_uid=str(instance.file_meta.TransferSyntaxUID),
                    instance_number=None if number in (None, "") else int(number),
                    number_of_frames=None,
                    rows=None,
                    columns=None,
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    calling_aet="",
                    calling_host="",
                    received_at=now,
                )
                session.add(instance_row)
        session.commit()


def run_model(
    settings: Settings,
    name: str,
    files: Sequence[Path],
    out_dir: Path,
    *,
    device: str = "cpu",
    builtins: BuiltinModels | None = None,
) -> TrialRun:
    """Run model ``name`` once on ``files`` (the series of one study) and copy the objects it
    would send into ``out_dir``; the model's own errors (InputsRejected, CommandModelFailed,
    ...) are raised as the worker would fail the job with them."""
    from dicomnode.db import make_engine, make_session_factory
    from dicomnode.db.models import Base
    from dicomnode.domain import JobState
    from dicomnode.pipeline.models import load_job_models
    from dicomnode.queue.records import ClaimedJob
    from dicomnode.queue.worker import JobContext

    series = read_series(files)
    study_uid = str(next(iter(series.values()))[0][1].StudyInstanceUID)
    with tempfile.TemporaryDirectory(prefix="dicomnode-run-") as scratch:
        root = Path(scratch)
        engine = make_engine(f"sqlite:///{root / 'index.db'}")
        try:
            Base.metadata.create_all(engine)
            sessions = make_session_factory(engine)
            _index(sessions, series)
            model = load_job_models(
                settings, [name], sessions=sessions, strict=True, builtins=builtins
            )[name]
            now = datetime.now(UTC)
            uids = tuple(series)
            job = ClaimedJob(
                id=1, dedupe_key=f"{TRIAL_ROUTE}:{name}", route=TRIAL_ROUTE, model=name,
                level="series" if len(uids) == 1 else "study", state=JobState.RUNNING,
                priority=0, study_instance_uid=study_uid,
                series_instance_uid=uids[0] if len(uids) == 1 else None, inputs=uids,
                destinations=(), attempts=1, max_attempts=1, run_after=None,
                lease_owner=TRIAL_ROUTE, lease_expires_at=None, error=None, result=None,
                received_at=now, completed_at=now, queued_at=now, started_at=now,
                finished_at=None, sent_at=None, updated_at=now,
            )  # fmt: skip
            model.load(device)
            staging = root / "out"
            staging.mkdir()
            context = JobContext(job, device, TRIAL_ROUTE, threading.Event(), root, staging)
            result = dict(model.run(context))
            out_dir.mkdir(parents=True, exist_ok=True)
            objects = []
            for entry in result.get("objects") or ():
                source = staging / entry["path"]
                target = out_dir / source.name
                shutil.copyfile(source, target)
                objects.append({**entry, "path": str(target)})
        finally:
            engine.dispose()
    return TrialRun(name, study_uid, uids, tuple(objects), result)


def dciodvfy_tool() -> str | None:
    """dicom3tools' ``dciodvfy`` where it is installed."""
    return shutil.which("dciodvfy")


def check_objects(run: TrialRun, *, dciodvfy: str | None = None) -> list[ObjectCheck]:
    """Each object read back: a DICOM file of its kind's SOP class, of the input's study, with
    UIDs of its own; and, with ``dciodvfy`` (its path), without its errors."""
    from pydicom import dcmread

    tool = dciodvfy
    checks = []
    for entry in run.objects:
        path, kind = Path(entry["path"]), entry.get("kind", "")
        problems: list[str] = []
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            checks.append(ObjectCheck(path, kind, (f"unreadable: {type(exc).__name__}: {exc}",)))
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        expected = SOP_CLASSES.get(kind)
        if kind == "SR":
            if not sop_class.startswith(SR_CLASS_PREFIX):
                problems.append(f"SOP class {sop_class or '(none)'} is no SR storage class")
        elif expected is None:
            problems.append(f"kind {kind!r} is none of SEG, SR, SC, KO")
        elif sop_class not in expected:
            problems.append(f"SOP class {sop_class or '(none)'}, expected {expected[0]}")
        if str(ds.get("StudyInstanceUID", "")) != run.study_instance_uid:
            problems.append(f"study {ds.get('StudyInstanceUID', '(none)')} is not the input's")
        if str(ds.get("SeriesInstanceUID", "")) in run.inputs:
            problems.append("reuses an input's Series Instance UID")
        if tool is not None:
            problems.extend(_dciodvfy(tool, path))
        checks.append(ObjectCheck(path, kind, tuple(problems)))
    return checks


def _dciodvfy(tool: str, path: Path) -> list[str]:
    """dciodvfy's errors for ``path`` (its warnings are left out)."""
    try:
        done = subprocess.run(
            [tool, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"dciodvfy could not run: {exc}"]
    output = done.stdout + done.stderr
    errors = [f"dciodvfy: {line.strip()}" for line in output.splitlines()
              if line.startswith("Error")]  # fmt: skip
    if done.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with status {done.returncode}")
    return errors


def uncoded_labels(settings: Settings, name: str) -> tuple[str, ...]:
    """The labels of model ``name`` that neither the site nor SNOMED CT codes (a bundle's:
    they get the node's local code, which no viewer knows)."""
    from dicomnode.inference.registry import ModelRegistry

    spec = ModelRegistry.from_settings(settings).packages.get(name)
    return tuple(spec.uncoded_labels) if spec is not None else ()


def accepted_modalities(settings: Settings, name: str) -> tuple[str, ...]:
    """The modalities model ``name`` accepts (empty: any, or it does not say)."""
    from dicomnode.inference.registry import ModelRegistry

    spec = ModelRegistry.from_settings(settings).packages.get(name)
    return tuple(spec.info.accepts.modalities) if spec is not None else ()


def write_phantom(modalities: Sequence[str], folder: Path, seed: int = 0) -> list[Path]:
    """A small phantom study of the first of ``modalities`` there is one for (none named: a
    chest CT): a chest CT with a nodule, a brain MR, a retina OCT. InputsRejected when the
    model accepts only modalities without a phantom."""
    wanted = [m for m in modalities if m in PHANTOM_MODALITIES] if modalities else ["CT"]
    if not wanted:
        raise InputsRejected(
            f"no phantom of modality {', '.join(modalities)} (phantoms: "
            f"{', '.join(PHANTOM_MODALITIES)}); give the files to check with"
        )
    modality = wanted[0]
    if modality == "CT":
        from dicomnode.phantoms.chest import chest_ct

        phantom = chest_ct((40, 128, 128), (2.0, 2.0, 2.5), nodules=1, seed=5101 + seed,
                           sizes=(10.0, 14.0))  # fmt: skip
        return list(phantom.write(folder / "chest"))
    if modality == "MR":
        from dicomnode.phantoms.brain import brain_phantom

        study = brain_phantom(7100 + seed).write(folder / "brain")
        return [path for paths in study.paths.values() for path in paths]
    from dicomnode.phantoms.retina import oct_volume

    return list(oct_volume(3, seed=7200 + seed).write(folder / "retina"))
