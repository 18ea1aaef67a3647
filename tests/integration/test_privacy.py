"""No patient data in the logs at INFO: a study with recognisable patient attributes goes
through a running ``serve`` (received, routed, run), and its log holds none of them."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomnode.phantoms.demo import chest_study
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.process import ServeProcess, cli
from dicomnode.testing.waiting import wait_until

CONFIG = """
[[routes]]
name = "chest"
model = "echo"
match = { Modality = "CT" }
completion = { quiet_s = 30, release_grace_s = 1, confirm_s = 0 }
"""
CANARIES = {
    "PatientName": "Zqcanary^Xyprivate",
    "PatientID": "CANARY-4711-ID",
    "AccessionNumber": "CANARYACC99",
    "PatientBirthDate": "19010203",
}


@pytest.mark.slow
def test_logs_at_info_hold_no_patient_data(tmp_path: Path) -> None:
    datasets = list(ct_slices(SeriesSpec(slices=12, seed=71)))
    for ds in datasets:
        for keyword, value in CANARIES.items():
            setattr(ds, keyword, value)
    files = write_series(datasets, tmp_path / "ct")
    config = tmp_path / "node.toml"
    config.write_text(CONFIG)
    node = ServeProcess(tmp_path / "node", config=config).start()
    try:
        assert peers.storescu(node.port, files).returncode == 0

        def listed() -> subprocess.CompletedProcess[str]:
            return cli("jobs", "list", "--json", env=node.env)

        def done() -> bool:
            jobs = json.loads(listed().stdout or "[]")
            return bool(jobs) and jobs[0]["state"] == "done"

        wait_until(done, timeout=60, interval=0.3, what="the job to finish", detail=listed)
    finally:
        node.stop()
    log = node.log.read_text(errors="replace")
    assert "received" in log.lower() or "stored" in log.lower(), "the log is empty: wrong file?"
    for keyword, value in CANARIES.items():
        parts = [value, *value.split("^")] if "^" in value else [value]
        for part in parts:
            assert part not in log, f"{keyword} ({part!r}) is in the INFO log"


#: recognisable patient attributes for the whole path; the name has no caret, which makes
#: highdicom warn with the name in the text (issue 16) when it builds the result objects
WHOLE_PATH_CANARIES = {
    "PatientName": "ZQCANARY XYPRIVATE",
    "PatientID": "CANARY-0815-PID",
    "AccessionNumber": "CANARYACC42",
    "PatientBirthDate": "19020304",
    "ReferringPhysicianName": "Qwreferrer^Canary",
}
WHOLE_PATH_CONFIG = """
[api]
token = "{token}"

[[destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {pacs_port}

[[routes]]
name = "chest-ct"
model = "lung_nodule"
match = {{ Modality = "CT" }}
destinations = ["pacs"]
completion = {{ quiet_s = 30, release_grace_s = 1, confirm_s = 0 }}
"""


@pytest.mark.slow
def test_no_patient_data_in_the_log_on_any_path(tmp_path: Path) -> None:
    """receive, intake, model, results (highdicom), send and API: the log at the level that
    ships (INFO) holds no patient attribute, and library warnings come through withheld."""
    study = chest_study(tmp_path / "chest")
    for path in study.files:
        ds = dcmread(path)
        for keyword, value in WHOLE_PATH_CANARIES.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    token = "t" * 32
    config = tmp_path / "node.toml"
    with peers.storescp(tmp_path / "pacs") as pacs_port:
        config.write_text(WHOLE_PATH_CONFIG.format(token=token, pacs_port=pacs_port))
        api_port = peers.free_port()
        node = ServeProcess(tmp_path / "node", config=config)
        node.env["DICOMNODE_API__PORT"] = str(api_port)
        node.start()
        try:
            assert peers.storescu(node.port, study.files).returncode == 0

            def jobs() -> list[dict[str, Any]]:
                return list(_api(api_port, "/api/jobs", token)["jobs"])

            finished = wait_until(
                lambda: (found := jobs()) and found[0]["state"] in ("done", "failed") and found,
                timeout=300,
                interval=0.5,
                what="the lung job to end",
            )
            assert finished[0]["state"] == "done", finished[0]
            wait_until(
                lambda: len(list((tmp_path / "pacs").rglob("*"))) >= 2,
                timeout=120,
                what="the results at the PACS",
            )
            studies = _api(api_port, "/api/studies", token)
            assert WHOLE_PATH_CANARIES["PatientID"] in json.dumps(studies)  # the API has it
            _api(api_port, f"/api/jobs/{finished[0]['id']}", token)
        finally:
            node.stop()
    log = node.log.read_text(errors="replace")
    assert "lung_nodule" in log and "association" in log.lower(), "wrong log file?"
    assert "withheld" in log, "highdicom's warning about the name came through, withheld"
    for keyword, value in WHOLE_PATH_CANARIES.items():
        for part in {value, *value.replace("^", " ").split()}:
            assert part not in log, f"{keyword} ({part!r}) is in the log"


def _api(port: int, path: str, token: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
