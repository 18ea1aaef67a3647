"""Command models (``[models.commands.NAME]``): a model that is a program, run for each job.

The worker makes a fresh folder, ``results/<job id>/command/`` under the run's staging root,
with the job's input DICOM files copied into ``in/`` (copies: the program cannot change the
spool), an empty ``out/`` and ``job.json`` (the job's UIDs, route, model and device; no patient
data). It runs the command there in a process group of its own, with ``CUDA_VISIBLE_DEVICES``
from the worker's device and the configured environment, its stdout and stderr in
``stdout.log`` and ``stderr.log``, and kills the whole group when the job is cancelled or the
timeout passes.

Under the ``dicomnode`` contract the program writes to ``out/`` either DICOM SEG or SR files,
each of the input's study and patient, which are sent as they are, or ``findings.json``, a list
of findings in the node's JSON form (:mod:`dicomnode.inference.findings`), which the node
writes as its own SR. Anything else fails the job, and nothing it wrote is sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import (
    CommandModelFailed,
    CommandOutputInvalid,
    InferenceCancelled,
    ModelError,
)
from dicomnode.pipeline.inputs import find_series

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dicomnode.config import CommandModelSettings
    from dicomnode.pipeline.inputs import SeriesFiles
    from dicomnode.pipeline.job import PipelineSettings
    from dicomnode.queue.worker import JobContext

logger = logging.getLogger(__name__)

#: under results/<job id>/ of the run's staging root
COMMAND_DIR = "command"
FINDINGS_JSON = "findings.json"
#: the lines of stderr a failure quotes
TAIL_LINES = 20
TAIL_CHARS = 2000
#: after SIGTERM, how long the group has before SIGKILL
KILL_GRACE_S = 5.0
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: every SR storage class (Basic Text, Enhanced, Comprehensive, 3D, Extensible, CAD, ...)
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@dataclass(frozen=True)
class InputStudy:
    """What every object the program writes must share with its inputs."""

    study_instance_uid: str
    patient_id: str
    sop_instance_uids: frozenset[str]


def cuda_visible_devices(device: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker's device: empty on the CPU, the GPU's index."""
    if device == "cpu":
        return ""
    _, _, index = device.partition(":")
    return index or "0"


def command_argv(command: Sequence[str], input_dir: Path, output_dir: Path) -> list[str]:
    """The command with ``{input}``/``{output}`` replaced, else with the two folders appended."""
    placed = any("{input}" in arg or "{output}" in arg for arg in command)
    argv = [arg.replace("{input}", str(input_dir)).replace("{output}", str(output_dir))
            for arg in command]  # fmt: skip
    return argv if placed else [*argv, str(input_dir), str(output_dir)]


