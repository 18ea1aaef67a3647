"""Command models under the ``mercure`` and ``monai-deploy`` folder contracts, run by the
node's own worker: a program that behaves like a mercure module (``MERCURE_IN_DIR``,
``task.json``, ``MERCURE_OUT_DIR``, ``result.json``) or a MONAI Deploy application
(``HOLOSCAN_*``/``MONAI_*`` paths) runs unchanged, and its objects are checked as under the
node's own contract. ``image`` models build a docker/podman command line, or refuse to load
without a runtime (no container runs here)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.config import COMMAND_CONTRACTS, CommandModelSettings
from dicomnode.domain import JobState
from dicomnode.errors import CommandModelFailed
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.pipeline.commands import CONTRACTS, CommandModel, ContainerRun
from dicomnode.pipeline.job import PipelineSettings
from dicomnode.testing import peers
from dicomnode.testing.validators import dciodvfy, has_tool
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

ROOT = Path(__file__).resolve().parents[2]

#: what both programs share: the node's test SEG/SR/SC of the sources, into out/
COMMON = r"""
import json, os, shutil, sys, tempfile
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def results(sources, out, kinds, job_id=1):
    from dicomnode.testing.result_objects import write_result_objects

    with tempfile.TemporaryDirectory() as tmp:
        for o in write_result_objects(sources, Path(tmp), job_id, kinds=kinds):
            shutil.move(Path(tmp) / o["path"], out / (o["kind"].lower() + ".dcm"))


def other_study(path):
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1447.999"
    ds.save_as(path)
"""

#: a mercure module: no arguments; the folders from the environment, the mode in task.json
MERCURE = (
    COMMON
    + r"""
assert sys.argv[1:] == [], sys.argv  # a module gets no arguments
inp, out = Path(os.environ["MERCURE_IN_DIR"]), Path(os.environ["MERCURE_OUT_DIR"])
task = json.loads((inp / "task.json").read_text())
assert task["info"]["uid_type"] == "series" and task["process"]["module_name"].startswith("merc_")
assert task["info"]["patient_name"] is None and task["info"]["mrn"]
mode = task["process"]["settings"]["mode"]
sources = sorted(inp.glob("*.dcm"))
assert sources and all(p.name.split("#")[0] == task["info"]["uid"] for p in sources)
for p in sources:  # <series UID>#<SOP instance UID>.dcm
    assert p.name.split("#")[1] == pydicom.dcmread(p).SOPInstanceUID + ".dcm"
if mode == "good":
    results(sources, out, ("SEG", "SC"))
    sc = pydicom.dcmread(out / "sc.dcm")
    sc.Laterality = ""  # the CT phantom has none to copy
    sc.save_as(out / "sc.dcm")
    derived = pydicom.dcmread(sources[0])  # a derived image of a new series
    derived.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    derived.SOPInstanceUID = derived.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    derived.SeriesInstanceUID = generate_uid()
    derived.SeriesNumber = 9950
    # the phantom leaves these out; a module that writes a CT image owes them
    derived.Laterality = derived.PositionReferenceIndicator = derived.KVP = ""
    derived.AcquisitionNumber = None
    derived.PatientPosition = "HFS"
    derived.save_as(out / "derived.dcm")
    (out / "result.json").write_text(json.dumps({"volume_ml": 12.5}))
elif mode == "copy":
    shutil.copy(sources[0], out / "copy.dcm")  # the input itself, as mercure's dummy module
elif mode == "study":
    results(sources, out, ("SEG",))
    other_study(out / "seg.dcm")
"""
)

#: a MONAI Deploy application: the HOLOSCAN_* paths, and the SDK's older MONAI_* ones
MONAI = (
    COMMON
    + r"""
assert sys.argv[1:] == [], sys.argv
inp, out = Path(os.environ["HOLOSCAN_INPUT_PATH"]), Path(os.environ["HOLOSCAN_OUTPUT_PATH"])
assert os.environ["MONAI_INPUTPATH"] == str(inp) and os.environ["MONAI_OUTPUTPATH"] == str(out)
model = Path(os.environ["HOLOSCAN_MODEL_PATH"])
assert os.environ["MONAI_MODELPATH"] == str(model) and model.read_text() == "weights"
mode = os.environ["APP_MODE"]
sources = sorted(inp.rglob("*.dcm"))
assert sources
if mode == "good":
    (out / "seg").mkdir()
    results(sources, out / "seg", ("SEG",))
