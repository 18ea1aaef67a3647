"""The HTTP API as the node serves it: /api/health C-ECHOes the configured destinations (dcmtk's
storescp as a PACS, and a port nobody listens on), caches the answers, and sees the embedded
worker; HTTPS with a certificate made by openssl; weak tokens refused off loopback;
``dicomnode serve`` starts the API on a free port, says where, and warns about a config file
others can read while it holds the token."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dicomnode.app import Node
from dicomnode.errors import ConfigError
from dicomnode.testing import peers
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.waiting import wait_until
from tests.integration.test_access import Certs, certs  # noqa: F401  (the session's openssl certs)

STRONG = "serve-7c1e9a4f2b8d6053a9e1c4"


def test_health_echoes_destinations_and_sees_workers(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    down = peers.free_port()
    with peers.storescp(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = start_node(
            api={"token": "t", "echo_timeout_s": 2, "health_cache_s": 60},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs},
                {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": down},
                {"name": "web", "url": "http://127.0.0.1:9/dicom-web"},
            ],
        )
        assert node.api is not None
        with httpx.Client(base_url=node.api.url, timeout=20) as http:
            anonymous = http.get("/api/health")  # up or down, and no C-ECHO for it
            assert anonymous.json() == {"status": "ok"}
            first = http.get("/api/health", headers={"Authorization": "Bearer t"})
            second = http.get("/api/health", headers={"Authorization": "Bearer t"})
    assert first.status_code == 200, first.text
    health = first.json()
    assert health["status"] == "degraded"  # one destination is down; the node itself is fine
    assert health["database"] == {"ok": True, "error": None}
    assert health["disk"]["ok"] is True and health["disk"]["free_bytes"] > 0
    (worker,) = health["workers"]["embedded"]
    assert worker["alive"] is True and worker["models"] == ["echo"] and worker["device"] == "cpu"
    destinations = {d["name"]: d for d in health["destinations"]}
    assert destinations["pacs"]["reachable"] is True and destinations["pacs"]["error"] is None
    assert destinations["down"]["reachable"] is False
    assert f"NOBODY@127.0.0.1:{down}" in destinations["down"]["error"]
    assert destinations["web"] == {**destinations["web"], "checked": False, "reachable": None}
    # within health_cache_s the answers are reused (same check time), not asked again
    assert second.json()["destinations"] == health["destinations"]


def test_a_non_loopback_api_without_a_token_refuses_to_start(
    start_node: Callable[..., Node],
) -> None:
    with pytest.raises(ConfigError, match="no token is configured"):
        start_node(api={"host": "0.0.0.0"})


def test_a_weak_token_off_loopback_refuses_to_start(start_node: Callable[..., Node]) -> None:
    """Finding 10: 'x' and the example's 'change-me-too' guarded an API on 0.0.0.0."""
    for token in ("x", "change-me-too"):
        with pytest.raises(ConfigError, match="token 'ops'") as refused:
            start_node(api={"host": "0.0.0.0", "token": STRONG, "tokens": {"ops": token}})
        assert repr(token) not in str(refused.value)
    node = start_node(api={"host": "0.0.0.0", "token": STRONG})  # a random one: served
    assert node.api is not None
    port = node.api.address[1]
    assert httpx.get(f"http://127.0.0.1:{port}/api/health").json() == {"status": "ok"}


def test_the_api_serves_https(start_node: Callable[..., Node], certs: Certs) -> None:  # noqa: F811
    """[api] tls_cert/tls_key: HTTPS with the node's certificate; plain HTTP gets nothing."""
    node = start_node(
        api={"token": STRONG, "tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)}
    )
    assert node.api is not None and node.api.url.startswith("https://127.0.0.1:")
    headers = {"Authorization": f"Bearer {STRONG}"}
    with httpx.Client(
        base_url=node.api.url, verify=ssl.create_default_context(cafile=certs.ca), timeout=10
    ) as http:
        assert http.get("/api/jobs", headers=headers).json()["total"] == 0
        assert http.get("/api/jobs").status_code == 401
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{node.api.url}/api/health", timeout=10)  # not our CA: refused by the client
    plain = node.api.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no token crosses in the clear
        httpx.get(f"{plain}/api/jobs", headers=headers, timeout=10)
    with httpx.Client(
        base_url=node.api.url, verify=ssl.create_default_context(cafile=certs.ca), timeout=10
    ) as http:
        assert http.get("/api/health").json() == {"status": "ok"}  # still serving


def test_an_unreadable_tls_key_fails_the_start(
    start_node: Callable[..., Node],
    certs: Certs,  # noqa: F811
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"tls_cert .* cannot be loaded"):
        start_node(
            api={
                "token": STRONG,
                "tls_cert": str(certs.server_cert),
                "tls_key": str(tmp_path / "missing.key"),
            }
        )
    with pytest.raises(ConfigError, match="cannot be loaded"):  # the key of another certificate
        start_node(
            api={
                "token": STRONG,
                "tls_cert": str(certs.server_cert),
                "tls_key": str(certs.client_key),
            }
        )


@pytest.mark.slow
def test_serve_runs_the_api_on_a_free_port(tmp_path: Path) -> None:
    config = tmp_path / "dicomnode.toml"
    config.write_text('[api]\ntoken = "serve-token"\n')
    config.chmod(0o644)  # holds the token, and others may read it: warned
    node = ServeProcess(tmp_path / "node", config=config)
    node.start()
    try:
        found = wait_until(
            lambda: re.search(r"HTTP API on (http://\S+)", node.log.read_text()),
            timeout=30,
            interval=0.1,
            what="the API's address in the log",
            detail=node.log.read_text,
        )
        url = found.group(1).rstrip(",")
        assert httpx.get(f"{url}/api/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/api/jobs").status_code == 401
        jobs = httpx.get(f"{url}/api/jobs", headers={"Authorization": "Bearer serve-token"})
        assert jobs.json() == {"total": 0, "limit": 50, "offset": 0, "jobs": []}
        (warning,) = [line for line in node.log.read_text().splitlines() if "0o644" in line]
        assert "WARNING" in warning and "holds secrets (api.token)" in warning
        assert "serve-token" not in node.log.read_text()
    finally:
        node.stop()
