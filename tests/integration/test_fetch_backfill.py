"""Backfill against Orthanc: the query finds the month's CT studies (not the MR, not December's),
one request each, paced by the rate and held to the window on an injected clock, resumed after
an interruption without asking a study twice; the node then retrieves and analyses them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode.app import Node
from dicomnode.cli import main
from dicomnode.domain import RequestState
from dicomnode.errors import InvalidQuery
from dicomnode.fetch.backfill import Backfill, Window, parse_rate
from dicomnode.fetch.query import StudyQuery
from dicomnode.fetch.requests import RequestRepository
from dicomnode.fetch.sources import open_source
from dicomnode.testing.jobs import Clock
from dicomnode.testing.orthanc import Orthanc
from tests.integration.fetch_support import start_with_pacs, study_jobs, wait_request, write_study

ROOT = "1.2.826.0.1.3680043.99.2201"
#: study UID -> (Modality, StudyDate); the query takes the November CTs
STUDIES = {
    f"{ROOT}.1": ("CT", "20261102"),
    f"{ROOT}.2": ("CT", "20261115"),
    f"{ROOT}.3": ("CT", "20261129"),
    f"{ROOT}.4": ("MR", "20261110"),
    f"{ROOT}.5": ("CT", "20261201"),
}
NOVEMBER_CT = [f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"]
QUERY = "Modality=CT&StudyDate=20261101-20261130"


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("studies")
    paths: list[Path] = []
    for number, (uid, (modality, date)) in enumerate(STUDIES.items()):
        attributes = {"Modality": modality, "StudyDate": date, "AccessionNumber": f"B{number}"}
        paths += write_study(folder / str(number), uid, (6,), attributes=attributes)
    return paths


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", sync_storage=False)
    yield server
    server.stop(graceful=False)


class Interrupted(Exception):
    """The backfill was stopped (Ctrl-C) while it waited."""


def test_backfill_paces_requests_inside_the_window_and_resumes_without_asking_twice(
    start_node: Callable[..., Node], pacs: Orthanc, studies: list[Path]
) -> None:
    node = start_with_pacs(start_node, pacs, "move", studies)
    clock = Clock(datetime(2026, 12, 1, 18, 0, tzinfo=UTC))
    requests = RequestRepository(node.database.sessions, clock=clock)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    def stop_at_the_window(seconds: float) -> None:
        if slept and seconds > 3600:  # the window has closed: the admin stops it for the night
            raise Interrupted
        sleep(seconds)

    def backfill(wait: Callable[[float], None]) -> Backfill:
        return Backfill(
            requests, open_source(node.settings, "pacs", None), StudyQuery.parse(QUERY),
            route="chest", rate_per_min=parse_rate("1/h"), window=Window.parse("20:00-21:30"),
            clock=clock, sleep=wait, timezone=UTC,
        )  # fmt: skip

    assert [s.study_instance_uid for s in backfill(sleep).studies()] == NOVEMBER_CT
    with pytest.raises(Interrupted):
        backfill(stop_at_the_window).run()
    # 18:00: waits for the window; 20:00 and 21:00 (1/h); 22:00 is past the window's end
    assert slept == [2 * 3600, 3600]
    first = [requests.get(request_id) for request_id in (1, 2)]
    assert [r.created_at.astimezone(UTC).strftime("%d %H:%M") for r in first] == [
        "01 20:00", "01 21:00"]  # fmt: skip
    assert [r.study_instance_uid for r in first] == NOVEMBER_CT[:2]

    slept.clear()
    report = backfill(sleep).run()  # resumed: the two asked already are skipped, no waiting
    assert (report.found, report.asked, report.already) == (3, 1, 2)
    assert slept == [23 * 3600]  # the rate's next slot (22:00) is outside: the next evening
    third = requests.get(report.request_ids[0])
    assert third.created_at.astimezone(UTC) == datetime(2026, 12, 2, 20, 0, tzinfo=UTC)
    assert third.study_instance_uid == NOVEMBER_CT[2] and third.purpose == "backfill"

    again = backfill(sleep).run()
    assert (again.asked, again.already) == (0, 3)
    assert slept == [23 * 3600]
    node.wake_requests()  # the node retrieves and analyses each
    for request_id in range(1, 4):
        assert wait_request(node, request_id).state is RequestState.DONE
    for uid in NOVEMBER_CT:
        assert [j.route for j in study_jobs(node, uid)] == ["chest"]
    assert all(study_jobs(node, uid) == [] for uid in STUDIES if uid not in NOVEMBER_CT)


def test_backfill_cli_asks_each_study_once(
    start_node: Callable[..., Node],
    pacs: Orthanc,
    studies: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = start_with_pacs(start_node, pacs, "move", studies)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{node.settings.node.storage_dir}"\n'
        f'[[sources]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\n'
        f'port = {pacs.dicom_port}\n[[routes]]\nname = "chest"\nmodel = "echo"\n'
    )
    args = ["backfill", "--from", "pacs", "--query", QUERY, "--route", "chest", "--config",
            str(config), "--json"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["study_instance_uid"] for s in listed] == NOVEMBER_CT
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["asked"] == 3
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["asked"], report["already"]) == (0, 3)
    assert main([*args[:-1], "--window", "25:00-06:00"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_windows_and_rates_parse_or_say_why() -> None:
    night = Window.parse("20:00-06:00")
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert not night.contains(at) and night.opens_after(at) == at.replace(hour=20)
    assert night.contains(at.replace(hour=23)) and night.contains(at.replace(hour=5, minute=59))
    late = at.replace(hour=6)
    assert night.opens_after(late) == late.replace(hour=20)
    day = Window.parse("09:00-17:00")
    assert day.opens_after(at.replace(hour=18)) == at.replace(hour=9) + timedelta(days=1)
    assert parse_rate("2/min") == 2 and parse_rate("30/h") == 0.5 and parse_rate("4") == 4
    for bad in ("fast", "0/min", "-1"):
        with pytest.raises(InvalidQuery, match="rate"):
            parse_rate(bad)
    with pytest.raises(InvalidQuery, match="HH:MM-HH:MM"):
        Window.parse("8pm-6am")
