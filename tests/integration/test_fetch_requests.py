"""Requests against a real PACS (Orthanc on loopback): POST /api/requests and `dicomnode
analyze` retrieve a study by C-MOVE, C-GET or WADO-RS and make its jobs once all of it is in;
a repeated transaction id is the same request; a study the source lacks fails with the reason;
a source that goes down mid-retrieve leaves the request partial with what is missing, and it
resumes for just that once the source is back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from dicomnode.app import Node
from dicomnode.cli import main
from dicomnode.db.models import Association
from dicomnode.domain import JobState, RequestState
from dicomnode.fetch.requests import RequestRepository
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.waiting import wait_until
from tests.integration.fetch_support import (
    READER,
    TOKEN,
    start_with_pacs,
    study_instances,
    study_jobs,
    wait_request,
    write_study,
)

STUDY = "1.2.826.0.1.3680043.99.2101"
BIG = "1.2.826.0.1.3680043.99.2102"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_study(tmp_path_factory.mktemp("study"), STUDY, (8, 3))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", dicomweb=True, sync_storage=False)
    yield server
    server.stop(graceful=False)


def api(node: Node, token: str = TOKEN) -> httpx.Client:
    assert node.api is not None
    return httpx.Client(base_url=node.api.url, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("retrieve", ["move", "get", "dicomweb"])
def test_a_request_retrieves_the_study_then_analyses_it_by_its_route(
    start_node: Callable[..., Node], pacs: Orthanc, study: list[Path], retrieve: str
) -> None:
    node = start_with_pacs(start_node, pacs, retrieve, study)
    with api(node) as client:
        asked = client.post(
            "/api/requests",
            json={"accession_number": "ACC0001", "route": "chest", "priority": "stat",
                  "transaction_id": "ris-0001"},
        )  # fmt: skip
        assert asked.status_code == 202, asked.text
        request_id = asked.json()["id"]
        record = wait_request(node, request_id)
        assert record.state is RequestState.DONE, record.error
        shown = client.get(f"/api/requests/{request_id}").json()
    # every instance the source listed arrived, counted per series
    assert shown["study_instance_uid"] == STUDY
    assert shown["progress"]["expected"] == shown["progress"]["received"] == 11
    assert {s["series_instance_uid"]: (s["expected"], s["received"], s["missing_instances"])
            for s in shown["progress"]["series"]} == {
        f"{STUDY}.1": (8, 8, []), f"{STUDY}.2": (3, 3, [])}  # fmt: skip
    # the route's match chose the series (3 slices are too few), at the request's priority;
    # the intake made no job of its own for the retrieved study
    [job] = shown["jobs"]
    assert (job["route"], job["model"], job["state"], job["priority_name"]) == (
        "chest", "echo", "done", "stat")  # fmt: skip
    assert job["series_instance_uid"] == f"{STUDY}.1"
    assert [j.id for j in study_jobs(node, STUDY)] == [job["id"]]
    assert study_instances(node, STUDY) == 11


def test_a_transaction_id_names_one_request_and_needs_the_operate_scope(
    start_node: Callable[..., Node], pacs: Orthanc, study: list[Path]
) -> None:
    node = start_with_pacs(start_node, pacs, "move", study)
    ask = {"study_instance_uid": STUDY, "route": "chest", "transaction_id": "t-1"}
    with api(node) as client:
        first = client.post("/api/requests", json=ask)
        again = client.post("/api/requests", json=ask)
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["id"] == again.json()["id"]
        other = client.post("/api/requests", json={**ask, "study_instance_uid": "1.2.3"})
        assert other.status_code == 409
        assert f"already names request {first.json()['id']}" in other.json()["error"]
        for bad, why in (
            ({"route": "chest"}, "exactly one of a Study Instance UID and an accession"),
            ({**ask, "route": "nowhere", "transaction_id": "t-2"}, "no route 'nowhere'"),
            ({**ask, "source": "elsewhere", "transaction_id": "t-3"}, "no source 'elsewhere'"),
            ({**ask, "model": "echo", "transaction_id": "t-4"}, "a route or a model, not both"),
            ({"study_instance_uid": "1.2.x"}, "study_instance_uid"),
        ):
            refused = client.post("/api/requests", json=bad)
            assert refused.status_code in (400, 422) and why in refused.json()["error"], bad
        wait_request(node, first.json()["id"])
    with api(node, READER) as monitor:
        assert monitor.post("/api/requests", json=ask).status_code == 403
        shown = monitor.get(f"/api/requests/{first.json()['id']}").json()
        assert shown["state"] == "done" and shown["study_instance_uid"] is None  # no phi scope
    with httpx.Client(base_url=node.api.url) as anonymous:  # type: ignore[union-attr]
        assert anonymous.get(f"/api/requests/{first.json()['id']}").status_code == 401
    assert len(RequestRepository(node.database.sessions).in_state(RequestState.DONE)) == 1


@pytest.mark.parametrize("retrieve", ["move", "dicomweb"])
def test_a_study_the_source_does_not_have_fails_with_the_reason(
    start_node: Callable[..., Node], pacs: Orthanc, study: list[Path], retrieve: str
) -> None:
    node = start_with_pacs(start_node, pacs, retrieve, study)
    with api(node) as client:
        by_uid = client.post("/api/requests", json={"study_instance_uid": "1.2.826.0.1.9.9"})
        by_accession = client.post("/api/requests", json={"accession_number": "NOPE"})
    for asked, why in (
        (by_uid, "has no study 1.2.826.0.1.9.9"),
        (by_accession, "has no study with the request's accession number"),
    ):
        record = wait_request(node, asked.json()["id"])
        assert record.state is RequestState.FAILED and why in (record.error or "")
        assert record.attempts == 1  # not retried: the source answered
    assert study_instances(node, STUDY) == 0


@pytest.mark.slow
@pytest.mark.parametrize("retrieve", ["move", "dicomweb"])
def test_a_source_going_down_mid_retrieve_leaves_a_partial_request_that_resumes(
    start_node: Callable[..., Node], pacs: Orthanc, tmp_path: Path, retrieve: str
) -> None:
    files = write_study(tmp_path / "big", BIG, (400,), rows=128)
    node = start_with_pacs(start_node, pacs, retrieve, files, source={"max_attempts": 50})
    with api(node) as client:
        request_id = client.post("/api/requests", json={"study_instance_uid": BIG}).json()["id"]
    wait_until(lambda: study_instances(node, BIG) > 0, timeout=60, interval=0.01,
               what="the first retrieved instances")  # fmt: skip
    pacs.stop(graceful=False)  # the PACS dies in the middle of the transfer
    record = wait_request(node, request_id, RequestState.PARTIAL)
    wait_until(lambda: _all_closed(node), what="the PACS's associations to the node closed")
    with api(node) as client:  # what the index holds now, as the API shows it
        shown = client.get(f"/api/requests/{request_id}").json()
    [series] = shown["progress"]["series"]
    held = study_instances(node, BIG)
    assert 0 < held < 400 and series["expected"] == 400 and series["received"] == held
    assert len(series["missing_instances"]) == 400 - held == 400 - shown["progress"]["received"]
    assert shown["state"] == "partial" and "missing" in (record.error or "")
    assert not record.job_ids
    assert study_jobs(node, BIG) == []  # nothing half-received is analysed

    restarted = datetime.now(UTC)
    pacs.start()
    record = wait_request(node, request_id, timeout=120)
    assert record.state is RequestState.DONE, record.error
    assert study_instances(node, BIG) == 400
    assert [j.state for j in study_jobs(node, BIG)] == [JobState.DONE.value]
    if retrieve == "move":  # only what was missing was sent again
        with node.database.sessions() as session:
            resent = session.scalar(
                select(func.sum(Association.stored)).where(Association.opened_at >= restarted)
            )
        assert resent == 400 - held


def _all_closed(node: Node) -> bool:
    with node.database.sessions() as session:
        return not session.scalar(
            select(func.count(Association.id)).where(Association.outcome.is_(None))
        )


def test_analyze_cli_asks_and_waits_for_the_jobs(
    start_node: Callable[..., Node],
    pacs: Orthanc,
    study: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = start_with_pacs(start_node, pacs, "get", study)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{node.settings.node.storage_dir}"\n'
        f'[[sources]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\n'
        f"port = {pacs.dicom_port}\n"
        '[[routes]]\nname = "chest"\nmodel = "echo"\nmatch = { Modality = "CT" }\n'
    )
    code = main(["analyze", "--accession", "ACC0001", "--from", "pacs", "--route", "chest",
                 "--wait", "--timeout", "60", "--config", str(config)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "done" in out and "instances: 11 of 11" in out
    assert out.count("job ") == 1 and "(echo, route chest)" in out
    assert main(["analyze", "--study", STUDY, "--from", "elsewhere", "--config", str(config)]) == 2
    assert "no source 'elsewhere'" in capsys.readouterr().err