elif mode == "study":
    results(sources, out, ("SEG",))
    other_study(out / "seg.dcm")
elif mode == "sc":
    results(sources, out, ("SC",))
"""
)


def mercure(script: Path, mode: str) -> dict[str, object]:
    return {
        "command": [sys.executable, str(script)],
        "contract": "mercure",
        "settings": {"mode": mode},
        "environment": {"PYTHONPATH": str(ROOT)},
    }


def monai(script: Path, model: Path, mode: str) -> dict[str, object]:
    return {
        "command": [sys.executable, str(script)],
        "contract": "monai-deploy",
        "model_path": str(model),
        "environment": {"PYTHONPATH": str(ROOT), "APP_MODE": mode},
    }


def test_every_configured_contract_has_an_adapter() -> None:
    assert set(CONTRACTS) == set(COMMAND_CONTRACTS)
    with pytest.raises(ValueError, match=r"needs a command .* or an image"):
        CommandModelSettings()
    with pytest.raises(ValueError, match="runtime 'podman' is set without an image"):
        CommandModelSettings(command=["x"], runtime="podman")


def test_an_image_runs_with_docker_or_podman(tmp_path: Path) -> None:
    job, model = tmp_path / "job", tmp_path / "model"
    run = ContainerRun(
        runtime="/usr/bin/docker",
        image="example/seg:1",
        name="dicomnode-job-7-1",
        input_dir=job / "in",
        output_dir=job / "out",
        job_json=job / "job.json",
        model_path=model,
        device="cuda:1",
        uid=1000,
        gid=1001,
    )
    argv = run.argv(CONTRACTS["monai-deploy"], ["--fast", "-i", "{input}"], {"A": "b"})
    assert argv == [
        "/usr/bin/docker", "run", "--rm", "--name", "dicomnode-job-7-1", "--network", "none",
        "--user", "1000:1001",
        "-v", f"{job}/in:/var/holoscan/input", "-v", f"{job}/out:/var/holoscan/output",
        "-v", f"{job}/job.json:/job/job.json:ro", "-v", f"{model}:/opt/holoscan/models:ro",
        "-e", "A=b", "--gpus", "device=1",
        "example/seg:1", "--fast", "-i", "/var/holoscan/input",
    ]  # fmt: skip
    assert run.kill_argv() == ["/usr/bin/docker", "kill", "dicomnode-job-7-1"]
    podman = ContainerRun(**{**run.__dict__, "runtime": "/usr/bin/podman", "device": "cpu",
                             "model_path": None})  # fmt: skip
    argv = podman.argv(CONTRACTS["mercure"], [], {})
    assert argv[-1] == "example/seg:1" and "--gpus" not in argv and "--device" not in argv
    assert argv[7:9] == ["--userns", "keep-id"] and f"{job}/in:/tmp/data" in argv
    assert f"{job}/out:/tmp/output" in argv and not any("models" in a for a in argv)
    gpu = ContainerRun(**{**podman.__dict__, "device": "cuda:0"})
    assert gpu.argv(CONTRACTS["dicomnode"], [], {})[-3:-1] == ["--device", "nvidia.com/gpu=0"]


def test_an_image_without_a_runtime_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither docker nor podman
    settings = CommandModelSettings(image="example/seg:1", contract="mercure")
    with pytest.raises(CommandModelFailed, match=r"image 'example/seg:1', but docker or podman"):
        CommandModel("seg", settings, PipelineSettings(strict=True)).load("cpu")
    lenient = CommandModel("seg", settings, PipelineSettings(strict=False))
    lenient.load("cpu")  # logged; every run fails with the reason
    assert lenient._refusal is not None and "not installed" in lenient._refusal
    podman = CommandModelSettings(image="example/seg:1", runtime="podman")
    with pytest.raises(CommandModelFailed, match="but podman is not installed"):
        CommandModel("seg", podman, PipelineSettings(strict=True)).load("cpu")


def test_an_image_with_a_command_runs_the_command_without_a_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's "docker or podman when one is installed; the plain command otherwise"."""
    program = tmp_path / "seg-tool"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # the program, neither docker nor podman
    settings = CommandModelSettings(image="example/seg:1", command=["seg-tool", "{input}"])
    model = CommandModel("seg", settings, PipelineSettings(strict=True))
    model.load("cpu")  # no refusal: the command runs on this machine
    assert model._refusal is None and model.runtime is None
    assert model._container(None, tmp_path, tmp_path / "in", tmp_path / "out") is None  # type: ignore[arg-type]


