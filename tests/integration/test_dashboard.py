"""The dashboard in headless Chromium (Playwright): the token typed once, the
queue counts, a failed job with its reason, throughput per model, and the failed job retried
with its button. The screenshot stays in test-artifacts/dashboard.png (or
$DICOMNODE_TEST_ARTIFACTS/dashboard.png)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from dicomnode.app import Node
from dicomnode.audit import list_events
from dicomnode.domain import JobState
from dicomnode.testing.jobs import make_history
from dicomnode.testing.waiting import wait_until

TOKEN = "dashboard-secret"
ARTIFACTS = Path(
    os.environ.get("DICOMNODE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@pytest.mark.slow
def test_dashboard_shows_a_failure_and_retries_it(
    start_node: Callable[..., Node], browser_page: Page
) -> None:
    page = browser_page
    node = start_node(
        workers=[], api={"tokens": {"ops": {"secret": TOKEN, "scopes": ["read", "operate"]}}}
    )
    history = make_history(node.database.sessions)
    failed = history.jobs["failed_lung"]
    assert node.api is not None
    page.goto(node.api.url + "/")
    # without a token the page shows nothing but asks for one
    expect(page.locator("#status")).to_have_text("token required")
    assert page.locator("#recent tbody tr").count() == 0
    page.locator("#token").fill(TOKEN)
    page.locator("#save-token").click()
    page.wait_for_function("() => document.body.dataset.loaded")
    assert page.evaluate("sessionStorage.getItem('dicomnode.token')") == TOKEN

    counts = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.state')].map("
        "e => [e.dataset.state, e.querySelector('.n').textContent]))"
    )
    assert counts == {"waiting": "1", "queued": "1", "running": "0", "confirming": "0",
                      "review": "0", "sending": "0", "done": "2", "failed": "1",
                      "cancelled": "0", "skipped": "0", "rejected": "0"}  # fmt: skip
    failure = page.locator(f'#failures tr[data-job-id="{failed}"] td').all_text_contents()
    assert failure[:4] == [str(failed), "lung", "2/2", "RuntimeError: out of memory"]
    done = history.jobs["done_lung"]
    stages = page.locator(f'#recent tr[data-job-id="{done}"] .stage').all_text_contents()
    assert stages == ["received +0.0 s", "completed +10.0 s", "queued +10.0 s",
                      "started +12.0 s", "finished +42.0 s", "sent +50.0 s"]  # fmt: skip
    rates = page.evaluate(
        "[...document.querySelectorAll('#throughput tbody tr')].map("
        "r => [...r.cells].map(c => c.textContent))"
    )
    assert rates == [["brain", "0.04", "1", "0", "60.0 s", "71.0 s"],
                     ["lung", "0.04", "1", "1", "30.0 s", "42.0 s"]]  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard.png")

    page.locator(f'#failures button.retry[data-job-id="{failed}"]').click()
    job = wait_until(
        lambda: (j := node.jobs.get(failed)) and j.state is JobState.QUEUED and j,
        timeout=15,
        interval=0.1,
        what="the retried job queued",
    )
    assert job.attempts == 0 and job.error is None
    expect(page.locator("#failures tbody tr")).to_have_count(0)
    expect(page.locator("#count-failed")).to_have_text("0")
    expect(page.locator("#status")).to_have_text(re.compile(r"^updated"))
    page.screenshot(path=ARTIFACTS / "dashboard-after-retry.png")
    with node.database.sessions() as session:
        events, _ = list_events(session, action="retried")
    assert [(e.actor, e.job_id) for e in events] == [("token:ops", failed)]
    assert (ARTIFACTS / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_dashboard_with_a_read_only_token_shows_jobs_without_actions(
    start_node: Callable[..., Node], browser_page: Page
) -> None:
    """A read token (the older plain form) sees the queue and the failures, and no retry or
    cancel button; the page never shows a patient attribute, whatever the token."""
    page = browser_page
    node = start_node(workers=[], api={"tokens": {"monitor": TOKEN}})
    history = make_history(node.database.sessions)
    failed = history.jobs["failed_lung"]
    assert node.api is not None
    page.goto(node.api.url + "/")
    expect(page.locator("#status")).to_have_text("token required")
    page.locator("#token").fill(TOKEN)
    page.locator("#save-token").click()
    page.wait_for_function("() => document.body.dataset.loaded")
    assert page.evaluate("document.body.dataset.scopes") == "read"
    assert page.locator("#count-failed").text_content() == "1"
    failure = page.locator(f'#failures tr[data-job-id="{failed}"] td').all_text_contents()
    assert failure[:4] == [str(failed), "lung", "2/2", "RuntimeError: out of memory"]
    assert page.locator("#recent tbody tr").count() == 5
    assert page.locator("button.retry, button.cancel").count() == 0
    text = page.locator("body").inner_text()
    for secret in (*history.patients.values(), *history.accessions.values(), "Alpha^Anna"):
        assert secret not in text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "dashboard-read-only.png")
    assert node.jobs.get(failed).state is JobState.FAILED  # type: ignore[union-attr]
