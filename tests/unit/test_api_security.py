"""The API's guards, each shown refusing what a probe on loopback got through (issue 16):
token scopes (a named token was an admin token), health and the OpenAPI document without a
token, /docs from a CDN, the Host header (DNS rebinding), weak tokens on a non-loopback host,
the last-resort 500, and a config file that others can read while it holds a token."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from dicomnode.api import ApiContext, ApiServer, create_app
from dicomnode.api.context import allowed_hosts, check_exposure, warn_readable_config
from dicomnode.app import Database, open_database
from dicomnode.audit import list_events
from dicomnode.config import Settings, load_settings
from dicomnode.errors import ConfigError
from dicomnode.queue.repository import JobRepository
from dicomnode.testing.jobs import ROOT, History, api_server, make_history

ADMIN = "admin-4f9d2c7b1e8a6035d9c4"  # [api] token: every scope
RIS = "ris-8b3e5a1f7c2d9064e1b7"  # read + phi + operate
OPS = "ops-2c7f9a4e1b6d8305a3f9"  # the older plain form: read only
MONITOR = "monitor-5e1a8c3f7b2d9046c"  # read
CLERK = "clerk-9a4c2e7f1b5d8306e2a"  # phi (implies read)
RUNNER = "runner-6d2f8b1c4a9e7053b"  # operate (implies read)
TOKENS = {
    "ris": {"secret": RIS, "scopes": ["read", "phi", "operate"]},
    "ops": OPS,
    "monitor": {"secret": MONITOR, "scopes": ["read"]},
    "clerk": {"secret": CLERK, "scopes": ["phi"]},
    "runner": {"secret": RUNNER, "scopes": ["operate"]},
}


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    database = open_database(Settings(node={"storage_dir": tmp_path}), migrate=True)
    yield database
    database.engine.dispose()


@pytest.fixture
def history(database: Database) -> History:
    return make_history(database.sessions)


def _settings(tmp_path: Path, **api: object) -> Settings:
    return Settings(node={"storage_dir": tmp_path, "min_free_disk_mb": 1}, api={"port": 0, **api})


@pytest.fixture
def client(tmp_path: Path, database: Database, history: History) -> Iterator[httpx.Client]:
    settings = _settings(tmp_path, token=ADMIN, tokens=TOKENS)
    with (
        api_server(settings, database.sessions) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_scopes_from_the_config() -> None:
    api = load_settings_from(
        '[api]\ntoken = "a"\n[api.tokens]\nold = "plain"\n'
        '[api.tokens.ris]\nsecret = "s"\nscopes = ["read", "phi"]\n'
    ).api
    assert api.tokens["old"].scopes == ("read",)  # the older form: no patients, no actions
    assert api.tokens["ris"].scopes == ("read", "phi")
    assert api.client_token("phi") == "a"
    with pytest.raises(ConfigError, match=r"api.tokens.ris.scopes.0: Input should be 'read'"):
        load_settings_from('[api.tokens.ris]\nsecret = "s"\nscopes = ["root"]\n')
    with pytest.raises(ValidationError, match="tokens 'a' and 'b' have the same secret"):
        Settings(api={"tokens": {"a": "same", "b": {"secret": "same"}}})
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        Settings(api={"tls_cert": "/etc/cert.pem"})
    with pytest.raises(ValidationError, match="token name"):
        Settings(api={"tokens": {"bad name": "s"}})


def load_settings_from(text: str) -> Settings:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dicomnode.toml"
        path.write_text(text)
        return load_settings(path)


def test_a_named_token_is_not_an_admin_token(client: httpx.Client, history: History) -> None:
    """Finding 4: a named token read patient attributes and cancelled jobs."""
    queued, failed = history.jobs["queued_lung"], history.jobs["failed_lung"]
    for token, name in ((OPS, "ops"), (MONITOR, "monitor")):
        listing = client.get("/api/jobs", headers=bearer(token))
        assert listing.status_code == 200 and listing.json()["total"] == 5
        assert ROOT not in listing.text  # no study, series or instance UID
        job = listing.json()["jobs"][0]
        assert job["study_instance_uid"] is None and job["inputs"] == []
        assert job["model"] and job["state"] and job["stages"]["received"]
        one = client.get(f"/api/jobs/{history.jobs['done_lung']}", headers=bearer(token))
        assert one.status_code == 200 and ROOT not in one.text
        assert {s["state"] for s in one.json()["sends"]} == {"sent", "dead"}
        for path, params in (
            ("/api/studies", {}),
            ("/api/jobs", {"patient_id": "PID-ALPHA"}),
            ("/api/jobs", {"accession": "ACC-1"}),
            ("/api/jobs", {"study": history.studies["a"]}),
        ):
            refused = client.get(path, params=params, headers=bearer(token))
            assert refused.status_code == 403, (path, params)
            assert refused.json()["type"] == "Forbidden"
            assert f"token {name!r} lacks the 'phi' scope" in refused.json()["error"]
        for action, job_id in (("cancel", queued), ("retry", failed), ("resend", queued)):
            refused = client.post(f"/api/jobs/{job_id}/{action}", headers=bearer(token))
            assert refused.status_code == 403 and "'operate' scope" in refused.json()["error"]
        assert client.get("/api/me", headers=bearer(token)).json()["scopes"] == ["read"]
    assert client.get(f"/api/jobs/{queued}", headers=bearer(ADMIN)).json()["state"] == "queued"
    # phi: the patient filters and the UIDs, and still no action
    clerk = client.get("/api/jobs", params={"patient_id": "PID-ALPHA"}, headers=bearer(CLERK))
    assert clerk.status_code == 200 and clerk.json()["total"] == 2
    assert clerk.json()["jobs"][0]["study_instance_uid"].startswith(ROOT)
    assert client.get("/api/studies", headers=bearer(CLERK)).status_code == 200
    assert client.post(f"/api/jobs/{queued}/cancel", headers=bearer(CLERK)).status_code == 403
    # operate alone: acts, and reads without patient attributes
    runner = client.post(f"/api/jobs/{queued}/cancel", headers=bearer(RUNNER))
    assert runner.status_code == 200 and runner.json()["study_instance_uid"] is None
    assert client.get("/api/studies", headers=bearer(RUNNER)).status_code == 403
    # the admin token does everything
    assert client.post(f"/api/jobs/{queued}/retry", headers=bearer(ADMIN)).status_code == 200
    assert client.get("/api/me", headers=bearer(ADMIN)).json() == {
        "name": "admin", "actor": "token:admin",
        "scopes": ["admin", "operate", "phi", "read", "review", "store"],
    }  # fmt: skip


def test_audit_without_phi_names_no_study(
    client: httpx.Client, history: History, database: Database
) -> None:
    queued = history.jobs["queued_lung"]
    assert client.post(f"/api/jobs/{queued}/cancel", headers=bearer(RIS)).status_code == 200
    full = client.get("/api/audit", headers=bearer(RIS)).json()["events"]
    assert full[0]["study_instance_uid"] == history.studies["c"]
    read = client.get("/api/audit", headers=bearer(MONITOR))
    assert read.status_code == 200 and ROOT not in read.text
    assert [(e["action"], e["actor"]) for e in read.json()["events"]] == [
        ("cancelled", "token:ris")
    ]
    with database.sessions() as session:
        events, _ = list_events(session)
    assert [e.actor for e in events] == ["token:ris"]


def test_resend_needs_operate_and_says_why_it_cannot(
    client: httpx.Client, history: History
) -> None:
    done = history.jobs["done_lung"]
    assert client.post(f"/api/jobs/{done}/resend", headers=bearer(MONITOR)).status_code == 403
    empty = client.post(f"/api/jobs/{done}/resend", headers=bearer(RIS))
    assert empty.status_code == 409 and "lists no DICOM objects" in empty.json()["error"]
    unknown = client.post(
        f"/api/jobs/{done}/resend", params={"destination": "nowhere"}, headers=bearer(RIS)
    )
    assert unknown.status_code == 400 and "no destination 'nowhere'" in unknown.json()["error"]
    assert client.post("/api/jobs/9999/resend", headers=bearer(RIS)).status_code == 404


def test_stow_needs_the_store_scope_and_a_receiver(client: httpx.Client) -> None:
    """STOW-RS writes studies in: no scope but ``store`` (or admin) may; an API without the
    node's receiver (this one) answers 503 rather than storing anywhere else."""
    multipart = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    for token in (RIS, OPS, MONITOR, CLERK, RUNNER):
        refused = client.post("/dicomweb/studies", content=b"--b--", headers={
            **bearer(token), **multipart})  # fmt: skip
        assert refused.status_code == 403 and "'store' scope" in refused.json()["error"]
    assert client.post("/dicomweb/studies", content=b"--b--").status_code == 401
    unserved = client.post("/dicomweb/studies", content=b"--b--", headers={
        **bearer(ADMIN), **multipart})  # fmt: skip
    assert unserved.status_code == 503 and "receiver" in unserved.json()["error"]
    assert unserved.headers["retry-after"] == "5"


