"""The HTTP API over a known job history, served by uvicorn on a free loopback port: tokens,
job filters and pagination, one job in full, retry and cancel, studies, models, OpenAPI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from dicomnode.api.context import check_exposure
from dicomnode.app import Database, open_database
from dicomnode.audit import list_events
from dicomnode.config import Settings
from dicomnode.errors import ConfigError
from dicomnode.testing.jobs import T0, History, api_server, make_history

ADMIN, RIS = "s3cret-admin", "s3cret-ris"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    node: dict[str, object] = {"storage_dir": tmp_path, "min_free_disk_mb": 1}
    if request.param == "postgresql":
        request.applymarker(pytest.mark.postgres)
        node["database_url"] = request.getfixturevalue("clean_postgres_url")
    database = open_database(Settings(node=node), migrate=True)
    yield database
    database.engine.dispose()


@pytest.fixture
def history(database: Database) -> History:
    return make_history(database.sessions)


@pytest.fixture
def client(tmp_path: Path, database: Database, history: History) -> Iterator[httpx.Client]:
    settings = Settings(
        node={"storage_dir": tmp_path, "min_free_disk_mb": 1},
        api={
            "port": 0,
            "token": ADMIN,
            "tokens": {"ris": {"secret": RIS, "scopes": ["read", "phi", "operate"]}},
        },
    )  # the API reads through database.sessions; the URL here only names the storage
    with (
        api_server(settings, database.sessions) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ids(client: httpx.Client, **params: object) -> tuple[list[int], int]:
    response = client.get("/api/jobs", params=params, headers=bearer(ADMIN))
    assert response.status_code == 200, response.text
    body = response.json()
    return [job["id"] for job in body["jobs"]], body["total"]


def test_every_route_but_health_needs_a_valid_token(client: httpx.Client) -> None:
    guarded = ["/api/jobs", "/api/jobs/1", "/api/studies", "/api/models", "/api/summary",
               "/api/audit", "/metrics"]  # fmt: skip
    for path in guarded:
        missing = client.get(path)
        assert missing.status_code == 401, path
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in missing.json()["error"]
        wrong = client.get(path, headers=bearer(ADMIN + "x"))
        assert wrong.status_code == 401 and wrong.json()["error"] == "the bearer token is not valid"
        assert client.get(path, headers={"Authorization": f"Basic {ADMIN}"}).status_code == 401
        for token in (ADMIN, RIS):
            assert client.get(path, headers=bearer(token)).status_code == 200, path
    for action in ("retry", "cancel", "resend"):
        assert client.post(f"/api/jobs/2/{action}").status_code == 401
    # without a token, health says up or down and nothing more; with one, the details
    health = client.get("/api/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    detailed = client.get("/api/health", headers=bearer(RIS))
    assert detailed.status_code == 200 and detailed.json()["database"]["ok"] is True
    # The page shell needs no token (a browser cannot send one); it holds no job data.
    page = client.get("/")
    assert page.status_code == 200 and "PID-ALPHA" not in page.text
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_filters_and_pagination(client: httpx.Client, history: History) -> None:
    job = history.jobs
    assert ids(client) == ([job[n] for n in ("waiting_brain", "queued_lung", "done_brain",
                                               "failed_lung", "done_lung")], 5)  # fmt: skip
    assert ids(client, status="failed") == ([job["failed_lung"]], 1)
    assert ids(client, status="done,failed")[1] == 3
    assert ids(client, model="brain") == ([job["waiting_brain"], job["done_brain"]], 2)
    assert ids(client, study=history.studies["a"]) == ([job["done_lung"]], 1)
    assert ids(client, accession="ACC-2") == ([job["failed_lung"]], 1)
    assert ids(client, patient_id="PID-ALPHA") == ([job["failed_lung"], job["done_lung"]], 2)
    assert ids(client, patient_id="PID-BRAVO", model="lung") == ([job["queued_lung"]], 1)
    assert ids(client, accession="ACC-1", patient_id="PID-BRAVO") == ([], 0)
    since = (T0 + timedelta(seconds=350)).isoformat()
    assert ids(client, since=since) == ([job["waiting_brain"], job["queued_lung"]], 2)
    assert ids(client, since="2h")[1] == 5  # the history began an hour ago
    assert ids(client, since="1m") == ([], 0)
    # pages: the total is of every match, not of the page
    assert ids(client, limit=2) == ([job["waiting_brain"], job["queued_lung"]], 5)
    assert ids(client, limit=2, offset=2) == ([job["done_brain"], job["failed_lung"]], 5)
    assert ids(client, limit=2, offset=4) == ([job["done_lung"]], 5)
    assert ids(client, limit=2, offset=10) == ([], 5)
    bad = {"status": "bogus", "since": "yesterday", "limit": "0", "offset": "-1"}
    for key, value in bad.items():
        response = client.get("/api/jobs", params={key: value}, headers=bearer(ADMIN))
        assert response.status_code in (400, 422), (key, response.text)
        assert value in response.text or response.status_code == 422
    listed = client.get("/api/jobs", params={"limit": 1}, headers=bearer(ADMIN)).json()["jobs"][0]
    assert "result" not in listed and set(listed["stages"]) == {
        "received", "completed", "queued", "started", "finished", "sent"}  # fmt: skip


def test_one_job_in_full(client: httpx.Client, history: History) -> None:
    done = client.get(f"/api/jobs/{history.jobs['done_lung']}", headers=bearer(ADMIN)).json()
    assert done["state"] == "done" and done["result"] == {"objects": []}
    assert done["stages"]["received"] == T0.isoformat()
    assert done["stages"]["finished"] == (T0 + timedelta(seconds=42)).isoformat()
    assert done["stages"]["sent"] == (T0 + timedelta(seconds=50)).isoformat()
    sends = {(s["kind"], s["state"], s["attempts"], s["last_error"]) for s in done["sends"]}
    assert sends == {("SEG", "sent", 1, None), ("SR", "dead", 3, "C-STORE status 0xA700")}
    failed = client.get(f"/api/jobs/{history.jobs['failed_lung']}", headers=bearer(ADMIN)).json()
    assert failed["error"] == "RuntimeError: out of memory" and failed["attempts"] == 2
    missing = client.get("/api/jobs/9999", headers=bearer(ADMIN))
    assert missing.status_code == 404 and missing.json()["error"] == "no job 9999"


def test_retry_and_cancel_are_audited_under_the_tokens_name(
    client: httpx.Client, history: History, database: Database
) -> None:
    failed, queued = history.jobs["failed_lung"], history.jobs["queued_lung"]
    retried = client.post(f"/api/jobs/{failed}/retry", headers=bearer(RIS))
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    assert retried.json()["attempts"] == 0 and retried.json()["error"] is None
    cancelled = client.post(f"/api/jobs/{queued}/cancel", headers=bearer(ADMIN))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = client.post(f"/api/jobs/{history.jobs['done_lung']}/retry", headers=bearer(ADMIN))
    assert again.status_code == 409 and "only failed or cancelled" in again.json()["error"]
    assert client.post("/api/jobs/9999/cancel", headers=bearer(ADMIN)).status_code == 404
    with database.sessions() as session:
        events, total = list_events(session)
    assert total == 2
    assert [(e.action, e.actor, e.job_id, e.detail) for e in events] == [
        ("cancelled", "token:admin", queued, "was queued"),
        ("retried", "token:ris", failed, "was failed"),
    ]
    assert events[1].study_instance_uid == history.studies["b"]
    detail = client.get(f"/api/jobs/{failed}", headers=bearer(ADMIN)).json()
    assert [(e["action"], e["actor"]) for e in detail["audit"]] == [("retried", "token:ris")]
    trail = client.get("/api/audit", params={"actor": "token:ris"}, headers=bearer(ADMIN)).json()
    assert trail["total"] == 1 and trail["events"][0]["job_id"] == failed
    assert (
        client.get("/api/audit", params={"since": "1m"}, headers=bearer(ADMIN)).json()["total"] == 2
    )


def test_studies_models_and_summary(client: httpx.Client) -> None:
    models = {
        m["name"]: m for m in client.get("/api/models", headers=bearer(ADMIN)).json()["models"]
    }
    assert models["echo"]["source"] == "builtin" and models["echo"]["devices"] == ["cpu"]
    lung = models["lung_nodule"]
    assert lung["demo"] is True and lung["modalities"] == ["CT"] and lung["level"] == "series"
    assert lung["labels"] == ["nodule"] and lung["version"]
    assert lung["kind"] == "package" and len(lung["digest"]) == 64
    assert models["echo"]["kind"] == "builtin" and models["echo"]["digest"] is None
    summary = client.get("/api/summary", headers=bearer(ADMIN)).json()
    assert summary["states"] == {"waiting": 1, "queued": 1, "running": 0, "confirming": 0,
                                 "review": 0, "sending": 0, "done": 2, "failed": 1,
                                 "cancelled": 0, "skipped": 0, "rejected": 0}  # fmt: skip
    rates = {r["model"]: r for r in summary["throughput"]}
    assert rates["lung"]["finished"] == 1 and rates["lung"]["failed"] == 1
    assert rates["lung"]["mean_run_s"] == 30.0 and rates["brain"]["mean_run_s"] == 60.0
    assert rates["brain"]["jobs_per_hour"] == round(1 / 24, 3)
    studies = client.get("/api/studies", headers=bearer(ADMIN))
    assert studies.status_code == 200 and studies.json()["studies"] == []  # no instances yet


def test_openapi_document(client: httpx.Client) -> None:
    assert client.get("/openapi.json").status_code == 401  # behind the token, as the API is
    document = client.get("/openapi.json", headers=bearer(RIS)).json()
    assert document["info"]["title"] == "dicomnode"
    for path in (
        "/api/health",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/retry",
        "/api/jobs/{job_id}/cancel",
        "/api/jobs/{job_id}/resend",
        "/api/me",
        "/api/studies",
        "/api/models",
        "/metrics",
        "/",
    ):
        assert path in document["paths"], path  # fmt: skip
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    parameters = {p["name"] for p in document["paths"]["/api/jobs"]["get"]["parameters"]}
    assert {"status", "study", "model", "accession", "patient_id", "since", "limit",
            "offset"} <= parameters  # fmt: skip
    for path in ("/docs", "/redoc"):  # they would load their script from a CDN
        assert client.get(path, headers=bearer(ADMIN)).status_code == 404


def test_an_open_api_listens_on_loopback_only(tmp_path: Path, database: Database) -> None:
    open_settings = Settings(node={"storage_dir": tmp_path}, api={"port": 0})
    with api_server(open_settings, database.sessions) as server:
        assert server.address[0] == "127.0.0.1"
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/api/jobs").json()["total"] == 0  # no tokens: open on loopback
    check_exposure(Settings(api={"host": "0.0.0.0", "token": "k7Qw2x9LmP4vZ8rT1yB6nH3s"}).api)
    check_exposure(Settings(api={"host": "::1", "token": "t"}).api)  # loopback: any token
    check_exposure(Settings(api={"host": "::1"}).api)
    with pytest.raises(ConfigError, match=r"'0.0.0.0' is not a loopback address"):
        check_exposure(Settings(api={"host": "0.0.0.0"}).api)
