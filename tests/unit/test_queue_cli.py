"""``dicomnode jobs list|show|retry|cancel`` against a SQLite queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomnode.app import open_database
from dicomnode.cli import main
from dicomnode.config import load_settings
from dicomnode.domain import JobState, Priority
from dicomnode.queue import JobRepository

STUDY = "1.2.826.0.1.3680043.99.300"


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobRepository:
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.setenv("DICOMNODE_NODE__STORAGE_DIR", str(tmp_path / "var"))
    database = open_database(load_settings(), migrate=True)
    return JobRepository(database.sessions)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_jobs_commands(repo: JobRepository, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [
        repo.enqueue(
            dedupe_key=f"k{i}",
            route="ct-lung",
            model="echo",
            study_instance_uid=STUDY,
            series_instance_uid=f"{STUDY}.{i}",
            priority=Priority.STAT if i == 2 else Priority.ROUTINE,
            state=JobState.QUEUED,
        ).id
        for i in range(3)
    ]
    code, out, _ = run(capsys, "jobs", "list", "--json")
    assert code == 0
    listing = json.loads(out)
    assert [j["id"] for j in listing] == ids[::-1]
    assert listing[0]["priority_name"] == "stat" and listing[0]["state"] == "queued"

    code, out, _ = run(capsys, "jobs", "cancel", str(ids[0]))
    assert (code, out.strip()) == (0, f"job {ids[0]} cancelled")
    code, out, _ = run(capsys, "jobs", "list", "--state", "cancelled,failed", "--json")
    assert [j["id"] for j in json.loads(out)] == [ids[0]]
    code, out, _ = run(capsys, "jobs", "retry", str(ids[0]), "--json")
    assert code == 0 and json.loads(out)["state"] == "queued"

    code, out, _ = run(capsys, "jobs", "show", str(ids[1]))
    assert code == 0 and "ct-lung" in out and "state:" in out
    code, out, _ = run(capsys, "jobs", "show", str(ids[1]), "--json")
    assert json.loads(out)["series_instance_uid"] == f"{STUDY}.1"

    code, out, _ = run(capsys, "jobs", "list", "--model", "echo", "--limit", "2")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "PRIORITY"] and len(lines) == 3

    code, _, err = run(capsys, "jobs", "retry", str(ids[1]))
    assert code == 2 and "only failed or cancelled" in err
    code, _, err = run(capsys, "jobs", "show", "999")
    assert code == 2 and "no job 999" in err
    code, _, err = run(capsys, "jobs", "list", "--state", "bogus")
    assert code == 2 and "bogus" in err