def test_health_without_a_token_says_up_or_down_only(
    client: httpx.Client, tmp_path: Path, database: Database
) -> None:
    """Finding 9: health showed destinations, worker ids, free disk and models to anyone."""
    anonymous = client.get("/api/health")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    detailed = client.get("/api/health", headers=bearer(MONITOR))
    assert detailed.json()["disk"]["free_bytes"] > 0 and "destinations" in detailed.json()
    assert client.get("/api/health", headers=bearer("not-a-token")).status_code == 401
    # down: the disk floor is not met
    settings = Settings(
        node={"storage_dir": tmp_path, "min_free_disk_mb": 2**40}, api={"port": 0, "token": ADMIN}
    )
    with api_server(settings, database.sessions) as server:
        down = httpx.get(f"{server.url}/api/health")
        assert down.status_code == 503 and down.json() == {"status": "down"}
        failing = httpx.get(f"{server.url}/api/health", headers=bearer(ADMIN))
        assert failing.status_code == 503 and failing.json()["disk"]["ok"] is False


def test_docs_are_off_and_openapi_needs_a_token(client: httpx.Client) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404
        assert client.get(path, headers=bearer(ADMIN)).status_code == 404
    assert client.get("/openapi.json").status_code == 401
    document = client.get("/openapi.json", headers=bearer(MONITOR))
    assert document.status_code == 200 and "/api/jobs" in document.json()["paths"]
    page = client.get("/")
    csp = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "https:" not in csp and "cdn" not in page.text
    for response in (page, document):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


