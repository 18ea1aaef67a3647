"""The HTTP API as the node serves it: /api/health C-ECHOes the configured destinations (dcmtk's
storescp as a PACS, and a port nobody listens on), caches the answers, and sees the embedded
worker; ``dicomnode serve`` starts the API on a free port and says where."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dicomnode.app import Node
from dicomnode.errors import ConfigError
from dicomnode.testing import peers
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.waiting import wait_until


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
            first = http.get("/api/health")
            second = http.get("/api/health")  # no token needed
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


@pytest.mark.slow
def test_serve_runs_the_api_on_a_free_port(tmp_path: Path) -> None:
    node = ServeProcess(tmp_path / "node")
    node.env["DICOMNODE_API__TOKEN"] = "serve-token"
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
        assert httpx.get(f"{url}/api/health").json()["database"]["ok"] is True
        assert httpx.get(f"{url}/api/jobs").status_code == 401
        jobs = httpx.get(f"{url}/api/jobs", headers={"Authorization": "Bearer serve-token"})
        assert jobs.json() == {"total": 0, "limit": 50, "offset": 0, "jobs": []}
    finally:
        node.stop()
