"""Command models (``[models.commands.NAME]``) run by the node's own worker: a program gets the
job's series in ``in/`` and ``job.json``, and what it writes to ``out/`` under the ``dicomnode``
contract is checked and sent as it is, or fails the job with the reason; nothing of a failed
run is sent, and a program past its timeout dies with its whole process group."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.api.phi import redact
from dicomnode.app import Node
from dicomnode.config import CommandModelSettings, ModelsSettings
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.pipeline.commands import command_argv, cuda_visible_devices
from dicomnode.testing import peers
from dicomnode.testing.validators import dciodvfy, has_tool
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

ROOT = Path(__file__).resolve().parents[2]

#: the test's command model: argv[1] in/, argv[2] out/, argv[3] what to do
PROGRAM = r"""
import json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import pydicom

inp, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
job = json.loads(Path("job.json").read_text())  # the cwd is the job's folder
sources = sorted(inp.glob("*.dcm"))
assert len(sources) == sum(len(s["files"]) for s in job["series"]) > 0
assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["CMD_TEST"] == "yes"


def results(kinds):
    from dicomnode.testing.result_objects import write_result_objects

    with tempfile.TemporaryDirectory() as tmp:
        for o in write_result_objects(sources, Path(tmp), job["job_id"], kinds=kinds):
            shutil.move(Path(tmp) / o["path"], out / (o["kind"].lower() + ".dcm"))


if mode == "good":
    results(("SEG", "SR"))
    print("wrote a SEG and an SR")
elif mode == "exit3":
    print("model crashed: CUDA out of memory (simulated)", file=sys.stderr)
    sys.exit(3)
elif mode == "sleep":
    child = subprocess.Popen(["sleep", "300"])  # a grandchild the timeout must kill too
    Path(os.environ["CMD_PID_FILE"]).write_text(str(child.pid))
    results(("SEG",))  # written, then the run times out: never sent
    time.sleep(300)
elif mode == "nothing":
    pass
elif mode == "garbage":
    (out / "result.dcm").write_bytes(b"not DICOM at all" * 20)
elif mode in ("study", "patient"):
    results(("SEG",))
    ds = pydicom.dcmread(out / "seg.dcm")
    if mode == "study":
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1447.999"
    else:
        ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(out / "seg.dcm")
elif mode == "findings":
    nodule = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
    findings = [{"label": "nodule", "finding_type": nodule, "probability": 0.875,
                 "diameter_mm": 6.5, "attributes": {"note": "from a command"}}]
    (out / "findings.json").write_text(json.dumps({"findings": findings, "summary": {"n": 1}}))
elif mode == "badfindings":
    (out / "findings.json").write_text(json.dumps([{"label": "nodule"}]))
elif mode == "image":
    shutil.copy(sources[0], out / "copy.dcm")  # the input itself: no SEG or SR
