"""The acquisition envelope through the node: a series stored by dcmtk, routed, run by the
node's worker, its objects sent to a dcmtk PACS. A route that refuses an input outside its
model's envelope skips the job at once with the reasons, in the job, the API and a "not
analysed" SR; a route that flags it runs the model and marks every object. A one-slice
localizer the lung model cannot take fails at once, not after three attempts."""

from __future__ import annotations

import json
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
from dicomnode.testing.bundles import VOLUME_STATS_TOML, write_model_package
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

pytest.importorskip("torch")
hd = pytest.importorskip("highdicom")

QUICK = {"quiet_s": 0.5, "release_grace_s": 0.2, "confirm_s": 0}
#: the generated CT's slices are 1.25 mm: outside this model's 0.5-1.0 mm
ENVELOPE = """
[envelope]
modalities = ["CT"]
slice_thickness_mm = [0.5, 1.0]
pixel_spacing_mm = [0.5, 1.0]
"""
REASON = "slice thickness 1.25 mm is outside 0.5-1.0 mm"


def texts(ds: Any) -> list[str]:
    """Every TEXT value of an SR's content tree."""
    found = []
    for item in ds.get("ContentSequence") or ():
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found += texts(item)
    return found


def received(folder: Path) -> dict[str, Any]:
    """The objects the PACS holds, by SOP Instance UID."""
    out = {}
    for path in folder.rglob("*"):
        if path.is_file():
            ds = dcmread(path)
            out[str(ds.SOPInstanceUID)] = ds
    return out


