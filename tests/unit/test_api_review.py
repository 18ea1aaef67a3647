"""The review API over uvicorn on a free loopback port: approve and reject need the ``review``
scope (403 naming it), approving releases the held results (sends listed, audit naming the
token), the 409s of approving twice or a rejected job, a rejection's required reason, and the
job's key images as PNG behind the ``phi`` scope."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.app import Database, open_database
from dicomnode.audit import list_events
from dicomnode.config import Settings
from dicomnode.domain import JobState
from dicomnode.queue import JobRepository
from dicomnode.queue.outcomes import ReleasePolicy
from dicomnode.testing.jobs import T0, Clock, add_study, api_server

ADMIN = "admin-4f9d2c7b1e8a6035d9c4"
REVIEWER = "reviewer-7c2e9a4f1b8d6053e"  # review (implies read)
OPS = "ops-3b8f1d6a9c2e7045f1a"  # read, phi, operate
CLERK = "clerk-9a4c2e7f1b5d8306e2a"  # phi (implies read)
TOKENS = {
    "alice": {"secret": REVIEWER, "scopes": ["review"]},
    "ops": {"secret": OPS, "scopes": ["read", "phi", "operate"]},
    "clerk": {"secret": CLERK, "scopes": ["phi"]},
}
KEY_SIZE = (48, 32)  # columns, rows


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        node={"storage_dir": tmp_path, "min_free_disk_mb": 1},
        api={"port": 0, "token": ADMIN, "tokens": TOKENS},
        routes=[{"name": "chest", "model": "standin", "destinations": ["pacs"], "review": True}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
    )


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    database = open_database(settings, migrate=True)
    yield database
    database.engine.dispose()


def write_key_image(path: Path) -> dict[str, str]:
    """An RGB Secondary Capture as the summary writes it; its result["objects"] entry."""
    columns, rows = KEY_SIZE
    pixels = np.zeros((rows, columns, 3), np.uint8)
    pixels[..., 0] = np.arange(columns, dtype=np.uint8)[None, :] * 5
    pixels[8:24, 10:30, 1] = 200
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return {"kind": "SC", "path": "", "sop_class_uid": SecondaryCaptureImageStorage,
            "sop_instance_uid": ds.SOPInstanceUID}  # fmt: skip


@pytest.fixture
def held(settings: Settings, database: Database) -> list[int]:
    """Two jobs of the review route, run and held in review, each with one key image."""
    jobs = JobRepository(
        database.sessions, settings.queue, clock=Clock(T0),
        policy=ReleasePolicy.from_settings(settings),
    )  # fmt: skip
    with database.sessions.begin() as session:
        study = add_study(session, "v", "PID-RV", "ACC-RV", "Doe^Jane", T0)
    ids = []
    for n in range(2):
        job = jobs.enqueue(dedupe_key=f"rv/{n}", route="chest", model="standin",
                           study_instance_uid=study, destinations=["pacs"],
                           state=JobState.QUEUED)  # fmt: skip
        key = write_key_image(settings.node.storage_dir / f"results/{job.id}/dicom/key-001.dcm")
        key["path"] = f"results/{job.id}/dicom/key-001.dcm"
        assert jobs.claim("w1") is not None
        assert jobs.finish(job.id, "w1", {"findings": [], "objects": [key]}) is JobState.REVIEW
        ids.append(job.id)
    return ids


@pytest.fixture
def client(settings: Settings, database: Database, held: list[int]) -> Iterator[httpx.Client]:
    with (
        api_server(settings, database.sessions) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        yield http


def test_the_review_scope(client: httpx.Client) -> None:
    assert client.get("/api/me", headers=bearer(REVIEWER)).json()["scopes"] == ["read", "review"]
    assert "review" in client.get("/api/me", headers=bearer(ADMIN)).json()["scopes"]


def test_approve_needs_the_review_scope_and_releases_once(
    client: httpx.Client, database: Database, held: list[int]
) -> None:
    job_id = held[0]
    for token, name in ((OPS, "ops"), (CLERK, "clerk")):
        for action, body in (("approve", None), ("reject", {"reason": "no"})):
            refused = client.post(f"/api/jobs/{job_id}/{action}", json=body, headers=bearer(token))
            assert refused.status_code == 403, (name, action)
            assert f"token {name!r} lacks the 'review' scope" in refused.json()["error"]
    assert client.post(f"/api/jobs/{job_id}/approve").status_code == 401
    # an operator may not release them by a resend, nor end them by a cancel
    resent = client.post(f"/api/jobs/{job_id}/resend", headers=bearer(OPS))
    assert resent.status_code == 409 and "in review" in resent.json()["error"]
    cancelled = client.post(f"/api/jobs/{job_id}/cancel", headers=bearer(OPS))
    assert cancelled.status_code == 409 and "approve or reject" in cancelled.json()["error"]

    approved = client.post(
        f"/api/jobs/{job_id}/approve", json={"note": "checked"}, headers=bearer(REVIEWER)
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["state"] == "sending"
    detail = client.get(f"/api/jobs/{job_id}", headers=bearer(ADMIN)).json()
    assert [(s["destination"], s["state"]) for s in detail["sends"]] == [("pacs", "pending")]
    assert ("token:alice", "approved", "results released (sending): checked") in [
        (e["actor"], e["action"], e["detail"]) for e in detail["audit"]
    ]
    again = client.post(f"/api/jobs/{job_id}/approve", headers=bearer(REVIEWER))
    assert again.status_code == 409 and again.json()["type"] == "JobStateError"
    assert "released already" in again.json()["error"]
    detail = client.get(f"/api/jobs/{job_id}", headers=bearer(ADMIN)).json()
    assert len(detail["sends"]) == 1


def test_reject_needs_a_reason_and_sends_nothing(
    client: httpx.Client, database: Database, held: list[int]
) -> None:
    job_id = held[1]
    missing = client.post(f"/api/jobs/{job_id}/reject", json={}, headers=bearer(REVIEWER))
    assert missing.status_code == 422 and "reason" in missing.json()["error"]
    blank = client.post(f"/api/jobs/{job_id}/reject", json={"reason": "  "}, headers=bearer(ADMIN))
    assert blank.status_code == 400 and "needs a reason" in blank.json()["error"]
    rejected = client.post(
        f"/api/jobs/{job_id}/reject", json={"reason": "wrong lobe"}, headers=bearer(REVIEWER)
    )
    assert rejected.status_code == 200 and rejected.json()["state"] == "rejected"
    detail = client.get(f"/api/jobs/{job_id}", headers=bearer(ADMIN)).json()
    assert detail["error"] == "rejected: wrong lobe" and detail["sends"] == []
    with database.sessions() as session:
        events, _ = list_events(session, job_id=job_id, action="rejected")
    assert [(e.actor, e.detail) for e in events] == [("token:alice", "wrong lobe")]
    for action, body in (("approve", None), ("reject", {"reason": "again"})):
        refused = client.post(f"/api/jobs/{job_id}/{action}", json=body, headers=bearer(REVIEWER))
        assert refused.status_code == 409 and "is rejected" in refused.json()["error"]
    listed = client.get("/api/jobs", params={"status": "rejected,review"}, headers=bearer(ADMIN))
    assert {j["state"] for j in listed.json()["jobs"]} == {"rejected", "review"}
    assert client.post("/api/jobs/999/approve", headers=bearer(REVIEWER)).status_code == 404


def test_key_images_as_png_need_the_phi_scope(client: httpx.Client, held: list[int]) -> None:
    job_id = held[0]
    for path in (f"/api/jobs/{job_id}/previews", f"/api/jobs/{job_id}/previews/1.png"):
        refused = client.get(path, headers=bearer(REVIEWER))
        assert refused.status_code == 403 and "'phi' scope" in refused.json()["error"]
    listed = client.get(f"/api/jobs/{job_id}/previews", headers=bearer(CLERK))
    assert listed.status_code == 200
    [one] = listed.json()["previews"]
    assert (one["n"], one["columns"], one["rows"]) == (1, *KEY_SIZE)
    png = client.get(one["url"], headers=bearer(CLERK))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.size == KEY_SIZE and image.mode == "RGB"
    assert np.asarray(image)[10, 12].tolist() == [60, 200, 0]
    missing = client.get(f"/api/jobs/{job_id}/previews/2.png", headers=bearer(CLERK))
    assert missing.status_code == 404 and "it has 1 (1 to 1)" in missing.json()["error"]
    gone = client.get("/api/jobs/999/previews", headers=bearer(CLERK))
    assert gone.status_code == 404
