"""Shadow routes through the real node, and drift metrics that follow the input.

A CT series goes to a node with a live route and a shadow route, both naming the same PACS
(dcmtk's storescp): both jobs run (command models writing findings.json, so the node writes its
own SR, key images and KOS), the PACS receives the live job's objects only, the shadow job's stay
under results/<job id>/, and the compare API pairs the two and counts what agrees. The drift
metrics are read as Prometheus reads them, before and after more jobs finish.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from dicomnode.api.context import ApiContext
from dicomnode.api.metrics import make_registry
from dicomnode.app import Node
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

#: a command model that writes the findings of the file named by argv[3] as findings.json
PROGRAM = """
import shutil, sys
from pathlib import Path
shutil.copy(sys.argv[3], Path(sys.argv[2]) / "findings.json")
"""
NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
TOKEN = "shadow-test-token"


def nodule(x: float, probability: float = 0.9) -> dict[str, Any]:
    return {"label": "nodule", "finding_type": NODULE, "probability": probability,
            "centre_mm": [x, 0.0, 0.0], "diameter_mm": 6.0}  # fmt: skip


def command_model(tmp_path: Path, name: str, findings: list[dict[str, Any]]) -> dict[str, Any]:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    listed = tmp_path / f"{name}.json"
    listed.write_text(json.dumps({"findings": findings}))
    return {"command": [sys.executable, str(script), "{input}", "{output}", str(listed)]}


def received_uids(folder: Path) -> set[str]:
    return {str(dcmread(p).SOPInstanceUID) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_shadow_route_runs_keeps_its_results_and_never_sends(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    # live: nodules at x = 0 and 40; shadow: at 3 (the same nodule, 3 mm off) and 80 (new)
    commands = {
        "lung_v1": command_model(tmp_path, "live", [nodule(0.0), nodule(40.0)]),
        "lung_v2": command_model(tmp_path, "shadow", [nodule(3.0), nodule(80.0)]),
    }
    pacs_folder = tmp_path / "pacs"
    with peers.storescp(pacs_folder, ae_title="PACS") as pacs:
        destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs}
        node = start_node(
            models={"commands": commands},
            workers=[{"models": sorted(commands)}],
            destinations=[destination],
            routes=[
                {"name": "chest", "model": "lung_v1", "match": {"Modality": "CT"},
                 "destinations": ["pacs"], "completion": {"quiet_s": 30, "release_grace_s": 0}},
                {"name": "chest_v2", "model": "lung_v2", "match": {"Modality": "CT"},
                 "mode": "shadow", "destinations": ["pacs"]},
            ],
            api={"token": TOKEN},
        )  # fmt: skip
        files = write_series(ct_slices(SeriesSpec(slices=6, rows=32, columns=32, seed=91)),
                             tmp_path / "ct")  # fmt: skip
        stored = peers.storescu(port_of(node), files)
        assert stored.returncode == 0, stored.stderr
        wait_until(
            lambda: len(jobs := node.jobs.list()) == 2 and all(j.final for j in jobs),
            timeout=120,
            interval=0.2,
            what="the live and the shadow job to end",
            detail=lambda: [(j.route, j.state, j.error) for j in node.jobs.list()],
        )
        by_route = {job.route: job for job in node.jobs.list()}
        live, shadow = by_route["chest"], by_route["chest_v2"]
        assert live.state is JobState.DONE, live.error
        assert shadow.state is JobState.DONE, shadow.error
        assert (live.mode, shadow.mode) == ("live", "shadow")
        assert shadow.destinations == () and shadow.sent_at is None
        assert live.result is not None and shadow.result is not None
        live_uids = {o["sop_instance_uid"] for o in live.result["objects"]}
        shadow_uids = {o["sop_instance_uid"] for o in shadow.result["objects"]}
        assert live_uids and shadow_uids and not live_uids & shadow_uids
        for o in shadow.result["objects"]:  # kept where the results package writes them
            assert (node.spool.root / o["path"]).is_file()
            assert o["path"].startswith(f"results/{shadow.id}/")
        wait_until(
            lambda: received_uids(pacs_folder) == live_uids,
            timeout=60,
            what="the live job's objects at the PACS",
            detail=lambda: received_uids(pacs_folder),
        )
        assert node.sender is not None and node.sender.queue.for_job(shadow.id) == []

        assert node.api is not None
        with httpx.Client(base_url=node.api.url, timeout=20) as http:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            listed = http.get("/api/jobs", headers=headers).json()
            modes = {job["route"]: job["mode"] for job in listed["jobs"]}
            assert modes == {"chest": "live", "chest_v2": "shadow"}
            response = http.get(
                "/api/models/compare",
                params={"live": "chest", "shadow": "chest_v2", "since": "1h"},
                headers=headers,
            )
            assert http.get("/api/models/compare?live=a&shadow=b").status_code == 401
            table = http.get("/api/models/shadows", headers=headers).json()["comparisons"]
            assert '<table id="shadows">' in http.get("/").text
    assert response.status_code == 200, response.text
    numbers = response.json()
    assert numbers["inputs"] == 1
    assert (numbers["matched"], numbers["only_live"], numbers["only_shadow"]) == (1, 1, 1)
    assert numbers["pairs"] == [{"live_job": live.id, "shadow_job": shadow.id}]
    # the dashboard's table: the one shadow route against the one live route
    assert [(c["live"], c["shadow"], c["matched"]) for c in table] == [("chest", "chest_v2", 1)]
    # the pacs received nothing more after the compare either
    assert received_uids(pacs_folder) == live_uids


def scrape(node: Node) -> dict[str, dict[tuple[str, ...], float]]:
    """The drift samples as Prometheus parses them: name -> (model, manufacturer) -> value."""
    context = ApiContext(node.settings, node.database.sessions, node.jobs)
    text = generate_latest(make_registry(context)).decode()
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("dicomnode_model_"):
                key = (sample.labels["model"], sample.labels["manufacturer"],
                       sample.labels["calling_ae"])  # fmt: skip
                found.setdefault(sample.name, {})[key] = sample.value
    return found


def test_drift_metrics_follow_the_input(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node()
    series = {}
    for number, manufacturer in enumerate(("ACME", "Globex")):
        datasets = list(ct_slices(SeriesSpec(slices=3, rows=16, columns=16, seed=95 + number)))
        for ds in datasets:
            ds.Manufacturer = manufacturer
            ds.ManufacturerModelName = f"{manufacturer} CT 1"
        files = write_series(datasets, tmp_path / manufacturer)
        assert peers.storescu(port_of(node), files, calling_aet="SCANNER1").returncode == 0
        first = dcmread(files[0], stop_before_pixels=True)
        series[manufacturer] = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID))

    def finish(manufacturer: str, result: dict[str, Any]) -> None:
        study, uid = series[manufacturer]
        job = node.jobs.enqueue(
            dedupe_key=f"drift/{len(node.jobs.list(limit=100))}", route="chest", model="lung",
            study_instance_uid=study, series_instance_uid=uid, inputs=[uid],
            state=JobState.QUEUED,
        )  # fmt: skip
        assert node.jobs.claim("test-worker", ["lung"]) is not None
        assert node.jobs.finish(job.id, "test-worker", result) is JobState.DONE

    acme, globex = ("lung", "ACME", "SCANNER1"), ("lung", "Globex", "SCANNER1")
    finish("ACME", {"findings": []})
    finish("Globex", {"findings": [nodule(0.0, probability=0.75)]})
    before = scrape(node)
    assert before["dicomnode_model_jobs_finished_total"] == {acme: 1, globex: 1}
    assert before["dicomnode_model_jobs_positive_total"] == {acme: 0, globex: 1}
    assert before["dicomnode_model_confidence_sum"] == {acme: 0, globex: 0.75}
    assert before["dicomnode_model_confidence_count"] == {acme: 0, globex: 1}
    assert before["dicomnode_model_run_seconds_count"] == {acme: 1, globex: 1}
    assert before["dicomnode_model_out_of_envelope_total"] == {acme: 0, globex: 0}

    # ACME's next input: a positive finding, an indeterminate one, and outside the envelope
    indeterminate = {**nodule(9.0, probability=0.5), "attributes": {"indeterminate": True}}
    finish("ACME", {"findings": [nodule(0.0, probability=0.5), indeterminate],
                    "envelope": {"inside": False, "reasons": ["slice thickness"]}})  # fmt: skip
    after = scrape(node)
    assert after["dicomnode_model_jobs_finished_total"] == {acme: 2, globex: 1}
    assert after["dicomnode_model_jobs_positive_total"] == {acme: 1, globex: 1}
    assert after["dicomnode_model_confidence_sum"] == {acme: 0.5, globex: 0.75}
    assert after["dicomnode_model_indeterminate_findings_total"] == {acme: 1, globex: 0}
    assert after["dicomnode_model_out_of_envelope_total"] == {acme: 1, globex: 0}

    # a refusal counts as out of the envelope; a recorded source outlives the spool's files
    study, uid = series["Globex"]
    refused = node.jobs.enqueue(
        dedupe_key="drift/refused", route="chest", model="lung", study_instance_uid=study,
        series_instance_uid=uid, inputs=[uid], state=JobState.QUEUED,
    )  # fmt: skip
    assert node.jobs.claim("test-worker", ["lung"]) is not None
    source = {"manufacturer": "Initech", "manufacturer_model": "CT 9", "calling_ae": "CT9"}
    verdict = {"inside": False, "reasons": ["thick"], "policy": "refuse"}
    assert (
        node.jobs.refuse(
            refused.id, "test-worker", "outside", {"envelope": verdict, "source": source}
        )
        is JobState.SKIPPED
    )
    node.jobs.mark_skipped(  # skipped without a run (a count condition): not counted
        node.jobs.enqueue(dedupe_key="drift/never", route="chest", model="lung",
                          study_instance_uid=study, series_instance_uid=uid, inputs=[uid],
                          state=JobState.WAITING).id,
        "expected 40 instances, have 3",
    )  # fmt: skip
    for path in node.spool.root.rglob("*.dcm"):
        path.unlink()
    last = scrape(node)  # a new collector: the results that recorded no source lose the make
    initech, unknown = ("lung", "Initech", "CT9"), ("lung", "unknown", "SCANNER1")
    assert last["dicomnode_model_jobs_finished_total"] == {unknown: 3, initech: 1}
    assert last["dicomnode_model_out_of_envelope_total"] == {unknown: 1, initech: 1}
    assert last["dicomnode_model_jobs_positive_total"][initech] == 0
