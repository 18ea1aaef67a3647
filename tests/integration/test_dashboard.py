"""The dashboard in headless Chromium (Chrome DevTools Protocol): the token typed once, the
queue counts, a failed job with its reason, throughput per model, and the failed job retried
with its button. The screenshot stays in test-artifacts/dashboard.png (or
$DICOMNODE_TEST_ARTIFACTS/dashboard.png)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomnode.app import Node
from dicomnode.audit import list_events
from dicomnode.domain import JobState
from dicomnode.testing.browser import Browser, chromium_path
from dicomnode.testing.jobs import make_history
from dicomnode.testing.peers import missing_peer
from dicomnode.testing.waiting import wait_until

TOKEN = "dashboard-secret"
ARTIFACTS = Path(
    os.environ.get("DICOMNODE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@pytest.fixture(autouse=True)
def _chromium() -> None:
    if chromium_path() is None:
        missing_peer("Chromium is not installed (Debian package chromium)")


@pytest.mark.slow
def test_dashboard_shows_a_failure_and_retries_it(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(
        workers=[], api={"tokens": {"ops": {"secret": TOKEN, "scopes": ["read", "operate"]}}}
    )
    history = make_history(node.database.sessions)
    failed = history.jobs["failed_lung"]
    assert node.api is not None
    with Browser(tmp_path / "profile") as browser:
        browser.goto(node.api.url + "/")
        # without a token the page shows nothing but asks for one
        browser.wait_for("document.getElementById('status').textContent === 'token required'")
        assert browser.evaluate("document.querySelectorAll('#recent tbody tr').length") == 0
        browser.type("#token", TOKEN)
        browser.click("#save-token")
        browser.wait_for("document.body.dataset.loaded")
        assert browser.evaluate("sessionStorage.getItem('dicomnode.token')") == TOKEN

        counts = browser.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.state')].map("
            "e => [e.dataset.state, e.querySelector('.n').textContent]))"
        )
        assert counts == {"waiting": "1", "queued": "1", "running": "0", "confirming": "0",
                          "review": "0", "sending": "0", "done": "2", "failed": "1",
                          "cancelled": "0", "skipped": "0", "rejected": "0"}  # fmt: skip
        failure = browser.evaluate(
            f"[...document.querySelectorAll('#failures tr[data-job-id=\"{failed}\"] td')]"
            ".map(td => td.textContent)"
        )
        assert failure[:4] == [str(failed), "lung", "2/2", "RuntimeError: out of memory"]
        stages = browser.evaluate(
            "[...document.querySelectorAll('#recent tr[data-job-id=\""
            f"{history.jobs['done_lung']}\"] .stage')].map(s => s.textContent)"
        )
        assert stages == ["received +0.0 s", "completed +10.0 s", "queued +10.0 s",
                          "started +12.0 s", "finished +42.0 s", "sent +50.0 s"]  # fmt: skip
        rates = browser.evaluate(
            "[...document.querySelectorAll('#throughput tbody tr')].map("
            "r => [...r.cells].map(c => c.textContent))"
        )
        assert rates == [["brain", "0.04", "1", "0", "60.0 s", "71.0 s"],
                         ["lung", "0.04", "1", "1", "30.0 s", "42.0 s"]]  # fmt: skip
        browser.screenshot(ARTIFACTS / "dashboard.png")

        browser.click(f'#failures button.retry[data-job-id="{failed}"]')
        job = wait_until(
            lambda: (j := node.jobs.get(failed)) and j.state is JobState.QUEUED and j,
            timeout=15,
            interval=0.1,
            what="the retried job queued",
        )
        assert job.attempts == 0 and job.error is None
        browser.wait_for(
            "document.querySelectorAll('#failures tbody tr').length === 0 && "
            "document.getElementById('count-failed').textContent === '0'"
        )
        assert browser.evaluate("document.getElementById('status').textContent").startswith(
            "updated"
        )
        browser.screenshot(ARTIFACTS / "dashboard-after-retry.png")
    with node.database.sessions() as session:
        events, _ = list_events(session, action="retried")
    assert [(e.actor, e.job_id) for e in events] == [("token:ops", failed)]
    assert (ARTIFACTS / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_dashboard_with_a_read_only_token_shows_jobs_without_actions(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """A read token (the older plain form) sees the queue and the failures, and no retry or
    cancel button; the page never shows a patient attribute, whatever the token."""
    node = start_node(workers=[], api={"tokens": {"monitor": TOKEN}})
    history = make_history(node.database.sessions)
    failed = history.jobs["failed_lung"]
    assert node.api is not None
    with Browser(tmp_path / "profile") as browser:
        browser.goto(node.api.url + "/")
        browser.wait_for("document.getElementById('status').textContent === 'token required'")
        browser.type("#token", TOKEN)
        browser.click("#save-token")
        browser.wait_for("document.body.dataset.loaded")
        assert browser.evaluate("document.body.dataset.scopes") == "read"
        assert browser.evaluate("document.getElementById('count-failed').textContent") == "1"
        failure = browser.evaluate(
            f"[...document.querySelectorAll('#failures tr[data-job-id=\"{failed}\"] td')]"
            ".map(td => td.textContent)"
        )
        assert failure[:4] == [str(failed), "lung", "2/2", "RuntimeError: out of memory"]
        assert browser.evaluate("document.querySelectorAll('#recent tbody tr').length") == 5
        assert (
            browser.evaluate("document.querySelectorAll('button.retry, button.cancel').length") == 0
        )
        text = browser.evaluate("document.body.innerText")
        for secret in (*history.patients.values(), *history.accessions.values(), "Alpha^Anna"):
            assert secret not in text
        browser.screenshot(ARTIFACTS / "dashboard-read-only.png")
    assert node.jobs.get(failed).state is JobState.FAILED  # type: ignore[union-attr]