"""

MODES = (
    "good", "findings", "exit3", "sleep", "nothing", "garbage", "study", "patient", "image",
    "badfindings",
)  # fmt: skip


def command(script: Path, mode: str, **extra: object) -> dict[str, object]:
    return {
        "command": [sys.executable, str(script), "{input}", "{output}", mode],
        "environment": {"PYTHONPATH": str(ROOT), "CMD_TEST": "yes"},
        **extra,
    }


def test_the_settings_check_the_contract_and_names() -> None:
    settings = CommandModelSettings(command=["seg-tool", "--fast"])
    assert settings.contract == "dicomnode" and settings.timeout_s == 3600
    with pytest.raises(ValueError, match=r"contract 'nifti' is not supported.*not supported yet"):
        CommandModelSettings(command=["x"], contract="nifti")
    with pytest.raises(ValueError, match="command"):
        CommandModelSettings(command=[])
    with pytest.raises(ValueError, match="command model name 'a b'"):
        ModelsSettings(commands={"a b": {"command": ["x"]}})
    # placeholders are replaced; without them the folders are appended
    assert command_argv(["t", "-i", "{input}", "--out={output}"], Path("/i"), Path("/o")) == [
        "t", "-i", "/i", "--out=/o"
    ]  # fmt: skip
    assert command_argv(["t", "-v"], Path("/i"), Path("/o")) == ["t", "-v", "/i", "/o"]
    assert [cuda_visible_devices(d) for d in ("cpu", "cuda", "cuda:1")] == ["", "0", "1"]


@pytest.mark.slow
def test_command_models_run_through_the_worker(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    pid_file = tmp_path / "grandchild.pid"
    commands = {f"cmd_{mode}": command(script, mode) for mode in MODES}
    commands["cmd_sleep"] = command(
        script, "sleep", timeout_s=3, environment={
            "PYTHONPATH": str(ROOT), "CMD_TEST": "yes", "CMD_PID_FILE": str(pid_file)}
    )  # fmt: skip
    # a program for MR only: a CT job is refused before it runs
    commands["cmd_mronly"] = command(script, "good", accepts={"modalities": ["MR"]})
    with peers.storescp(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = start_node(
            models={"commands": commands},
            workers=[{"models": sorted(commands)}],
            queue={"max_attempts": 1},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs}],
        )
        datasets = list(ct_slices(SeriesSpec(slices=6, rows=32, columns=32, seed=71)))
        files = write_series(datasets, tmp_path / "ct")
        stored = peers.storescu(port_of(node), files)
        assert stored.returncode == 0, stored.stderr
        first = dcmread(files[0])
        study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        for mode in (*MODES, "mronly"):
            node.jobs.enqueue(
                dedupe_key=f"cmd/{mode}",
                route="commands",
                model=f"cmd_{mode}",
                study_instance_uid=study,
                series_instance_uid=series,
                inputs=[series],
                destinations=["pacs"],
                state=JobState.QUEUED,
            )
        wait_until(
            lambda: all(j.final for j in node.jobs.list(limit=50)),
            timeout=120,
            interval=0.2,
            what="every command model's job to end",
        )
        jobs = {j.model.removeprefix("cmd_"): j for j in node.jobs.list(limit=50)}
        good = jobs["good"]
        assert good.state is JobState.DONE, good.error
        assert good.result is not None
        objects = good.result["objects"]
        assert sorted(o["kind"] for o in objects) == ["SEG", "SR"]
        written = {o["sop_instance_uid"]: node.spool.root / o["path"] for o in objects}
        # sent as the program wrote them
        received = tmp_path / "pacs"
        wait_until(
            lambda: len([p for p in received.rglob("*") if p.is_file()]) >= 5,
            timeout=60,
            what="the objects' sends",
        )
    got = {str(dcmread(p).SOPInstanceUID) for p in received.rglob("*") if p.is_file()}
    # the SEG, the SR, and the node's SR, key image and KOS below
    assert set(written) <= got and len(got) == 5
    for path in written.values():
        ds = dcmread(path)
        assert str(ds.StudyInstanceUID) == study and ds.PatientID == first.PatientID
        if has_tool("dciodvfy"):
            report = dciodvfy(path)
            assert not report.errors, report.output
    # the job's folder keeps job.json and the logs; the copies of the inputs are gone
    folder = node.spool.root / "results" / str(good.id) / "command"
    job_json = json.loads((folder / "job.json").read_text())
    assert job_json["study_instance_uid"] == study and job_json["model"] == "cmd_good"
    assert job_json["series"][0]["series_instance_uid"] == series
    assert job_json["device"] == "cpu" and "PatientName" not in json.dumps(job_json)
    assert not (folder / "in").exists()
    assert "wrote a SEG and an SR" in (folder / "stdout.log").read_text()
    assert good.result["exit_code"] == 0 and good.result["contract"] == "dicomnode"
    # what `jobs show` and the API show of the run; a token without phi never sees it
    assert good.result["program_output"]["stdout"] == "wrote a SEG and an SR"
    assert redact(good.result)["program_output"] is None

    # findings.json: the node's own SR of the input's study, with the program's finding
    findings = jobs["findings"]
    assert findings.state is JobState.DONE, findings.error
    assert findings.result is not None
    (finding,) = findings.result["findings"]
    assert finding["label"] == "nodule" and finding["probability"] == 0.875
    assert findings.result["summary"] == {"n": 1}
    sr, key, kos = findings.result["objects"]
    assert (key["kind"], kos["kind"]) == ("SC", "KO")  # its key image and KOS, sent too
    assert {key["sop_instance_uid"], kos["sop_instance_uid"]} <= got
    assert sr["kind"] == "SR" and sr["study_instance_uid"] == study
    sr_path = node.spool.root / sr["path"]
    assert sr_path.is_file() and sr["sop_instance_uid"] in got
    if has_tool("dciodvfy"):
        report = dciodvfy(sr_path)
        assert not report.errors, report.output

    reasons = {
        "badfindings": r"findings\.json has a finding the node cannot read",
        "exit3": r"exited with status 3; stderr ends: model crashed: CUDA out of memory",
        "sleep": r"ran past its timeout of 3 s and was killed",
        "nothing": r"wrote nothing to out/",
        "garbage": r"out/result\.dcm is not a DICOM file",
        "study": r"out/seg\.dcm is of study 1\.2\.826\.0\.1\.3680043\.10\.1447\.999; the input's",
        "patient": r"out/seg\.dcm has another Patient ID than the input's",
        "image": r"out/copy\.dcm has SOP class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.2; the dicomnode "
        r"contract",
    }
    for mode, reason in reasons.items():
        job = jobs[mode]
        assert job.state is JobState.FAILED, (mode, job.state)
        assert job.error is not None and job.error.startswith("Command"), job.error
        assert re.search(reason, job.error), (mode, job.error)
        assert "SOMEONE-ELSE" not in job.error and str(first.PatientID) not in job.error
        # nothing of a failed run was published, so nothing of it can be sent
        assert not (node.spool.root / "results" / str(job.id)).exists(), mode
    refused = jobs["mronly"]
    assert refused.state is JobState.FAILED and refused.error is not None
    assert re.search(r"'cmd_mronly' accepts modality MR; series .* is CT", refused.error)
    assert not (node.spool.root / "results" / str(refused.id)).exists()
    assert {o["job_id"] for o in _sends(node)} == {good.id, findings.id}
    # the timeout killed the program's whole process group, its grandchild too
    grandchild = int(pid_file.read_text())
    wait_until(lambda: not _alive(grandchild), timeout=10, what="the grandchild's end")


def _sends(node: Node) -> list[dict[str, int]]:
    from sqlalchemy import text

    with node.database.sessions() as session:
        rows = session.execute(text("SELECT job_id FROM sends")).all()
    return [{"job_id": row.job_id} for row in rows]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie no one reaps (its parent was killed) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_cancelling_a_job_kills_its_command(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    pid_file = tmp_path / "grandchild.pid"
    sleeper = command(
        script, "sleep", environment={
            "PYTHONPATH": str(ROOT), "CMD_TEST": "yes", "CMD_PID_FILE": str(pid_file)}
    )  # fmt: skip
    node = start_node(
        models={"commands": {"sleeper": sleeper}},
        workers=[{"models": ["sleeper"]}],
        queue={"max_attempts": 1, "heartbeat_s": 0.2, "lease_s": 5},
    )
    files = write_series(
        list(ct_slices(SeriesSpec(slices=3, rows=16, columns=16, seed=72))), tmp_path / "ct"
    )
    assert peers.storescu(port_of(node), files).returncode == 0
    first = dcmread(files[0])
    job = node.jobs.enqueue(
        dedupe_key="cmd/cancel",
        route="commands",
        model="sleeper",
        study_instance_uid=str(first.StudyInstanceUID),
        inputs=[str(first.SeriesInstanceUID)],
        state=JobState.QUEUED,
    )
    wait_until(lambda: pid_file.is_file() and pid_file.read_text(), timeout=60, what="the start")
    grandchild = int(pid_file.read_text())
    assert _alive(grandchild)
    node.jobs.cancel(job.id, reason="test")
    wait_until(lambda: not _alive(grandchild), timeout=20, what="the process group's end")
    wait_until(lambda: node.workers[0].jobs_run == 1, timeout=20, what="the run's end")
    cancelled = node.jobs.get(job.id)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert not (node.spool.root / "results" / str(job.id)).exists()