def tail(path: Path, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last lines of a log file (at most ``chars`` characters), or '' without one."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * chars))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


class CommandModel:
    """Runs one configured program for the worker: a job's series in, its objects out."""

    def __init__(
        self,
        name: str,
        settings: CommandModelSettings,
        pipeline: PipelineSettings | None = None,
    ) -> None:
        from dicomnode.config import ResultsSettings
        from dicomnode.pipeline.job import PipelineSettings

        self.name = name
        self.settings = settings
        self.pipeline = pipeline or PipelineSettings()
        self.results = self.pipeline.results or ResultsSettings()
        self._sessions = self.pipeline.sessions
        self._engine: Any = None
        self.device: str | None = None

    # -- JobModel --------------------------------------------------------------------------

    def load(self, device: str) -> None:
        """Nothing to load: the program starts for each job. Checks that it can be found."""
        from dicomnode.inference.device import resolve_device

        program = self.settings.command[0]
        if shutil.which(program) is None:
            message = (
                f"command model {self.name!r}: program {program!r} not found or not executable"
            )
            if self.pipeline.strict:
                raise CommandModelFailed(message)
            logger.error(message, extra={"action": "model_load_failed"})
        self.device = str(resolve_device(device))

    def run(self, context: JobContext) -> Mapping[str, Any]:
        if self.device is None:
            raise ModelError(f"model {self.name!r} used before load()")
        if context.storage_dir is None or context.output_root is None:
            raise ModelError(f"model {self.name!r} needs the storage directory of the spool")
        started = time.perf_counter()
        job = context.job
        with self._session() as session:
            series = find_series(session, job.inputs, context.storage_dir, self.name)
        folder = context.output_root / "results" / str(job.id) / COMMAND_DIR
        if folder.exists():  # an earlier attempt's, written straight into the spool
            shutil.rmtree(folder)
        input_dir, output_dir = folder / "in", folder / "out"
        output_dir.mkdir(parents=True)
        try:
            study = self._write_inputs(context, series, folder, input_dir)
            prepared = time.perf_counter()
            code = self._execute(context, folder, input_dir, output_dir)
            ran = time.perf_counter()
            result: dict[str, Any] = {
                "model": self.name,
                "contract": self.settings.contract,
                "device": self.device,
                "exit_code": code,
                "logs": {
                    stream: str((folder / f"{stream}.log").relative_to(context.output_root))
                    for stream in ("stdout", "stderr")
                },
                "inputs": [
                    {
                        "series_instance_uid": item.series_instance_uid,
                        "modality": item.modality,
                        "instances": len(item.paths),
                    }
                    for item in series
                ],
            }
            result["objects"] = self._take_outputs(context, series, study, output_dir, result)
        finally:
            shutil.rmtree(input_dir, ignore_errors=True)  # copies of the inputs: never kept
        result["timing_s"] = {
            "inputs": round(prepared - started, 4),
            "command": round(ran - prepared, 4),
            "outputs": round(time.perf_counter() - ran, 4),
            "total": round(time.perf_counter() - started, 4),
        }
        return result

    # -- the steps -------------------------------------------------------------------------

    def _write_inputs(
        self, context: JobContext, series: Sequence[SeriesFiles], folder: Path, input_dir: Path
    ) -> InputStudy:
        from pydicom import dcmread

        input_dir.mkdir(parents=True)
        described = []
        sop_uids: set[str] = set()
        study = patient = None
        number = 0
        for item in series:
            files = []
            for path in item.paths:
                number += 1
                target = input_dir / f"{number:06d}.dcm"
                shutil.copyfile(path, target)
                files.append(str(target.relative_to(folder)))
                ds = dcmread(path, stop_before_pixels=True, specific_tags=[
                    "StudyInstanceUID", "PatientID", "SOPInstanceUID"])  # fmt: skip
                sop_uids.add(str(ds.get("SOPInstanceUID", "")))
                if study is None:
                    study = str(ds.get("StudyInstanceUID", ""))
                    patient = str(ds.get("PatientID", ""))
            described.append(
                {
                    "series_instance_uid": item.series_instance_uid,
                    "modality": item.modality,
                    "files": files,
                }
            )
        job = context.job
        values = {
            "job_id": job.id,
            "attempt": job.attempts,
            "model": self.name,
            "route": job.route,
            "level": job.level,
            "study_instance_uid": job.study_instance_uid,
            "series": described,
            "device": self.device,
            "contract": self.settings.contract,
            "input": str(input_dir),
            "output": str(folder / "out"),
        }
        (folder / "job.json").write_text(json.dumps(values, indent=2))
        return InputStudy(study or job.study_instance_uid, patient or "", frozenset(sop_uids))

    def _execute(self, context: JobContext, folder: Path, input_dir: Path, output_dir: Path) -> int:
        """Run the program to its end; CommandModelFailed on an error exit or the timeout,
        InferenceCancelled when the job was cancelled (the whole process group killed)."""
        assert self.device is not None
        argv = command_argv(self.settings.command, input_dir, output_dir)
        env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": cuda_visible_devices(self.device),
            "DICOMNODE_JOB": str(folder / "job.json"),
            "DICOMNODE_INPUT": str(input_dir),
            "DICOMNODE_OUTPUT": str(output_dir),
            **self.settings.environment,
        }
        job_id = context.job.id
        stderr_log = folder / "stderr.log"
        with (folder / "stdout.log").open("wb") as out, stderr_log.open("wb") as err:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=folder,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # its own process group, killed as a whole
                )
            except OSError as exc:
                raise CommandModelFailed(
                    f"command model {self.name!r}: {argv[0]!r} could not be started: {exc}"
                ) from exc
            logger.info(
                "job %s: command model %s started (pid %s)",
                job_id,
                self.name,
                process.pid,
                extra={"action": "command_started", "job_id": job_id},
            )
            deadline = time.monotonic() + self.settings.timeout_s
            while process.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    _kill_group(process)
                    raise self._failed(
                        job_id,
                        f"ran past its timeout of {self.settings.timeout_s:g} s and was killed",
                        stderr_log,
                    )
                if context.cancelled.wait(min(left, 0.1)):
                    _kill_group(process)
                    raise InferenceCancelled(
                        f"command model {self.name!r}: job {job_id} cancelled; its process "
                        "group was killed"
                    )
            _kill_group(process)  # what it left running in the background
        code = process.returncode
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise self._failed(job_id, how, stderr_log)
        return code

    def _failed(self, job_id: int, how: str, stderr_log: Path) -> CommandModelFailed:
        text = tail(stderr_log)
        # The program's own words may name the patient: they go in the job's error (what an
        # admin reads in `jobs show`) and at DEBUG, never in the log at WARNING.
        logger.warning(
            "job %s: command model %s %s (its stderr is in the job's error)",
            job_id,
            self.name,
            how,
            extra={"action": "command_failed", "job_id": job_id},
        )
        logger.debug("job %s: stderr ends:\n%s", job_id, text or "(empty)")
        quoted = f"; stderr ends: {text}" if text else " (nothing on stderr)"
        return CommandModelFailed(f"command model {self.name!r} {how}{quoted}")

    def _take_outputs(
        self,
        context: JobContext,
        series: Sequence[SeriesFiles],
        study: InputStudy,
        output_dir: Path,
        result: dict[str, Any],
    ) -> list[dict[str, str]]:
        """The contract: SEG/SR files moved to ``results/<job id>/dicom/`` as they are, or
        the findings of ``findings.json`` written as the node's SR."""
        assert context.output_root is not None
        files = sorted(p for p in output_dir.rglob("*") if p.is_file())
        if not files:
            raise CommandOutputInvalid(
                f"command model {self.name!r} wrote nothing to out/ (expected DICOM SEG or SR "
                f"files, or {FINDINGS_JSON})"
            )
        findings = output_dir / FINDINGS_JSON
        if findings in files:
            if len(files) > 1:
                others = ", ".join(str(p.relative_to(output_dir)) for p in files if p != findings)
                raise CommandOutputInvalid(
                    f"command model {self.name!r} wrote {FINDINGS_JSON} and other files "
                    f"({others}); the contract takes one or the other"
                )
            return self._findings_objects(context, series, findings, result)
        return self._dicom_objects(context, study, output_dir, files)

    def _dicom_objects(
        self, context: JobContext, study: InputStudy, output_dir: Path, files: Sequence[Path]
    ) -> list[dict[str, str]]:
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        from dicomnode.domain import ResultObject
        from dicomnode.results.build import DICOM_DIR

        assert context.output_root is not None
        checked = []
        seen: set[str] = set()
        for path in files:
            name = str(path.relative_to(output_dir))
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} is not a DICOM file "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            sop_class = str(ds.get("SOPClassUID", ""))
            if sop_class == SEG_CLASS:
                kind = "SEG"
            elif sop_class.startswith(SR_CLASS_PREFIX):
                kind = "SR"
            else:
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} has SOP class "
                    f"{sop_class or '(none)'}; the contract takes SEG ({SEG_CLASS}) or SR "
                    f"({SR_CLASS_PREFIX}*) objects"
                )
            study_uid = str(ds.get("StudyInstanceUID", ""))
            if study_uid != study.study_instance_uid:
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} is of study {study_uid or '(none)'}"
                    f"; the input's study is {study.study_instance_uid}"
                )
            if str(ds.get("PatientID", "")) != study.patient_id:
                # the IDs themselves are patient data: neither goes into the error
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} has another Patient ID than "
                    "the input's"
                )
            sop_uid = str(ds.get("SOPInstanceUID", ""))
            series_uid = str(ds.get("SeriesInstanceUID", ""))
            if not sop_uid or not series_uid:
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} lacks a SOP Instance UID or "
                    "Series Instance UID"
                )
            if sop_uid in study.sop_instance_uids or sop_uid in seen:
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} reuses SOP Instance UID "
                    f"{sop_uid} (of an input, or of another output)"
                )
            seen.add(sop_uid)
            checked.append((path, kind, ds))
        target = context.output_root / "results" / str(context.job.id) / DICOM_DIR
        target.mkdir(parents=True, exist_ok=True)
        objects = []
        counts: dict[str, int] = {}
        for path, kind, ds in checked:
            counts[kind] = counts.get(kind, 0) + 1
            final = target / f"{kind.lower()}-{counts[kind]:03d}.dcm"
            os.replace(path, final)  # sent as the program wrote it
            objects.append(
                ResultObject(
                    kind=kind,
                    path=str(final.relative_to(context.output_root)),
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                ).as_json()
            )
        return objects

    def _findings_objects(
        self,
        context: JobContext,
        series: Sequence[SeriesFiles],
        path: Path,
        result: dict[str, Any],
    ) -> list[dict[str, str]]:
        """The findings of ``findings.json`` (a list in the node's JSON form, or an object
        with ``findings`` and an optional ``summary``) written as the node's SR."""
        from dicomnode.imaging import is_planar, load_planar, load_series
        from dicomnode.inference.findings import findings_from_json, jsonable
        from dicomnode.results import build_results

        assert context.output_root is not None
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CommandOutputInvalid(
                f"command model {self.name!r}: {FINDINGS_JSON} is not JSON: {exc}"
            ) from exc
        listed = values.get("findings") if isinstance(values, dict) else values
        summary = (values.get("summary") or {}) if isinstance(values, dict) else {}
        if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
            raise CommandOutputInvalid(
                f"command model {self.name!r}: {FINDINGS_JSON} must hold a list of findings "
                "(objects), or an object with one under 'findings'"
            )
        masked = [f.get("label") for f in listed if f.get("mask")]
        if masked:
            raise CommandOutputInvalid(
                f"command model {self.name!r}: {FINDINGS_JSON}: findings {masked} refer to "
                "masks; a command model's findings cannot have masks yet"
            )
        try:
            findings = findings_from_json(
                {
                    "model": self.name,
                    "version": self.settings.version,
                    "demo": False,
                    "findings": listed,
                    "summary": summary,
                }
            )
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise CommandOutputInvalid(
                f"command model {self.name!r}: {FINDINGS_JSON} has a finding the node cannot "
                "read (each needs label, finding_type {value, scheme, meaning} and "
                f"probability): {type(exc).__name__}: {exc}"
            ) from exc
        volumes = {}
        for item in series:
            load = load_planar if is_planar(item.modality, item.sop_classes) else load_series
            volumes[item.series_instance_uid] = load(list(item.paths))
        inputs = next(iter(volumes.values())) if len(volumes) == 1 else volumes
        result["findings"] = [jsonable(f) for f in findings.findings]
        result["summary"] = jsonable(findings.summary)
        if not self.results.enabled:
            return []
        received = [s.last_received_at for s in series if s.last_received_at is not None]
        try:
            objects, _ = build_results(
                findings,
                inputs,
                [p for item in series for p in item.paths],
                self.results,
                context.output_root,
                context.job.id,
                route=context.job.route,
                when=max(received, default=context.job.received_at),
            )
        except Exception as exc:  # a highdicom or I/O failure fails the job with its reason
            raise CommandOutputInvalid(
                f"command model {self.name!r}: the SR of its {FINDINGS_JSON} could not be "
                f"written: {type(exc).__name__}: {exc}"
            ) from exc
        return [o.as_json() for o in objects]

    def _session(self) -> Session:
        # as ModelPipeline._session: the worker's session factory, else the database URL
        if self._sessions is None:
            if self.pipeline.database_url is None:
                raise ModelError(
                    f"model {self.name!r} has no database to find the job's series in "
                    "(give it a session factory or a database URL)"
                )
            from dicomnode.db import make_engine, make_session_factory

            self._engine = make_engine(self.pipeline.database_url)
            self._sessions = make_session_factory(self._engine)
        return self._sessions()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the program's process group, SIGKILL after the grace; reaps the program."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group is gone
        process.wait()
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