@pytest.mark.slow
def test_a_route_refuses_or_flags_an_input_outside_the_envelope(
    start_node: Callable[..., Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = VOLUME_STATS_TOML.format(name="stats", level="series", modalities='["CT"]', inputs="")
    write_model_package(tmp_path / "models", "stats", toml=toml + ENVELOPE)
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
        files = write_series(ct_slices(SeriesSpec(slices=8, rows=32, columns=32, seed=91)),
                             tmp_path / "ct")  # fmt: skip
        stored = peers.storescu(port_of(node), files)
        assert stored.returncode == 0, stored.stderr
        wait_until(
            lambda: len(jobs := node.jobs.list(limit=10)) == 2 and all(j.final for j in jobs),
            timeout=120,
            interval=0.2,
            what="both jobs' end",
        )
        jobs = {j.route: j for j in node.jobs.list(limit=10)}
        refused, flagged = jobs["refusing"], jobs["flagging"]
        wait_until(
            lambda: len(received(tmp_path / "pacs")) >= 1 + len(flagged.result["objects"]),
            timeout=60,
            what="the objects' sends",
        )
        assert node.api is not None
        with httpx.Client(base_url=node.api.url, timeout=20) as http:
            shown = http.get(f"/api/jobs/{refused.id}", headers={"Authorization": "Bearer t"})
            flagged_shown = http.get(
                f"/api/jobs/{flagged.id}", headers={"Authorization": "Bearer t"}
            )
    pacs_objects = received(tmp_path / "pacs")

    # refused: skipped at once, after one attempt, with the reasons
    assert refused.state is JobState.SKIPPED and refused.attempts == 1
    assert refused.error == f"outside the acquisition envelope of model 'stats': {REASON}"
    assert refused.result is not None
    assert refused.result["envelope"] == {"inside": False, "reasons": [REASON], "policy": "refuse"}
    assert refused.result["findings"] == [] and "masks" not in refused.result
    (sr_entry,) = refused.result["objects"]
    assert sr_entry["kind"] == "SR"
    # in the API
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["state"] == "skipped" and body["error"] == refused.error
    assert body["envelope"] == refused.result["envelope"]
    # and in an SR sent to the route's destination: "not analysed", and why
    sr_path = node.spool.root / sr_entry["path"]
    validators.require_tool("dciodvfy")
    report = validators.dciodvfy(sr_path)
    assert report.errors == (), report.output
    sr = hd.sr.srread(sr_path)
    assert sr.SOPInstanceUID in pacs_objects
    assert sr.SeriesDescription == "NOT ANALYSED: stats findings"
    said = texts(sr)
    assert f"Not analysed: stats was not validated for this input: {REASON}" in said
    assert sr.StudyInstanceUID == dcmread(files[0]).StudyInstanceUID
    assert not any(s.startswith("No findings") for s in said)  # no claim about the patient

    # flagged: the model ran; the job and every object say the input was outside
    assert flagged.state is JobState.DONE and flagged.attempts == 1, flagged.error
    assert flagged.result is not None
    assert flagged.result["envelope"] == {"inside": False, "reasons": [REASON], "policy": "flag"}
    assert flagged_shown.json()["envelope"] == flagged.result["envelope"]
    kinds = sorted(o["kind"] for o in flagged.result["objects"])
    assert "SEG" in kinds and "SR" in kinds
    for entry in flagged.result["objects"]:
        ds = dcmread(node.spool.root / entry["path"], stop_before_pixels=True)
        assert ds.SeriesDescription.startswith("UNVALIDATED INPUT: "), entry["kind"]
        assert len(ds.SeriesDescription) <= 64
        assert str(ds.SOPInstanceUID) in pacs_objects
        if entry["kind"] == "SR":
            assert f"Outside the model's validated acquisition envelope: {REASON}" in texts(ds)
        checked = validators.dciodvfy(node.spool.root / entry["path"])
        assert checked.errors == (), f"{entry['kind']}: {checked.output}"

    # `jobs show` says it in one line
    capsys.readouterr()
    _jobs_show(json.loads(json.dumps(job_detail(node.database.sessions, refused), default=str)),
               as_json=False)  # fmt: skip
    assert f"envelope:            OUTSIDE (refused): {REASON}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_model_inside_its_envelope_says_so(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    toml = VOLUME_STATS_TOML.format(name="stats", level="series", modalities='["CT"]', inputs="")
    inside = ENVELOPE.replace("[0.5, 1.0]\npixel", "[0.5, 2.0]\npixel")
    write_model_package(tmp_path / "models", "stats", toml=toml + inside)
    node = start_node(
        models={"dirs": [tmp_path / "models"]},
        workers=[{"models": ["stats"]}],
        routes=[{"name": "r", "model": "stats", "match": {"Modality": "CT"}, "completion": QUICK}],
    )
    files = write_series(ct_slices(SeriesSpec(slices=4, rows=16, columns=16, seed=92)),
                         tmp_path / "ct")  # fmt: skip
    assert peers.storescu(port_of(node), files).returncode == 0
    wait_until(
        lambda: (jobs := node.jobs.list(limit=10)) and jobs[0].final,
        timeout=120,
        interval=0.2,
        what="the job's end",
    )
    (job,) = node.jobs.list(limit=10)
    assert job.state is JobState.DONE, job.error
    assert job.result is not None and job.result["envelope"] == {"inside": True, "policy": "refuse"}
    for entry in job.result["objects"]:
        ds = dcmread(node.spool.root / entry["path"], stop_before_pixels=True)
        assert not ds.SeriesDescription.startswith("UNVALIDATED")


@pytest.mark.slow
def test_a_one_slice_localizer_routed_to_the_lung_model_fails_at_once(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """ "needs at least 16 slices" cannot change by waiting: one attempt, not three."""
    node = start_node(
        workers=[{"models": ["lung_nodule"]}],
        routes=[
            {
                "name": "lung",
                "model": "lung_nodule",
                "match": {"Modality": "CT"},
                "completion": QUICK,
            }
        ],
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
    assert job.error is not None
    assert "InputsRejected: model 'lung_nodule' needs at least 16 slices" in job.error
    assert job.error.endswith("has 1")


#: a command model that finds nothing: the node writes its SR from findings.json
EMPTY_FINDINGS = "import pathlib, sys; pathlib.Path(sys.argv[2], 'findings.json').write_text('[]')"


@pytest.mark.slow
def test_a_command_models_envelope_is_checked_from_the_headers(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    import sys

    program = {
        "command": [sys.executable, "-c", EMPTY_FINDINGS, "{input}", "{output}"],
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
    wait_until(
        lambda: len(jobs := node.jobs.list(limit=10)) == 2 and all(j.final for j in jobs),
        timeout=120,
        interval=0.2,
        what="both jobs' end",
    )
    jobs = {j.route: j for j in node.jobs.list(limit=10)}
    refused, flagged = jobs["refusing"], jobs["flagging"]
    assert refused.state is JobState.SKIPPED and refused.attempts == 1, refused.error
    assert refused.error == f"outside the acquisition envelope of model 'cmd_refuse': {REASON}"
    assert refused.result is not None and "exit_code" not in refused.result  # never ran
    (sr_entry,) = refused.result["objects"]
    said = texts(dcmread(node.spool.root / sr_entry["path"]))
    assert f"Not analysed: cmd_refuse was not validated for this input: {REASON}" in said

    assert flagged.state is JobState.DONE, flagged.error
    assert flagged.result is not None and flagged.result["exit_code"] == 0
    assert flagged.result["envelope"] == {"inside": False, "reasons": [REASON], "policy": "flag"}
    for entry in flagged.result["objects"]:  # the node's own SR of findings.json
        ds = dcmread(node.spool.root / entry["path"], stop_before_pixels=True)
        assert ds.SeriesDescription.startswith("UNVALIDATED INPUT: "), entry["kind"]