class AppClient:
    """Requests straight to the ASGI app (any Host header, routes added by the test)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await c.get(path, headers=headers)

        return asyncio.run(call())


def _open_client(tmp_path: Path, database: Database, **api: object) -> AppClient:
    settings = _settings(tmp_path, **api)
    jobs = JobRepository(database.sessions, settings.queue)
    return AppClient(create_app(ApiContext(settings, database.sessions, jobs)))


def test_host_header_is_checked_on_an_open_api(tmp_path: Path, database: Database) -> None:
    """Finding 10: DNS rebinding. A page on rebind.attacker.example, whose name now resolves
    to 127.0.0.1, reads the open loopback API; its requests carry that name as Host."""
    http = _open_client(tmp_path, database)
    assert allowed_hosts(Settings().api) == ("127.0.0.1", "localhost", "::1")
    for host in ("rebind.attacker.example", "rebind.attacker.example:8080", "127.0.0.1.nip.io",
                 "localhost.attacker.example", "[::2]:8080", ""):  # fmt: skip
        refused = http.get("/api/jobs", headers={"Host": host})
        assert refused.status_code == 400, host
        assert refused.json()["type"] == "HostNotAllowed"
    for host in ("127.0.0.1", "127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080"):
        served = http.get("/api/jobs", headers={"Host": host})
        assert served.status_code == 200 and served.json()["total"] == 0, host
    # with tokens, any Host unless allowed_hosts names some (loopback names always answer)
    tokened = _open_client(tmp_path, database, token=ADMIN)
    assert tokened.get("/api/health", headers={"Host": "node.example.org"}).status_code == 200
    named = _open_client(
        tmp_path, database, token=ADMIN, allowed_hosts=["node.example.org", "*.ward.example"]
    )
    for host, status in (("node.example.org:443", 200), ("a.ward.example", 200),
                         ("localhost:8080", 200), ("other.example.org", 400)):  # fmt: skip
        assert named.get("/api/health", headers={"Host": host}).status_code == status, host


def test_weak_tokens_are_refused_off_loopback(tmp_path: Path, database: Database) -> None:
    """Finding 10: 'x' and the example's 'change-me-too' guarded an API on 0.0.0.0."""
    strong = "k7Qw2x9LmP4vZ8rT1yB6nH3s"
    for token, why in (("x", "shorter than 24"), ("change-me-too", "example value"),
                       ("a" * 30, "fewer than 8 different"),
                       ("CHANGE-ME", "example value")):  # fmt: skip
        for api in ({"token": token}, {"tokens": {"ris": token}, "token": strong}):
            settings = Settings(node={"storage_dir": tmp_path}, api={"host": "0.0.0.0", **api})
            with pytest.raises(ConfigError, match=why) as refused:
                check_exposure(settings.api)
            name = "'admin'" if "tokens" not in api else "'ris'"
            assert name in str(refused.value) and repr(token) not in str(refused.value)
            jobs = JobRepository(database.sessions, settings.queue)
            with pytest.raises(ConfigError, match=why):
                ApiServer(ApiContext(settings, database.sessions, jobs))
            # the same token on loopback is the operator's business
            check_exposure(Settings(api={"host": "127.0.0.1", **api}).api)
    check_exposure(Settings(api={"host": "0.0.0.0", "token": strong}).api)


