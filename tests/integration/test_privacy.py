"""No patient data in the logs at INFO: a study with recognisable patient attributes goes
through a running ``serve`` (received, routed, run), and its log holds none of them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

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