@pytest.mark.slow
def test_mercure_modules_and_monai_apps_run_through_the_worker(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    merc, app = tmp_path / "module.py", tmp_path / "app.py"
    merc.write_text(MERCURE)
    app.write_text(MONAI)
    model = tmp_path / "model.ts"
    model.write_text("weights")
    commands = {f"merc_{m}": mercure(merc, m) for m in ("good", "nothing", "copy", "study")}
    commands |= {f"monai_{m}": monai(app, model, m) for m in ("good", "study", "sc")}
    commands["monai_nothing"] = monai(app, model, "nothing")
    node = start_node(
        models={"commands": commands},
        workers=[{"models": sorted(commands)}],
        queue={"max_attempts": 1},
    )
    datasets = list(ct_slices(SeriesSpec(slices=4, rows=32, columns=32, seed=73)))
    files = write_series(datasets, tmp_path / "ct")
    assert peers.storescu(port_of(node), files).returncode == 0
    first = dcmread(files[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    for name in commands:
        node.jobs.enqueue(
            dedupe_key=f"contract/{name}",
            route="contracts",
            model=name,
            study_instance_uid=study,
            series_instance_uid=series,
            inputs=[series],
            state=JobState.QUEUED,
        )
    wait_until(
        lambda: all(j.final for j in node.jobs.list(limit=50)),
        timeout=120,
        interval=0.2,
        what="every contract's job to end",
    )
    jobs = {j.model: j for j in node.jobs.list(limit=50)}

    good = jobs["merc_good"]
    assert good.state is JobState.DONE, good.error
    assert good.result is not None and good.result["contract"] == "mercure"
    assert good.result["module_result"] == {"volume_ml": 12.5}  # kept, not sent
    objects = good.result["objects"]
    assert sorted(o["kind"] for o in objects) == ["IMAGE", "SC", "SEG"]
    monai_good = jobs["monai_good"]
    assert monai_good.state is JobState.DONE, monai_good.error
    assert monai_good.result is not None
    assert [o["kind"] for o in monai_good.result["objects"]] == ["SEG"]
    for o in objects + monai_good.result["objects"]:
        ds = dcmread(node.spool.root / o["path"])
        assert str(ds.StudyInstanceUID) == study and ds.PatientID == first.PatientID
        assert str(ds.SeriesInstanceUID) != series
        if has_tool("dciodvfy"):
            report = dciodvfy(node.spool.root / o["path"])
            assert not report.errors, (o["kind"], report.output)
    # task.json (Patient ID, accession) went with the copies of the inputs
    assert not (node.spool.root / "results" / str(good.id) / "command" / "in").exists()

    reasons = {
        "merc_nothing": r"wrote nothing to out/ \(expected DICOM SEG/SR/SC/derived image",
        "merc_copy": r"out/copy\.dcm has SOP class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.2 and "
        r"ImageType ORIGINAL.*the mercure contract takes SEG, SR, Secondary Capture",
        "merc_study": r"out/seg\.dcm is of study 1\.2\.826\.0\.1\.3680043\.10\.1447\.999",
        "monai_nothing": r"wrote nothing to out/ \(expected DICOM SEG/SR files\)",
        "monai_study": r"out/seg\.dcm is of study 1\.2\.826\.0\.1\.3680043\.10\.1447\.999",
        "monai_sc": r"out/sc\.dcm has SOP class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.7; the "
        r"monai-deploy contract takes SEG",
    }
    for name, reason in reasons.items():
        job = jobs[name]
        assert job.state is JobState.FAILED, (name, job.state)
        assert job.error is not None and re.search(reason, job.error), (name, job.error)
        assert str(first.PatientID) not in job.error
        assert not (node.spool.root / "results" / str(job.id)).exists(), name
    job_json = json.loads(
        (node.spool.root / "results" / str(monai_good.id) / "command" / "job.json").read_text()
    )
    assert job_json["contract"] == "monai-deploy"
