"""The audit trail of a real node: a series sent by dcmtk's storescu is received (one event for
the association, by its AE and host), routed by the node, cancelled from the CLI and retried
through the HTTP API, each by its actor; and nothing logged at INFO names the patient."""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from dicomnode.app import Node
from dicomnode.audit import list_events
from dicomnode.cli import main
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import CT_IMAGE_STORAGE, write_series
from dicomnode.queue.listing import JobFilter
from dicomnode.testing import peers
from dicomnode.testing.rawstore import send_raw
from dicomnode.testing.waiting import wait_until

RIS = "ris-secret"
MONITOR = "monitor-secret"
PATIENT = {"patient_name": "Secretname^Patricia", "patient_id": "PID-SECRET-4711"}
ROUTE = {
    "name": "chest",
    "model": "echo",
    "match": {"Modality": "CT"},
    "completion": {"quiet_s": 30, "release_grace_s": 0.2, "confirm_s": 0},
}


def test_received_routed_cancelled_retried(
    start_node: Callable[..., Node],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    storage = tmp_path / "node"
    # no worker: the job stays queued, so it can be cancelled and retried
    tokens = {"ris": {"secret": RIS, "scopes": ["read", "phi", "operate"]}, "monitor": MONITOR}
    node = start_node(storage, routes=[ROUTE], workers=[], api={"tokens": tokens})
    files = write_series(ct_slices(SeriesSpec(slices=12, seed=71, **PATIENT)), tmp_path / "ct")
    sent = peers.storescu(node.receiver.address[1], files, calling_aet="CT_SCANNER")
    assert sent.returncode == 0, sent.stderr
    (job,) = wait_until(lambda: node.jobs.list(JobFilter(state=JobState.QUEUED)))  # type: ignore[misc]
    # an association whose only instance is refused is audited too
    refused = send_raw("127.0.0.1", node.receiver.address[1], called_aet="DICOMNODE",
                       sop_class=CT_IMAGE_STORAGE, sop_instance=generate_uid(),
                       payload=bytes(range(256)) * 8, calling_aet="RAWSCU")  # fmt: skip
    assert refused == 0xC001

    assert node.api is not None
    with httpx.Client(base_url=node.api.url, headers={"Authorization": f"Bearer {RIS}"}) as http:
        assert http.post(f"/api/jobs/{job.id}/cancel").json()["state"] == "cancelled"
        # a query naming the patient: answered, and not logged (no access log)
        found = http.get("/api/jobs", params={"patient_id": PATIENT["patient_id"]}).json()
        assert [j["id"] for j in found["jobs"]] == [job.id]
    # a token without the phi scope (the older plain form) may neither ask by patient nor act
    with httpx.Client(
        base_url=node.api.url, headers={"Authorization": f"Bearer {MONITOR}"}
    ) as http:
        refused = http.get("/api/jobs", params={"patient_id": PATIENT["patient_id"]})
        assert refused.status_code == 403 and "'phi' scope" in refused.json()["error"]
        assert http.post(f"/api/jobs/{job.id}/retry").status_code == 403
        listed = http.get("/api/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job.id] and listed[0]["study_instance_uid"] is None
    node_records = list(caplog.records)
    # the CLI configures logging for itself (to stderr), as `dicomnode jobs retry` does
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.setenv("DICOMNODE_NODE__STORAGE_DIR", str(storage))
    assert main(["jobs", "retry", str(job.id)]) == 0
    # stderr: the CLI's log (and, after an earlier CLI test set up logging, this test's client)
    cli_log = "\n".join(
        line for line in capsys.readouterr().err.splitlines() if " httpx " not in line
    )

    with node.database.sessions() as session:
        events, _ = list_events(session)
    trail = {(e.action, e.actor, e.job_id, e.detail) for e in events}
    assert trail == {
        ("received", "aet:CT_SCANNER@127.0.0.1", None, "12 instances"),
        ("received", "aet:RAWSCU@127.0.0.1", None, "0 instances, 1 refused"),
        ("routed", "node", job.id, "route chest, model echo"),
        ("cancelled", "token:ris", job.id, "was queued"),
        ("retried", f"cli:{getpass.getuser()}", job.id, "was cancelled"),
    }
    assert [e.action for e in events][:2] == ["retried", "cancelled"]  # newest first
    assert {e.study_instance_uid for e in events if e.job_id} == {job.study_instance_uid}

    audit_lines = {(r.action, getattr(r, "job_id", None))  # type: ignore[attr-defined]
                   for r in node_records if r.name == "dicomnode.audit"}  # fmt: skip
    assert audit_lines == {("received", None), ("routed", job.id), ("cancelled", job.id)}
    assert sum(r.name == "dicomnode.audit" for r in node_records) == 4  # received twice
    assert f"[retried] retried by cli:{getpass.getuser()} job {job.id}" in cli_log
    # every server-side logger (httpx's lines are this test's own client)
    client = ("httpx", "httpcore")
    logged = [
        r.getMessage()
        for r in node_records
        if r.levelno >= logging.INFO and not r.name.startswith(client)
    ]
    assert any(r.name.startswith("dicomnode.api") for r in node_records)
    for text in (*logged, cli_log):
        for secret in (*PATIENT.values(), "Secretname", "ACC0001"):
            assert secret not in text
