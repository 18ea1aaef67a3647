"""A route's priors against Orthanc: a job of a route with ``priors`` waits while the node finds
the patient's most recent earlier study that matches and retrieves it, then runs with it; the
prior is never analysed itself. With the lung model, two phantom CTs of one patient: the
nodule's growth since the prior is in the job's findings and in the SR."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.domain import JobState, RequestState
from dicomnode.fetch.requests import RequestRepository
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.peers import storescu
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of
from tests.integration.fetch_support import (
    TOKEN,
    start_with_pacs,
    study_instances,
    study_jobs,
    wait_request,
    write_study,
)

ROOT = "1.2.826.0.1.3680043.99.2301"
NOW, PRIOR, OLDER, MR, OTHER = (f"{ROOT}.{n}" for n in range(1, 6))
PRIORS = {"count": 1, "match": {"Modality": "CT", "BodyPartExamined": "CHEST"}}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", dicomweb=True, sync_storage=False)
    yield server
    server.stop(graceful=False)


def small_study(folder: Path, uid: str, date: str, *, patient: str = "PRIOR-1",
                modality: str = "CT") -> list[Path]:  # fmt: skip
    attributes = {"StudyDate": date, "Modality": modality, "BodyPartExamined": "CHEST",
                  "AccessionNumber": f"A{date}"}  # fmt: skip
    return write_study(folder / uid, uid, (6,), attributes=attributes, patient_id=patient)


def test_a_pushed_study_waits_for_its_prior_then_runs_and_the_prior_is_not_analysed(
    start_node: Callable[..., Node], pacs: Orthanc, tmp_path: Path
) -> None:
    held = [
        *small_study(tmp_path, PRIOR, "20260501"),
        *small_study(tmp_path, OLDER, "20250101"),
        *small_study(tmp_path, MR, "20260801", modality="MR"),
        *small_study(tmp_path, OTHER, "20260901", patient="SOMEONE-ELSE"),
    ]
    route = {"name": "chest", "model": "echo", "match": {"Modality": "CT"}, "priors": PRIORS,
             "completion": {"confirm_s": 0}}  # fmt: skip
    node = start_with_pacs(start_node, pacs, "move", held, routes=[route])
    now = small_study(tmp_path, NOW, "20261101")
    assert storescu(port_of(node), now).returncode == 0  # pushed, by an AE that is no source

    [job] = wait_until(lambda: [j for j in study_jobs(node, NOW) if j.state == "done"],
                       timeout=60, what="the pushed study's job done")  # fmt: skip
    requests = RequestRepository(node.database.sessions)
    [search] = requests.for_job(job.id, "priors")
    [prior] = requests.for_job(job.id, "prior")
    assert search.state is RequestState.DONE and search.query["count"] == 1  # type: ignore[index]
    # the most recent earlier CT chest of the patient: not the older one, the MR or another's
    assert (prior.state, prior.study_instance_uid) == (RequestState.DONE, PRIOR)
    assert study_instances(node, PRIOR) == 6
    assert all(study_instances(node, uid) == 0 for uid in (OLDER, MR, OTHER))
    assert job.queued_at is not None and prior.finished_at is not None
    assert job.queued_at >= prior.finished_at  # it waited for its prior
    assert study_jobs(node, PRIOR) == []  # a prior is retrieved, never analysed


def test_a_job_whose_prior_cannot_be_had_still_runs(
    start_node: Callable[..., Node], pacs: Orthanc, tmp_path: Path
) -> None:
    route = {"name": "chest", "model": "echo", "match": {"Modality": "CT"}, "priors": PRIORS,
             "completion": {"confirm_s": 0}}  # fmt: skip
    node = start_with_pacs(start_node, pacs, "move", small_study(tmp_path, PRIOR, "20260501"),
                           routes=[route], source={"max_attempts": 2})  # fmt: skip
    pacs.stop(graceful=False)  # the source is down: no search can be made
    assert storescu(port_of(node), small_study(tmp_path, NOW, "20261101")).returncode == 0
    [job] = wait_until(lambda: [j for j in study_jobs(node, NOW) if j.state == "done"],
                       timeout=60, what="the job done without its prior")  # fmt: skip
    [search] = RequestRepository(node.database.sessions).for_job(job.id, "priors")
    assert search.state is RequestState.FAILED and "did not answer" in (search.error or "")
    assert search.attempts == 2


@pytest.mark.slow
def test_the_lung_model_reports_a_nodules_growth_since_the_prior(
    start_node: Callable[..., Node], pacs: Orthanc, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    import httpx

    from dicomnode.phantoms.chest import Nodule, chest_ct

    def chest(uid: str, date: str, diameter: float) -> list[Path]:
        shape = (80, 256, 256)
        nodule = Nodule(diameter, center_voxel=(256 * 0.3, 256 * 0.45, 40))
        phantom = chest_ct(shape, (1.2, 1.2, 1.25), nodules=[nodule], seed=7)  # one anatomy
        return phantom.write(
            tmp_path / uid, study_uid=uid, patient=("Prior^Patient", "PRIOR-2"),
            attributes={"StudyDate": date, "AccessionNumber": f"L{date}", "StudyTime": "0900"},
        )  # fmt: skip

    files = [*chest(PRIOR, "20260501", 8.0), *chest(NOW, "20261101", 12.0)]
    route = {"name": "chest", "model": "lung_nodule", "priors": PRIORS,
             "match": {"Modality": "CT", "slices": {"min": 50}}}  # fmt: skip
    node = start_with_pacs(start_node, pacs, "dicomweb", files, routes=[route],
                           workers=[{"models": ["lung_nodule"]}])  # fmt: skip
    assert node.api is not None
    with httpx.Client(base_url=node.api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        asked = c.post("/api/requests", json={"accession_number": "L20261101", "route": "chest"})
    record = wait_request(node, asked.json()["id"], timeout=300)
    assert record.state is RequestState.DONE, record.error
    [job_id] = record.job_ids
    job = node.jobs.get(job_id)
    assert job is not None and job.state is JobState.DONE and job.result is not None
    result: dict[str, Any] = job.result
    assert [p["study_instance_uid"] for p in result["priors"]] == [PRIOR]
    [nodule] = [f for f in result["findings"] if f["label"] == "nodule"]
    growth = nodule["attributes"]["growth"]
    assert growth["prior_diameter_mm"] == pytest.approx(8.0, rel=0.2)
    assert growth["diameter_change_mm"] == pytest.approx(4.0, abs=1.5)
    assert growth["volume_change_percent"] > 100 and growth["interval_days"] == 184
    assert growth["volume_doubling_days"] > 0
    assert result["summary"]["prior"]["matched"] == 1
    [sr] = [o for o in result["objects"] if o["kind"] == "SR"]
    text = " ".join(
        str(item.TextValue)
        for item in _content(dcmread(node.spool.root / sr["path"]))
        if "TextValue" in item
    )
    assert "Compared with the prior CT of 2026-05-01 (184 days earlier)" in text
    assert "was 7." in text or "was 8." in text
    assert study_jobs(node, PRIOR) == []


def _content(ds: Any) -> Iterator[Any]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content(item)
