"""The acquisition envelope through the node: a series stored by dcmtk, routed, run by the
node's worker, its objects sent to a dcmtk PACS. A route that refuses an input outside its
model's envelope skips the job at once with the reasons, in the job, the API, ``jobs show`` and a
"not analysed" SR the PACS receives; a route that flags it runs the model and marks every object.
A command model's envelope is checked from the headers before its program runs. A one-slice
localizer the lung model cannot take fails at once, not after three attempts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from dicomnode.admin import job_detail
from dicomnode.app import Node
from dicomnode.cli import _jobs_show
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers, validators
from dicomnode.testing.bundles import write_model_package
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of
from tests.integration.test_results_objects import texts

pytest.importorskip("torch")
pytest.importorskip("highdicom")

QUICK = {"quiet_s": 0.5, "release_grace_s": 0.2, "confirm_s": 0}
#: the generated CT's slices are 1.25 mm: outside this model's 0.5-1.0 mm
ENVELOPE = """
modalities = ["CT"]
slice_thickness_mm = [0.5, 1.0]
"""
REASON = "slice thickness 1.25 mm is outside 0.5-1 mm"


def received(folder: Path) -> dict[str, Any]:
    """The objects the PACS holds, by SOP Instance UID."""
    out = {}
    for path in folder.rglob("*"):
        if path.is_file():
            ds = dcmread(path, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = ds
    return out


def both_jobs(node: Node) -> dict[str, Any]:
    wait_until(
        lambda: len(jobs := node.jobs.list(limit=10)) == 2 and all(j.final for j in jobs),
        timeout=120,
        interval=0.2,
        what="both jobs' end",
    )
    return {j.route: j for j in node.jobs.list(limit=10)}


@pytest.mark.slow
def test_a_route_refuses_or_flags_an_input_outside_the_envelope(
    start_node: Callable[..., Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_model_package(tmp_path / "models", "stats", envelope=ENVELOPE)
    route = {"model": "stats", "match": {"Modality": "CT"}, "completion": QUICK,
             "destinations": ["pacs"]}  # fmt: skip
    with peers.storescp(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = start_node(
            models={"dirs": [tmp_path / "models"]},
            workers=[{"models": ["stats"]}],
            routing={"mode": "all"},
            routes=[
                {"name": "refusing", **route},
                {"name": "flagging", "envelope": "flag", **route},
            ],
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs}],
            queue={"max_attempts": 3, "backoff_s": 30},
            api={"token": "t"},
        )
        spec = SeriesSpec(slices=8, rows=32, columns=32, seed=91)
        files = write_series(ct_slices(spec), tmp_path / "ct")
        stored = peers.storescu(port_of(node), files)
        assert stored.returncode == 0, stored.stderr
        jobs = both_jobs(node)
        refused, flagged = jobs["refusing"], jobs["flagging"]
        sent = 1 + len(flagged.result["objects"])
        wait_until(lambda: len(received(tmp_path / "pacs")) >= sent, timeout=60, what="sends")
        assert node.api is not None
        with httpx.Client(base_url=node.api.url, timeout=20) as http:
            auth = {"Authorization": "Bearer t"}
            shown = http.get(f"/api/jobs/{refused.id}", headers=auth)
    pacs_objects = received(tmp_path / "pacs")

    # refused: skipped after one attempt, with the reasons
    assert refused.state is JobState.SKIPPED and refused.attempts == 1, refused.error
    assert refused.error == f"stats was not validated for this input: {REASON}"
    assert refused.result is not None
    assert refused.result["envelope"] == {"inside": False, "reasons": [REASON], "policy": "refuse"}
    assert "findings" not in refused.result and "masks" not in refused.result  # never ran
    first = dcmread(files[0], stop_before_pixels=True)
    assert refused.result["source"] == {  # for the drift metrics, beyond the spool's retention
        "manufacturer": str(first.get("Manufacturer", "")),
        "manufacturer_model": str(first.get("ManufacturerModelName", "")),
        "calling_ae": "STORESCU",
    }
    assert flagged.result["source"] == refused.result["source"]
    (sr_entry,) = refused.result["objects"]
    assert sr_entry["kind"] == "SR"
    # in the API
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["state"] == "skipped" and body["error"] == refused.error
    assert body["result"]["envelope"] == refused.result["envelope"]
    # and in the SR the PACS received: "not analysed", and why, and no claim about the patient
    sr_path = node.spool.root / sr_entry["path"]
    validators.require_tool("dciodvfy")
    report = validators.dciodvfy(sr_path)
    assert report.errors == (), report.output
    sr = dcmread(sr_path)
    assert str(sr.SOPInstanceUID) in pacs_objects
    assert sr.SeriesDescription == "NOT ANALYSED: stats findings (demo)"
    said = texts(sr)
    assert f"Not analysed: stats was not validated for this input: {REASON}." in said
    assert sr.StudyInstanceUID == dcmread(files[0]).StudyInstanceUID
    assert not any(s.startswith("No findings") for s in said)

    # flagged: the model ran; the job and every object say the input was outside
    assert flagged.state is JobState.DONE and flagged.attempts == 1, flagged.error
    assert flagged.result["envelope"] == {"inside": False, "reasons": [REASON], "policy": "flag"}
    kinds = sorted(o["kind"] for o in flagged.result["objects"])
    assert "SEG" in kinds and "SR" in kinds
    for entry in flagged.result["objects"]:
        ds = dcmread(node.spool.root / entry["path"], stop_before_pixels=True)
        assert ds.SeriesDescription.startswith("UNVALIDATED INPUT: "), entry["kind"]
        assert str(ds.SOPInstanceUID) in pacs_objects
        assert ds.SOPInstanceUID != sr.SOPInstanceUID  # the report's UIDs are its own
        if entry["kind"] == "SR":
            assert (
                f"Outside the model's validated acquisition envelope: stats was not validated "
                f"for this input: {REASON}"
            ) in texts(ds)

    # `jobs show` says it in one line
    capsys.readouterr()
    detail = json.loads(json.dumps(job_detail(node.database.sessions, refused), default=str))
    _jobs_show(detail, as_json=False)
    assert f"envelope:            OUTSIDE (refused): {REASON}" in capsys.readouterr().out


#: a command model that finds nothing: the node writes its SR from findings.json
EMPTY_FINDINGS = "import pathlib, sys; pathlib.Path(sys.argv[2], 'findings.json').write_text('[]')"


@pytest.mark.slow
def test_a_command_models_envelope_is_checked_from_the_headers(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    program = {
        "command": [
            sys.executable,
            "-c",
            f"import pathlib; pathlib.Path({str(ran)!r}).touch(); {EMPTY_FINDINGS}",
            "{input}",
            "{output}",
        ],
        "envelope": {"modalities": ["CT"], "slice_thickness_mm": [0.5, 1.0]},
    }
    route = {"match": {"Modality": "CT"}, "completion": QUICK}
    node = start_node(
        models={"commands": {"cmd_refuse": program, "cmd_flag": program}},
        workers=[{"models": ["cmd_refuse", "cmd_flag"]}],
        routing={"mode": "all"},
        routes=[
            {"name": "refusing", "model": "cmd_refuse", **route},
            {"name": "flagging", "model": "cmd_flag", "envelope": "flag", **route},
        ],
        queue={"max_attempts": 3},
    )
    files = write_series(
        ct_slices(SeriesSpec(slices=4, rows=16, columns=16, seed=94)), tmp_path / "ct"
    )
    assert peers.storescu(port_of(node), files).returncode == 0
    jobs = both_jobs(node)
    refused, flagged = jobs["refusing"], jobs["flagging"]
    assert refused.state is JobState.SKIPPED and refused.attempts == 1, refused.error
    assert refused.error == f"cmd_refuse was not validated for this input: {REASON}"
    assert refused.result is not None and "exit_code" not in refused.result  # never ran
    (sr_entry,) = refused.result["objects"]
    sr = dcmread(node.spool.root / sr_entry["path"])
    assert f"Not analysed: cmd_refuse was not validated for this input: {REASON}." in texts(sr)
    assert sr.SeriesDescription.startswith("NOT ANALYSED: ")

    assert flagged.state is JobState.DONE, flagged.error
    assert flagged.result is not None and flagged.result["exit_code"] == 0
    assert ran.exists()  # the flagging route's program ran
    assert flagged.result["envelope"] == {"inside": False, "reasons": [REASON], "policy": "flag"}
    assert flagged.result["objects"]
    for entry in flagged.result["objects"]:  # the node's own SR of findings.json
        ds = dcmread(node.spool.root / entry["path"], stop_before_pixels=True)
        assert ds.SeriesDescription.startswith("UNVALIDATED INPUT: "), entry["kind"]


@pytest.mark.slow
def test_a_one_slice_localizer_routed_to_the_lung_model_fails_at_once(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """ "needs at least 16 slices" cannot change by waiting: one attempt, not three."""
    lung = {"name": "lung", "model": "lung_nodule", "match": {"Modality": "CT"}}
    lung["completion"] = QUICK
    node = start_node(
        workers=[{"models": ["lung_nodule"]}],
        routes=[lung],
        queue={"max_attempts": 3, "backoff_s": 0},
    )
    localizer = list(ct_slices(SeriesSpec(slices=1, rows=64, columns=64, seed=93)))
    for ds in localizer:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.BodyPartExamined = "CHEST"
    files = write_series(localizer, tmp_path / "scout")
    assert peers.storescu(port_of(node), files).returncode == 0
    wait_until(
        lambda: (jobs := node.jobs.list(limit=10)) and jobs[0].final,
        timeout=180,
        interval=0.2,
        what="the job's end",
    )
    (job,) = node.jobs.list(limit=10)
    assert job.state is JobState.FAILED and job.attempts == 1, (job.state, job.attempts)
    assert job.error is not None and "needs at least 16 slices" in job.error
