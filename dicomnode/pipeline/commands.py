"""Command models (``[models.commands.NAME]``): a model that is a program, run for each job.

The worker makes a fresh folder, ``results/<job id>/command/`` under the run's staging root,
with the job's input DICOM files copied into ``in/`` (copies: the program cannot change the
spool), an empty ``out/`` and ``job.json`` (the job's UIDs, route, model and device; no patient
data). It runs the command there in a process group of its own, with ``CUDA_VISIBLE_DEVICES``
from the worker's device and the configured environment, its stdout and stderr in
``stdout.log`` and ``stderr.log``, and kills the whole group when the job is cancelled or the
timeout passes.

The ``contract`` names how the program finds its folders and what of ``out/`` the node takes
(one :class:`Contract` each, in :data:`CONTRACTS`):

- ``dicomnode``: ``DICOMNODE_INPUT``/``DICOMNODE_OUTPUT``; ``out/`` holds either DICOM SEG or
  SR files, each of the input's study and patient, which are sent as they are, or
  ``findings.json``, a list of findings in the node's JSON form
  (:mod:`dicomnode.inference.findings`), which the node writes as its own SR, or one NIfTI
  label map (``*.nii.gz``/``*.nii``, with ``labels.json`` naming its values) on an input
  series' grid, which the node writes as its own SEG and SR (:mod:`dicomnode.pipeline.nifti`);
  job.json then gives each series' grid as NIfTI has it (``grid``).
- ``mercure``: a mercure processing module, run unchanged: ``MERCURE_IN_DIR`` holds the files
  named ``<series UID>#<SOP instance UID>.dcm`` and mercure's ``task.json`` (the module's
  ``settings`` under ``process.settings``), ``MERCURE_OUT_DIR`` gets DICOM SEG, SR, Secondary
  Capture or derived images (``ImageType`` DERIVED) of new series of the input's study and
  patient, and an optional ``result.json`` that goes into the job's result, not to the PACS.
- ``monai-deploy``: a MONAI Deploy App SDK application or MAP: ``HOLOSCAN_INPUT_PATH``,
  ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` (and the SDK's older ``MONAI_INPUTPATH``,
  ``MONAI_OUTPUTPATH``, ``MONAI_MODELPATH``); ``out/`` holds DICOM SEG or SR files.

Anything else fails the job, and nothing it wrote is sent. With an ``image`` the worker runs
the container with docker or podman (``--network none``, the folders mounted where the
contract's containers expect them, the GPU of a cuda worker) and kills it as it kills a program.
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

import numpy as np

from dicomnode.domain import Findings
from dicomnode.errors import (
    CommandModelFailed,
    CommandOutputInvalid,
    InferenceCancelled,
    InputsRejected,
    ModelError,
)
from dicomnode.inference.findings import LABEL_MAP, label_map_findings
from dicomnode.pipeline.envelope import OutsideEnvelope, Verdict, check_headers
from dicomnode.pipeline.inputs import check_series, find_series
from dicomnode.pipeline.nifti import (
    LABELS_JSON,
    grid_json,
    is_nifti,
    map_labels,
    read_label_map,
    read_labels,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dicomnode.config import CommandModelSettings
    from dicomnode.imaging import Volume
    from dicomnode.pipeline.inputs import SeriesFiles
    from dicomnode.pipeline.job import PipelineSettings
    from dicomnode.queue.worker import JobContext
    from dicomnode.results.sr import FindingClass

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
#: Secondary Capture Image Storage and the multi-frame SC classes (.7.1 to .7.4)
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: where job.json is mounted in a container (``DICOMNODE_JOB``)
CONTAINER_JOB = "/job/job.json"
#: what the worker reads of each input file
INPUT_TAGS = ("StudyInstanceUID", "PatientID", "SOPInstanceUID", "AccessionNumber")
#: how long ``docker kill`` may take
CONTAINER_KILL_S = 30.0
#: every SR storage class (Basic Text, Enhanced, Comprehensive, 3D, Extensible, CAD, ...)
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@dataclass(frozen=True)
class InputStudy:
    """What every object the program writes must share with its inputs."""

    study_instance_uid: str
    patient_id: str
    sop_instance_uids: frozenset[str]
    series_instance_uids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Contract:
    """A folder contract: the variables that name the folders to a program, where a container
    of that kind expects them, and what of ``out/`` the node takes."""

    name: str
    #: variables naming in/, out/ and the model's files (besides the DICOMNODE_* ones)
    input_env: tuple[str, ...] = ()
    output_env: tuple[str, ...] = ()
    model_env: tuple[str, ...] = ("DICOMNODE_MODEL",)
    #: the folders' paths inside a container
    container_input: str = "/job/in"
    container_output: str = "/job/out"
    container_model: str = "/job/model"
    #: a command without ``{input}``/``{output}`` gets the two folders appended (only the
    #: node's own contract: a mercure module or MONAI app takes no arguments it does not know)
    append_folders: bool = False
    #: ``findings.json`` may replace the DICOM output (written as the node's SR)
    findings: bool = False
    #: a NIfTI label map (and ``labels.json``) may replace it (written as the node's SEG and
    #: SR); job.json then gives each series' grid as NIfTI has it
    label_maps: bool = False
    #: Secondary Capture and derived images of new series are taken besides SEG and SR
    images: bool = False
    #: mercure's task.json in in/, the inputs named ``<series UID>#<SOP instance UID>.dcm``
    mercure_task: bool = False
    #: a JSON file in out/ kept in the job's result (``module_result``), never sent
    result_json: str | None = None

    def environment(self, input_dir: str, output_dir: str, model: str | None) -> dict[str, str]:
        values = {name: input_dir for name in self.input_env}
        values.update({name: output_dir for name in self.output_env})
        if model is not None:
            values.update({name: model for name in self.model_env})
        return values


#: the adapters of config.COMMAND_CONTRACTS
CONTRACTS: dict[str, Contract] = {
    "dicomnode": Contract("dicomnode", append_folders=True, findings=True, label_maps=True),
    "mercure": Contract(
        "mercure",
        input_env=("MERCURE_IN_DIR",),
        output_env=("MERCURE_OUT_DIR",),
        container_input="/tmp/data",
        container_output="/tmp/output",
        images=True,
        mercure_task=True,
        result_json="result.json",
    ),
    "monai-deploy": Contract(
        "monai-deploy",
        input_env=("HOLOSCAN_INPUT_PATH", "MONAI_INPUTPATH"),
        output_env=("HOLOSCAN_OUTPUT_PATH", "MONAI_OUTPUTPATH"),
        model_env=("HOLOSCAN_MODEL_PATH", "MONAI_MODELPATH"),
        container_input="/var/holoscan/input",
        container_output="/var/holoscan/output",
        container_model="/opt/holoscan/models",
    ),
}


def cuda_visible_devices(device: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker's device: empty on the CPU, the GPU's index."""
    if device == "cpu":
        return ""
    _, _, index = device.partition(":")
    return index or "0"


