"""Test session setup: strict pydicom reading, and the node and peer fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydicom import config as pydicom_config

from dicomnode.app import Node, build_node
from dicomnode.config import Settings
from dicomnode.testing.models import MODELS as TEST_MODELS

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Objects we read back in tests must be valid, not merely readable (as highdicom tests do).
pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE


def make_settings(storage: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a node on a free loopback port with its own storage."""
    node = {"host": "127.0.0.1", "port": 0, "storage_dir": storage, "min_free_disk_mb": 1}
    node.update(sections.pop("node", {}))
    # The embedded worker runs the echo test model unless a test asks for more: loading the
    # real models (torch, weights) in every node test would only slow the suite down.
    sections.setdefault("workers", [{"models": ["echo"]}])
    # No routes unless a test gives them (the embedded defaults route to the demo models).
    sections.setdefault("routes", [])
    # The HTTP API only where a test asks for it (api={...}); port 0 when it does.
    sections["api"] = {"enabled": "api" in sections, "port": 0, **sections.get("api", {})}
    return Settings(node=node, **sections)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process nodes (receiver + spool + index) with overrides; stopped after the test."""
    started: list[Node] = []

    def start(storage: Path | None = None, *, background: bool = True, **sections: Any) -> Node:
        settings = make_settings(storage or tmp_path / f"node{len(started)}", **sections)
        node = build_node(settings, builtin_models=TEST_MODELS)
        node.start(background=background)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def browser_page(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A page in headless Chromium (Playwright); its console log under tmp_path/browser, with a
    screenshot when the test failed. Ends the test (missing_peer) without Chromium or Playwright."""
    from dicomnode.testing.browser import chromium_page, require_chromium

    require_chromium()
    failed_before = request.session.testsfailed
    with chromium_page(
        tmp_path / "browser", lambda: request.session.testsfailed > failed_before
    ) as page:
        yield page


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server for the session (CI installs it; elsewhere, skip without)."""
    from dicomnode.testing.peers import missing_peer
    from dicomnode.testing.postgres import postgres_bin, postgres_server

    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run must install it")
        missing_peer("PostgreSQL is not installed (Debian package postgresql)")
    with postgres_server() as url:
        yield url


@pytest.fixture
def clean_postgres_url(postgres_url: str) -> str:
    """The session's PostgreSQL, emptied of every dicomnode row (the schema stays)."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(postgres_url)
    try:
        tables = [t for t in inspect(engine).get_table_names() if t != "alembic_version"]
        if tables:
            with engine.begin() as connection:
                connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()
    return postgres_url


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    """A node on the defaults (any calling AE, keep-first duplicates)."""
    return start_node()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An engine on a migrated, empty database: SQLite in the test's folder, or the session's
    PostgreSQL emptied of every dicomnode row (the repository tests run on both)."""
    from dicomnode.db import make_engine, upgrade

    if request.param == "postgresql":
        request.applymarker(pytest.mark.postgres)
        engine = make_engine(request.getfixturevalue("postgres_url"))
        upgrade(engine)
        request.getfixturevalue("clean_postgres_url")
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'repository.db'}")
        upgrade(engine)
    yield engine
    engine.dispose()
