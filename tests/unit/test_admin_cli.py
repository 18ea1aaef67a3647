"""``dicomnode jobs list|show|retry|cancel`` with the admin's filters, and ``models list``,
over a known job history in SQLite; ``since`` parsing."""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode import admin
from dicomnode.app import Database, open_database
from dicomnode.audit import list_events
from dicomnode.cli import main
from dicomnode.config import load_settings
from dicomnode.errors import InvalidQuery
from dicomnode.testing import cli as testing_cli
from dicomnode.testing.jobs import T0, History, make_history


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Database:
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.setenv("DICOMNODE_NODE__STORAGE_DIR", str(tmp_path / "var"))
    return open_database(load_settings(), migrate=True)


@pytest.fixture
def history(database: Database) -> History:
    return make_history(database.sessions)


def run(
    capsys: pytest.CaptureFixture[str], *args: str, cli: Callable[[list[str]], int] = main
) -> tuple[int, str, str]:
    code = cli(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listed(capsys: pytest.CaptureFixture[str], *args: str) -> list[int]:
    code, out, err = run(capsys, "jobs", "list", "--json", *args)
    assert code == 0, err
    return [job["id"] for job in json.loads(out)]


def test_jobs_list_filters(history: History, capsys: pytest.CaptureFixture[str]) -> None:
    job = history.jobs
    assert listed(capsys, "--accession", "ACC-3") == [
        job["waiting_brain"], job["queued_lung"], job["done_brain"]]  # fmt: skip
    assert listed(capsys, "--patient-id", "PID-ALPHA") == [job["failed_lung"], job["done_lung"]]
    assert listed(capsys, "--patient-id", "PID-ALPHA", "--state", "done") == [job["done_lung"]]
    since = (T0 + timedelta(seconds=350)).isoformat()
    assert listed(capsys, "--since", since) == [job["waiting_brain"], job["queued_lung"]]
    assert listed(capsys, "--since", "3d", "--limit", "2", "--offset", "1") == [
        job["queued_lung"], job["done_brain"]]  # fmt: skip
    assert listed(capsys, "--model", "brain", "--study", history.studies["c"]) == [
        job["waiting_brain"], job["done_brain"]]  # fmt: skip
    code, out, _ = run(capsys, "jobs", "list", "--state", "failed")
    header, row = out.splitlines()
    assert header.split()[:2] == ["ID", "STATE"] and "RuntimeError: out of memory" in row
    code, _, err = run(capsys, "jobs", "list", "--since", "last tuesday")
    assert code == 2 and "'last tuesday'" in err and "2h" in err


def test_jobs_show_prints_stages_sends_and_audit(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "jobs", "show", str(history.jobs["done_lung"]))
    assert code == 0
    stages = out[out.index("stages:") : out.index("sends:")].splitlines()[1:]
    assert [line.split()[0] for line in stages] == [
        "received", "completed", "queued", "started", "finished", "sent"]  # fmt: skip
    assert stages[4].split()[1] == (T0 + timedelta(seconds=42)).isoformat()
    sends = out[out.index("sends:") : out.index("audit:")].splitlines()[1:]
    assert sends[0].split() == ["DESTINATION", "KIND", "STATE", "ATTEMPTS", "LAST", "ERROR"]
    assert sends[1].split() == ["PACS", "SEG", "sent", "1"]
    assert sends[2].split() == ["PACS", "SR", "dead", "3", "C-STORE", "status", "0xA700"]
    code, out, _ = run(capsys, "jobs", "show", str(history.jobs["failed_lung"]), "--json")
    shown = json.loads(out)
    assert shown["error"] == "RuntimeError: out of memory" and shown["attempts"] == 2
    assert shown["stages"]["started"] == (T0 + timedelta(seconds=200)).isoformat()
    assert shown["sends"] == [] and shown["audit"] == []


def test_retry_and_cancel_from_the_cli_are_audited(
    history: History, database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    failed, queued = history.jobs["failed_lung"], history.jobs["queued_lung"]
    assert run(capsys, "jobs", "retry", str(failed))[:2] == (0, f"job {failed} queued\n")
    assert run(capsys, "jobs", "cancel", str(queued))[:2] == (0, f"job {queued} cancelled\n")
    with database.sessions() as session:
        events, _ = list_events(session)
    actor = f"cli:{getpass.getuser()}"
    assert [(e.action, e.actor, e.job_id) for e in events] == [
        ("cancelled", actor, queued), ("retried", actor, failed)]  # fmt: skip
    code, out, _ = run(capsys, "jobs", "show", str(failed))
    assert code == 0 and "retried" in out[out.index("audit:") :] and actor in out


def test_models_list_on_the_embedded_defaults_shows_the_three_models(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0
    assert [m["name"] for m in json.loads(out)] == ["brain_tumor", "lung_nodule", "oct_grading"]


def test_models_list(database: Database, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", "list", "--json", cli=testing_cli.main)
    models = {m["name"]: m for m in json.loads(out)}
    assert code == 0 and {"echo", "lung_nodule"} <= set(models)
    assert models["lung_nodule"]["demo"] is True and models["lung_nodule"]["min_slices"] > 1
    code, out, _ = run(capsys, "models", "list", cli=testing_cli.main)
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert out.split()[:8] == [
        "NAME", "KIND", "VERSION", "DIGEST", "WEIGHTS", "LEVEL", "ACCEPTS", "DEVICES"
    ]  # fmt: skip
    assert " demo " in rows["lung_nodule"] and "CT" in rows["lung_nodule"]
    assert " builtin " in rows["echo"] and rows["echo"].endswith("cpu")


def test_parse_since() -> None:
    now = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert admin.parse_since("2h", now) == now - timedelta(hours=2)
    assert admin.parse_since("30m", now) == now - timedelta(minutes=30)
    assert admin.parse_since("3d", now) == now - timedelta(days=3)
    assert admin.parse_since("1W", now) == now - timedelta(weeks=1)
    assert admin.parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert admin.parse_since("2026-11-20", now) == datetime(2026, 11, 20, tzinfo=UTC)
    assert admin.parse_since("2026-11-20T09:00+01:00", now) == datetime(2026, 11, 20, 8, tzinfo=UTC)
    for bad in ("", "2 hours", "h", "-1h", "2026-13-01"):
        with pytest.raises(InvalidQuery, match="neither a duration"):
            admin.parse_since(bad, now)
    with pytest.raises(InvalidQuery, match=r"unknown job state\(s\) \['bogus'\]"):
        admin.parse_states("failed,bogus")


@pytest.mark.parametrize(
    "since", ["999999999w", "0001-01-01T00:00:00+01:00", "9999-12-31T23:00-01:00"]
)
def test_since_out_of_range_is_a_clear_error(since: str) -> None:
    from dicomnode.admin import parse_since
    from dicomnode.errors import ValueOutOfRange

    with pytest.raises(ValueOutOfRange, match="between the years 1 and 9999"):
        parse_since(since)