def command_argv(
    command: Sequence[str], input_dir: Path | str, output_dir: Path | str, *, append: bool = True
) -> list[str]:
    """The command with ``{input}``/``{output}`` replaced, else (``append``) with the two
    folders appended."""
    placed = any("{input}" in arg or "{output}" in arg for arg in command)
    argv = [arg.replace("{input}", str(input_dir)).replace("{output}", str(output_dir))
            for arg in command]  # fmt: skip
    return argv if placed or not append else [*argv, str(input_dir), str(output_dir)]


def find_runtime(wanted: str | None) -> str | None:
    """The container runtime's program: ``wanted``'s, else docker's, else podman's; None
    when it (or neither) is installed."""
    for name in (wanted,) if wanted else ("docker", "podman"):
        found = shutil.which(name)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class ContainerRun:
    """How one job's container is run: the host folders and the values passed in."""

    runtime: str  # the program's path; its name says docker or podman
    image: str
    name: str  # --name, for ``kill``
    input_dir: Path
    output_dir: Path
    job_json: Path
    model_path: Path | None
    device: str
    uid: int
    gid: int

    @property
    def podman(self) -> bool:
        return Path(self.runtime).name.startswith("podman")

    def argv(self, contract: Contract, command: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """``run --rm --network none``, the folders mounted where ``contract``'s containers
        expect them, ``env`` passed, the worker's GPU, then the image and its command."""
        argv = [self.runtime, "run", "--rm", "--name", self.name, "--network", "none"]
        # files the container writes belong to the node's user, so the node can move them
        argv += ["--userns", "keep-id"] if self.podman else ["--user", f"{self.uid}:{self.gid}"]
        mounts = [
            (self.input_dir, contract.container_input, ""),
            (self.output_dir, contract.container_output, ""),
            (self.job_json, CONTAINER_JOB, ":ro"),
        ]
        if self.model_path is not None:
            mounts.append((self.model_path, contract.container_model, ":ro"))
        for host, inside, mode in mounts:
            argv += ["-v", f"{host}:{inside}{mode}"]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        if self.device != "cpu":
            index = cuda_visible_devices(self.device)
            argv += (["--device", f"nvidia.com/gpu={index}"] if self.podman
                     else ["--gpus", f"device={index}"])  # fmt: skip
        argv.append(self.image)
        return argv + command_argv(
            command, contract.container_input, contract.container_output, append=False
        )

    def kill_argv(self) -> list[str]:
        return [self.runtime, "kill", self.name]


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
        self.contract = CONTRACTS[settings.contract]
        #: the container runtime's program (``image`` models), found by load()
        self.runtime: str | None = None
        #: why the model cannot run, found by load(): every run fails with it
        self._refusal: str | None = None

    # -- JobModel --------------------------------------------------------------------------

    def load(self, device: str) -> None:
        """Nothing to load: the program starts for each job. Checks that it (or the container
        runtime of an ``image``) can be found; without it every run fails with the reason."""
        from dicomnode.inference.device import resolve_device

        self._refusal = None
        self.runtime = None
        if self.settings.image is not None:
            self.runtime = find_runtime(self.settings.runtime)
        if self.runtime is None and self.settings.image is not None and not self.settings.command:
            wanted = self.settings.runtime or "docker or podman"
            self._refusal = (
                f"command model {self.name!r} runs the image {self.settings.image!r}, but "
                f"{wanted} is not installed (not found on PATH), and it names no command to "
                "run without one"
            )
        elif self.runtime is None and shutil.which(program := self.settings.command[0]) is None:
            self._refusal = (
                f"command model {self.name!r}: program {program!r} not found or not executable"
            )
        elif self.runtime is None and self.settings.image is not None:
            # the "the plain command otherwise": no container runtime on this host
            logger.info(
                "command model %s: no container runtime for image %r; its command runs on "
                "this machine",
                self.name,
                self.settings.image,
                extra={"action": "model_loaded"},
            )
        if self._refusal is not None:
            if self.pipeline.strict:
                raise CommandModelFailed(self._refusal)
            logger.error(self._refusal, extra={"action": "model_load_failed"})
        self.device = str(resolve_device(device))

    def run(self, context: JobContext) -> Mapping[str, Any]:
        if self.device is None:
            raise ModelError(f"model {self.name!r} used before load()")
        if context.storage_dir is None or context.output_root is None:
            raise ModelError(f"model {self.name!r} needs the storage directory of the spool")
        if self._refusal is not None:
            raise CommandModelFailed(self._refusal)
        started = time.perf_counter()
        job = context.job
        with self._session() as session:
            series = find_series(session, job.inputs, context.storage_dir, self.name)
        self._check_accepted(series)
        verdict = self._check_envelope(context, series)
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
                "contract": self.contract.name,
                "device": self.device,
                "exit_code": code,
                "envelope": verdict.as_json(self._policy(job.route)),
                "source": series[0].source(),
                "logs": {
                    stream: str((folder / f"{stream}.log").relative_to(context.output_root))
                    for stream in ("stdout", "stderr")
                },
                # what `jobs show` and the API show of the run (the files hold it all); the
                # program's own words may name the patient: a token without phi never sees them
                "program_output": {
                    stream: tail(folder / f"{stream}.log") for stream in ("stdout", "stderr")
                },
                "inputs": _described(series),
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

    def _check_accepted(self, series: Sequence[SeriesFiles]) -> None:
        """InputsRejected when a series is not what ``accepts`` says the program runs on."""
        given = self.settings.accepts
        if given is None:
            return
        from dicomnode.inference.protocol import Accepts

        accepts = Accepts(
            modalities=given.modalities,
            sop_classes=given.sop_classes,
            min_slices=given.min_slices,
            body_parts=given.body_parts,
        )
        for item in series:
            check_series(self.name, accepts, item)
            if len(item.paths) < accepts.min_slices:
                raise InputsRejected(
                    f"model {self.name!r} needs at least {accepts.min_slices} instances; series "
                    f"{item.series_instance_uid} has {len(item.paths)}"
                )

    def _policy(self, route: str) -> str:
        return self.pipeline.envelope_policy_of(route.partition("?")[0])

    def _check_envelope(self, context: JobContext, series: Sequence[SeriesFiles]) -> Verdict:
        """The inputs against ``[models.commands.NAME.envelope]``, from their headers (the
        program reads the files itself), before it runs. Outside, where the route refuses:
        OutsideEnvelope, whose result holds the node's SR saying the study was not analysed;
        where it flags, the objects the node writes say so (the program's own DICOM objects
        are sent as it wrote them)."""
        envelope = self.settings.envelope
        if envelope is None:
            return Verdict()
        verdict = check_headers(envelope, (item.paths for item in series))
        policy = self._policy(context.job.route)
        if verdict.inside or policy == "flag":
            return verdict
        sentence = verdict.sentence(self.name)
        result: dict[str, Any] = {
            "model": self.name,
            "contract": self.contract.name,
            "envelope": verdict.as_json(policy),
            "inputs": _described(series),
            "source": series[0].source(),
        }
        empty = Findings(model=self.name, version=self.settings.version, demo=False)
        result["objects"] = self._node_results(
            context, series, empty, _load_volumes(series), result, "its 'not analysed' SR",
            not_analysed=f"Not analysed: {sentence}.",
        )  # fmt: skip
        raise OutsideEnvelope(sentence, result)

    def _write_inputs(
        self, context: JobContext, series: Sequence[SeriesFiles], folder: Path, input_dir: Path
    ) -> InputStudy:
        from pydicom import dcmread

        input_dir.mkdir(parents=True)
        described = []
        sop_uids: set[str] = set()
        study = patient = None
        number = 0
        accession = ""
        for item in series:
            files = []
            for path in item.paths:
                number += 1
                ds = dcmread(path, stop_before_pixels=True, specific_tags=list(INPUT_TAGS))
                sop_uid = str(ds.get("SOPInstanceUID", ""))
                sop_uids.add(sop_uid)
                if study is None:
                    study = str(ds.get("StudyInstanceUID", ""))
                    patient = str(ds.get("PatientID", ""))
                    accession = str(ds.get("AccessionNumber", ""))
                if self.contract.mercure_task and sop_uid:  # mercure's naming
                    target = input_dir / f"{item.series_instance_uid}#{sop_uid}.dcm"
                else:
                    target = input_dir / f"{number:06d}.dcm"
                shutil.copyfile(path, target)
                files.append(str(target.relative_to(folder)))
            entry: dict[str, Any] = {
                "series_instance_uid": item.series_instance_uid,
                "modality": item.modality,
                "files": files,
            }
            if self.contract.label_maps:
                entry["grid"] = _grid_json(item)
            described.append(entry)
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
            "contract": self.contract.name,
            "input": str(input_dir),
            "output": str(folder / "out"),
        }
        (folder / "job.json").write_text(json.dumps(values, indent=2))
        if self.contract.mercure_task:
            # in in/, removed after the run: the only place the program sees the Patient ID
            # and accession number besides the DICOM files themselves
            task = mercure_task(self.name, job, patient or "", accession, self.settings.settings)
            (input_dir / "task.json").write_text(json.dumps(task, indent=2))
        return InputStudy(
            study or job.study_instance_uid,
            patient or "",
            frozenset(sop_uids),
            frozenset(item.series_instance_uid for item in series),
        )

    def _execute(self, context: JobContext, folder: Path, input_dir: Path, output_dir: Path) -> int:
        """Run the program to its end; CommandModelFailed on an error exit or the timeout,
        InferenceCancelled when the job was cancelled (the whole process group killed)."""
        assert self.device is not None
        job_id = context.job.id
        container = self._container(context, folder, input_dir, output_dir)
        if container is None:
            model = self.settings.model_path  # the program runs in the job's folder: absolute
            model = None if model is None else model.resolve()
            argv = command_argv(
                self.settings.command, input_dir, output_dir, append=self.contract.append_folders
            )
            env = {
                **os.environ,
                "CUDA_VISIBLE_DEVICES": cuda_visible_devices(self.device),
                "DICOMNODE_JOB": str(folder / "job.json"),
                "DICOMNODE_INPUT": str(input_dir),
                "DICOMNODE_OUTPUT": str(output_dir),
                **self.contract.environment(
                    str(input_dir), str(output_dir), None if model is None else str(model)
                ),
                **self.settings.environment,
            }
        else:
            inside = self.contract
            # only the node's values and the configured ones: not the worker's environment
            passed = {
                "CUDA_VISIBLE_DEVICES": "" if self.device == "cpu" else "0",  # --gpus: one GPU
                "DICOMNODE_JOB": CONTAINER_JOB,
                "DICOMNODE_INPUT": inside.container_input,
                "DICOMNODE_OUTPUT": inside.container_output,
                **inside.environment(
                    inside.container_input,
                    inside.container_output,
                    None if self.settings.model_path is None else inside.container_model,
                ),
                **self.settings.environment,
            }
            argv = container.argv(inside, self.settings.command, passed)
            env = dict(os.environ)
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
                    _kill_container(container)
                    _kill_group(process)
                    raise self._failed(
                        job_id,
                        f"ran past its timeout of {self.settings.timeout_s:g} s and was killed",
                        stderr_log,
                    )
                # wait on the program itself (its end is seen at once), the cancel each 0.1 s
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(min(left, 0.1))
                if process.returncode is None and context.cancelled.is_set():
                    _kill_container(container)
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

    def _container(
        self, context: JobContext, folder: Path, input_dir: Path, output_dir: Path
    ) -> ContainerRun | None:
        """How the job's container runs; None for a program on this machine (no image, or no
        container runtime here: then its command runs as a plain program)."""
        if self.settings.image is None or self.runtime is None:
            return None
        assert self.device is not None
        model = self.settings.model_path
        return ContainerRun(
            runtime=self.runtime,
            image=self.settings.image,
            name=f"dicomnode-job-{context.job.id}-{context.job.attempts}",
            input_dir=input_dir,
            output_dir=output_dir,
            job_json=folder / "job.json",
            model_path=None if model is None else model.resolve(),
            device=self.device,
            uid=os.getuid(),
            gid=os.getgid(),
        )

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
        """The contract: DICOM files moved to ``results/<job id>/dicom/`` as they are, or
        (``dicomnode``) the findings of ``findings.json`` written as the node's SR, or a NIfTI
        label map as its SEG and SR."""
        assert context.output_root is not None
        files = sorted(p for p in output_dir.rglob("*") if p.is_file())
        if self.contract.result_json is not None:
            kept = output_dir / self.contract.result_json
            if kept in files:
                files.remove(kept)
                result["module_result"] = self._module_result(kept)
                if not files:
                    return []  # a module that reports without images
        if not files:
            expected = f", or {FINDINGS_JSON}" if self.contract.findings else ""
            expected += ", or a NIfTI label map" if self.contract.label_maps else ""
            raise CommandOutputInvalid(
                f"command model {self.name!r} wrote nothing to out/ (expected DICOM "
                f"{'/'.join(self.contract_kinds())} files{expected})"
            )
        findings = output_dir / FINDINGS_JSON
        if self.contract.findings and findings in files:
            if len(files) > 1:
                others = ", ".join(str(p.relative_to(output_dir)) for p in files if p != findings)
                raise CommandOutputInvalid(
                    f"command model {self.name!r} wrote {FINDINGS_JSON} and other files "
                    f"({others}); the contract takes one or the other"
                )
            return self._findings_objects(context, series, findings, result)
        maps = [p for p in files if is_nifti(p)]
        if self.contract.label_maps and maps:
            labels = output_dir / LABELS_JSON
            extra = [p for p in files if p not in maps and p != labels]
            if len(maps) > 1 or extra:
                named = ", ".join(str(p.relative_to(output_dir)) for p in [*maps, *extra])
                raise CommandOutputInvalid(
                    f"command model {self.name!r} wrote {named}; the contract takes one NIfTI "
                    f"label map (and {LABELS_JSON}) or DICOM files, not several or both"
                )
            return self._label_map_objects(
                context, series, maps[0], labels if labels in files else None, result
            )
        return self._dicom_objects(context, study, output_dir, files)

    def contract_kinds(self) -> tuple[str, ...]:
        return ("SEG", "SR", "SC", "derived image") if self.contract.images else ("SEG", "SR")

    def _module_result(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CommandOutputInvalid(
                f"command model {self.name!r}: out/{path.name} is not JSON: {exc}"
            ) from exc

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
            kind = self._kind(name, sop_class, ds, study)
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

    def _kind(self, name: str, sop_class: str, ds: Any, study: InputStudy) -> str:
        """SEG or SR; under a contract that takes images, SC (Secondary Capture) or IMAGE
        (ImageType DERIVED) of a series that is none of the input's."""
        if sop_class == SEG_CLASS:
            return "SEG"
        if sop_class.startswith(SR_CLASS_PREFIX):
            return "SR"
        if self.contract.images:
            image_type = [str(v).upper() for v in (ds.get("ImageType") or ())]
            shown = "\\".join(image_type) or "(none)"
            if sop_class == SC_CLASS or sop_class.startswith(SC_CLASS + "."):
                kind = "SC"
            elif image_type[:1] == ["DERIVED"] and "Rows" in ds:
                kind = "IMAGE"
            else:
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} has SOP class "
                    f"{sop_class or '(none)'} and ImageType {shown}"
                    f"; the {self.contract.name} contract takes SEG, SR, Secondary Capture "
                    f"({SC_CLASS}) or derived images (ImageType DERIVED)"
                )
            if str(ds.get("SeriesInstanceUID", "")) in study.series_instance_uids:
                raise CommandOutputInvalid(
                    f"command model {self.name!r}: out/{name} is an image of an input series "
                    f"({ds.SeriesInstanceUID}); derived images must be a new series"
                )
            return kind
        raise CommandOutputInvalid(
            f"command model {self.name!r}: out/{name} has SOP class "
            f"{sop_class or '(none)'}; the {self.contract.name} contract takes SEG "
            f"({SEG_CLASS}) or SR ({SR_CLASS_PREFIX}*) objects"
        )

    def _findings_objects(
        self,
        context: JobContext,
        series: Sequence[SeriesFiles],
        path: Path,
        result: dict[str, Any],
    ) -> list[dict[str, str]]:
        """The findings of ``findings.json`` (a list in the node's JSON form, or an object
        with ``findings`` and an optional ``summary``) written as the node's SR."""
        from dicomnode.inference.findings import findings_from_json

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
        volumes = _load_volumes(series)
        return self._node_results(
            context, series, findings, volumes, result, f"the SR of its {FINDINGS_JSON}"
        )

    def _label_map_objects(
        self,
        context: JobContext,
        series: Sequence[SeriesFiles],
        path: Path,
        labels_json: Path | None,
        result: dict[str, Any],
    ) -> list[dict[str, str]]:
        """The NIfTI label map (on an input series' grid; its labels named by ``labels.json``
        or the ``labels`` setting) written as the node's SEG and SR: one segment and one
        finding per label with voxels; a map without any gives an SR that finds none."""
        from dicomnode.results.sr import FindingClass

        where = f"command model {self.name!r}: out/{path.name}"
        volumes = _load_volumes(series)
        grids = {v.series_instance_uid: v.geometry for v in volumes.values()}
        reference, labels = read_label_map(path, grids, where)
        named = read_labels(labels_json, self.settings.labels, f"command model {self.name!r}")
        present = [int(v) for v in np.unique(labels)]
        classes = map_labels(present, named, where)
        geometry = grids[reference]
        found, voxels = label_map_findings(labels, geometry, classes)
        findings = Findings(
            model=self.name,
            version=self.settings.version,
            demo=False,
            findings=tuple(found),
            masks={LABEL_MAP: labels} if found else {},
            reference=reference,
            summary={"label_map": path.name, "voxels": voxels},
        )
        logger.info(
            "job %s: command model %s wrote a label map with %d of its %d labels",
            context.job.id,
            self.name,
            len(found),
            len(classes),
            extra={"action": "command_label_map", "job_id": context.job.id},
        )
        return self._node_results(
            context,
            series,
            findings,
            volumes,
            result,
            f"the SEG and SR of its out/{path.name}",
            classes=[FindingClass(c.name, c.code) for c in classes],
        )

    def _node_results(
        self,
        context: JobContext,
        series: Sequence[SeriesFiles],
        findings: Findings,
        volumes: Mapping[str, Volume],
        result: dict[str, Any],
        what: str,
        classes: Sequence[FindingClass] = (),
        not_analysed: str | None = None,
    ) -> list[dict[str, str]]:
        """``findings`` in the job's result and written as the node's SEG and SR (marked when
        the input is outside the model's envelope and the route flags it); ``not_analysed``:
        the program did not run, and why (see ``build_objects``)."""
        from dicomnode.inference.findings import jsonable
        from dicomnode.results import build_results

        assert context.output_root is not None
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
                classes=classes,
                caution=self._caution(result),
                not_analysed=not_analysed,
            )
        except Exception as exc:  # a highdicom or I/O failure fails the job with its reason
            raise CommandOutputInvalid(
                f"command model {self.name!r}: {what} could not be written: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return [o.as_json() for o in objects]

    def _caution(self, result: Mapping[str, Any]) -> str:
        """Why the node's objects deserve caution: the input was outside the envelope and the
        route flags it (empty when inside, or refused: a refusal's report says it its way)."""
        envelope = result.get("envelope") or {}
        if envelope.get("inside", True) or envelope.get("policy") != "flag":
            return ""
        return Verdict(tuple(envelope.get("reasons") or ())).sentence(self.name)

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


def _described(series: Sequence[SeriesFiles]) -> list[dict[str, Any]]:
    """The job's input series, as its result lists them."""
    return [
        {
            "series_instance_uid": item.series_instance_uid,
            "modality": item.modality,
            "instances": len(item.paths),
        }
        for item in series
    ]


def _load_volumes(series: Sequence[SeriesFiles]) -> dict[str, Volume]:
    """Each input series as a volume, by its UID."""
    from dicomnode.imaging import is_planar, load_planar, load_series

    volumes = {}
    for item in series:
        load = load_planar if is_planar(item.modality, item.sop_classes) else load_series
        volumes[item.series_instance_uid] = load(list(item.paths))
    return volumes


def _grid_json(item: SeriesFiles) -> dict[str, Any] | None:
    """The series' grid as a NIfTI of it has it (from its headers), for job.json; None for a
    series that forms no volume (planar images, a broken stack)."""
    from dicomnode.errors import SeriesNotVolume
    from dicomnode.imaging import is_planar
    from dicomnode.imaging.frames import read_frames
    from dicomnode.imaging.load import DEFAULT_RULES
    from dicomnode.imaging.stack import plan_one

    if is_planar(item.modality, item.sop_classes):
        return None
    try:
        _, frames = read_frames(list(item.paths), pixels=False)
        return grid_json(plan_one(frames, DEFAULT_RULES).geometry)
    except SeriesNotVolume:
        return None


def mercure_task(
    name: str, job: Any, patient_id: str, accession: str, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """mercure's ``task.json`` for a job: ``info`` (the series or study, the route as the
    rule, the Patient ID as ``mrn``; no patient name), ``process`` (the module's ``settings``),
    and the empty ``dispatch`` and ``study`` of a task mercure only processes."""
    series_level = job.level == "series" and job.series_instance_uid
    return {
        "id": f"dicomnode-job-{job.id}",
        "info": {
            "action": "process",
            "uid": job.series_instance_uid if series_level else job.study_instance_uid,
            "uid_type": "series" if series_level else "study",
            "triggered_rules": {job.route: True},
            "applied_rule": job.route,
            "patient_name": None,
            "mrn": patient_id,
            "acc": accession,
            "sender_address": "MISSING",
            "mercure_version": "dicomnode",
            "mercure_appliance": "dicomnode",
            "mercure_server": "dicomnode",
            "sender_aet": "MISSING",
            "receiver_aet": "MISSING",
        },
        "dispatch": {},
        "process": {
            "module_name": name,
            "module_config": None,
            "settings": dict(settings),
            "retain_input_images": False,
            "output": None,
        },
        "study": {},
    }


def _kill_container(container: ContainerRun | None) -> None:
    """``docker kill`` the job's container (killing its client does not stop it)."""
    if container is None:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            container.kill_argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=CONTAINER_KILL_S,
            check=False,
        )


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