def test_an_unexpected_error_is_one_line_and_a_generic_500(
    tmp_path: Path, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    http = _open_client(tmp_path, database)
    app = http.app

    @app.get("/api/boom")  # type: ignore[untyped-decorator]
    def boom() -> None:
        raise RuntimeError("PID-SECRET-4711 in an exception message")

    caplog.set_level(logging.INFO)
    response = http.get("/api/boom", headers={"Host": "127.0.0.1"})
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal error; the node's log says more", "type": "InternalError"
    }  # fmt: skip
    assert "PID-SECRET" not in response.text
    records = [
        r for r in caplog.records if r.levelno >= logging.INFO and not r.name.startswith("httpx")
    ]
    assert len(records) == 1 and records[0].action == "api_error"  # type: ignore[attr-defined]
    assert records[0].exc_info is None and "PID-SECRET" not in records[0].getMessage()
    assert "RuntimeError" in records[0].getMessage()


def test_a_readable_config_holding_a_secret_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 10: a 0644 config holding the token got no warning."""
    caplog.set_level(logging.INFO)
    config = tmp_path / "dicomnode.toml"
    secret = "k7Qw2x9LmP4vZ8rT1yB6nH3s"
    config.write_text(f'[api]\ntoken = "{secret}"\n')
    config.chmod(0o644)
    assert warn_readable_config(config) == ["api.token"]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.action == "config_permissions"  # type: ignore[attr-defined]
    assert "0o644" in warning.getMessage() and secret not in warning.getMessage()
    caplog.clear()
    config.chmod(0o600)
    assert warn_readable_config(config) == [] and not caplog.records
    config.chmod(0o640)  # the group is enough
    assert warn_readable_config(config) == ["api.token"]
    caplog.clear()
    config.write_text(
        '[node]\ndatabase_url = "postgresql+psycopg://dicomnode:pw@db/dicomnode"\n'
        '[api.tokens.ris]\nsecret = "s"\n[[destinations]]\nname = "web"\n'
        'url = "https://pacs/dicom-web"\ntoken = "t"\n'
    )
    assert warn_readable_config(config) == [
        "node.database_url",
        "api.tokens",
        "destinations[0].token",
    ]
    config.write_text('[node]\ndatabase_url = "sqlite:///x.db"\n[api]\ntoken = ""\n')
    assert warn_readable_config(config) == []


def test_serve_warns_about_its_readable_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomnode import app
    from dicomnode.cli import main

    class Stop(Exception):
        pass

    def build_node(*_args: object, **_kw: object) -> None:
        raise Stop

    monkeypatch.setattr(app, "build_node", build_node)
    monkeypatch.setattr(app, "restrict_new_files", lambda: None)
    config = tmp_path / "dicomnode.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path}"\n[api]\ntoken = "secret-x"\n')
    config.chmod(0o644)
    with pytest.raises(Stop):
        main(["serve", "--config", str(config)])
    err = capsys.readouterr().err
    assert "holds secrets (api.token)" in err and "mode 0o644" in err, err
    assert "secret-x" not in err


def test_the_compose_example_token_is_refused_off_loopback() -> None:
    """deploy/env.example's token with compose's 0.0.0.0 bind: the node will not start."""
    deploy = Path(__file__).parents[2] / "deploy"
    env = dict(
        line.split("=", 1)
        for line in (deploy / "env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    api = Settings(api={"host": "0.0.0.0", "token": env["DICOMNODE_API_TOKEN"]}).api
    with pytest.raises(ConfigError, match=r"API token 'admin' .* is an example value"):
        check_exposure(api)
