"""Review before send through the real node, in headless Chromium driven by Playwright: CT
series routed to a ``review = true`` route (a command model whose findings the node turns into
SR, key images and KOS) are held in ``review`` with nothing at the PACS (dcmtk's storescp); the
job page shows the finding's numbers and the key images (loaded, at the key image's size; one
PNG fetched and decoded); Approve sends the objects to the PACS; another job Rejected with a
reason sends nothing and shows the reason; Resend sends the approved job's objects again."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.audit import list_events
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

PROGRAM = """
import shutil, sys
from pathlib import Path
shutil.copy(sys.argv[3], Path(sys.argv[2]) / "findings.json")
"""
NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
TOKEN = "reviewer-8d3f1a6c9e2b7054"
REASON = "nodule is a vessel"


def received_uids(folder: Path) -> set[str]:
    return {str(dcmread(p).SOPInstanceUID) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_review_approve_reject_and_resend_on_the_job_page(
    start_node: Callable[..., Node], tmp_path: Path, browser_page: Page
) -> None:
    page = browser_page
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    listed = tmp_path / "findings.json"
    listed.write_text(json.dumps({"findings": [
        {"label": "nodule", "finding_type": NODULE, "probability": 0.87,
         "centre_mm": [0.0, 0.0, 0.0], "diameter_mm": 6.0}]}))  # fmt: skip
    command = {"command": [sys.executable, str(script), "{input}", "{output}", str(listed)]}
    pacs_folder = tmp_path / "pacs"
    with peers.storescp(pacs_folder, ae_title="PACS") as pacs:
        node = start_node(
            models={"commands": {"lung": command}},
            workers=[{"models": ["lung"]}],
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                           "port": pacs}],
            routes=[{"name": "chest", "model": "lung", "match": {"Modality": "CT"},
                     "destinations": ["pacs"], "review": True,
                     "completion": {"quiet_s": 30, "release_grace_s": 0}}],
            api={"tokens": {"rev": {"secret": TOKEN,
                                    "scopes": ["phi", "operate", "review"]}}},
        )  # fmt: skip
        for seed in (5, 6):
            files = write_series(
                ct_slices(SeriesSpec(slices=6, rows=32, columns=32, seed=seed)),
                tmp_path / f"ct{seed}",
            )
            stored = peers.storescu(port_of(node), files)
            assert stored.returncode == 0, stored.stderr
        wait_until(
            lambda: (
                len(jobs := node.jobs.list()) == 2 and all(j.state is JobState.REVIEW for j in jobs)
            ),
            timeout=120,
            interval=0.2,
            what="both jobs held for review",
            detail=lambda: [(j.id, j.state, j.error) for j in node.jobs.list()],
        )
        approved, rejected = sorted(job.id for job in node.jobs.list())
        job = node.jobs.get(approved)
        assert job is not None and job.result is not None
        objects = job.result["objects"]
        keys = [o for o in objects if Path(o["path"]).name.startswith("key-")]
        assert keys, objects
        key = dcmread(node.spool.root / keys[0]["path"])
        key_size = (int(key.Columns), int(key.Rows))
        assert not pacs_folder.exists() or received_uids(pacs_folder) == set()
        assert node.api is not None

        page.goto(f"{node.api.url}/#/jobs/{approved}")
        expect(page.locator("#status")).to_have_text("token required")
        page.locator("#token").fill(TOKEN)
        page.locator("#save-token").click()
        expect(page.locator("#job-state")).to_have_text("review")
        assert page.locator("#overview").evaluate("e => e.hidden") is True
        previews = page.locator("#previews img")
        expect(previews).to_have_count(len(keys))
        page.wait_for_function(
            "() => [...document.querySelectorAll('#previews img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        sizes = previews.evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes[0] == list(key_size)
        finding = page.locator("#job-findings tbody td").all_text_contents()
        assert finding[1:4] == ["nodule", "0.87", "6.0 mm"]
        assert page.locator("#job-sends tbody tr").count() == 0
        assert page.locator("#job-review").evaluate("e => e.hidden") is False
        page.screenshot(path=tmp_path / "review.png")

        page.locator("#approve").click()
        wait_until(
            lambda: received_uids(pacs_folder) == {o["sop_instance_uid"] for o in objects},
            timeout=60,
            what="the approved job's objects at the PACS",
        )
        page.wait_for_function(
            "() => document.getElementById('job-state').textContent === 'done' && "
            "[...document.querySelectorAll('#job-sends tbody tr')]"
            ".every(r => r.cells[2].textContent === 'sent') && "
            "document.querySelector('#job-log tr[data-action=\"approved\"]') !== null"
        )
        assert page.locator("#job-review").evaluate("e => e.hidden") is True

        page.evaluate(f"location.hash = '#/jobs/{rejected}'")
        expect(page.locator("#job-id")).to_have_text(str(rejected))
        expect(page.locator("#job-state")).to_have_text("review")
        page.locator("#reject-reason").fill(REASON)
        page.locator("#reject").click()
        expect(page.locator("#job-state")).to_have_text("rejected")
        expect(page.locator("#job-error")).to_have_text(f"rejected: {REASON}")
        assert node.jobs.get(rejected).state is JobState.REJECTED  # type: ignore[union-attr]

        # resend: the approved job's objects again, to an emptied PACS folder
        for path in pacs_folder.rglob("*"):
            if path.is_file():
                path.unlink()
        page.evaluate(f"location.hash = '#/jobs/{approved}'")
        page.locator(f'button.resend[data-job-id="{approved}"]').click()
        wait_until(
            lambda: received_uids(pacs_folder) == {o["sop_instance_uid"] for o in objects},
            timeout=60,
            what="the resent objects at the PACS",
        )

        with httpx.Client(base_url=node.api.url, timeout=20) as http:
            png = http.get(
                f"/api/jobs/{approved}/previews/1.png", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        assert png.status_code == 200
        assert Image.open(io.BytesIO(png.content)).size == key_size
        # the rejected job's objects never reached the PACS
        other = node.jobs.get(rejected)
        assert other is not None and other.result is not None
        rejected_uids = {o["sop_instance_uid"] for o in other.result["objects"]}
        assert not rejected_uids & received_uids(pacs_folder)
        assert node.sender is not None and node.sender.queue.for_job(rejected) == []
    with node.database.sessions() as session:
        events = [
            (e.actor, e.action, e.job_id, e.detail)
            for action in ("approved", "rejected", "resend")
            for e in list_events(session, action=action)[0]
        ]
    assert ("token:rev", "rejected", rejected, REASON) in events
    assert [(a, j) for a, act, j, _ in events if act == "approved"] == [("token:rev", approved)]
    assert [(a, j) for a, act, j, _ in events if act == "resend"] == [("token:rev", approved)]
