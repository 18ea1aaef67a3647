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


def test_models_compare_pairs_live_and_shadow_runs(
    repo: JobRepository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two inputs both routes ran: a nodule whose saved masks overlap (Dice 0.6), and grades
    (2, 2) and (0, 2); a third input only the live route ran is not paired."""
    import numpy as np

    from dicomnode.domain import Findings
    from dicomnode.inference.findings import write_masks

    storage = tmp_path / "var"
    grid = np.zeros((1, 4, 4), dtype=np.uint8)
    live_mask, shadow_mask = grid.copy(), grid.copy()
    live_mask[0, 0, 0:4] = 1  # 4 voxels
    shadow_mask[0, 0, 1:4] = 1  # 3 shared ...
    shadow_mask[0, 1, 0:3] = 1  # ... of 6: Dice 2 * 3 / 10
    nodule = {"label": "nodule", "probability": 0.9, "centre_mm": [0, 0, 0],
              "diameter_mm": 6.0, "mask": {"name": "nodules", "value": 1}}  # fmt: skip

    def finished(route: str, mode: str, series: str, result: dict[str, object]) -> int:
        job = repo.enqueue(dedupe_key=f"{route}|{series}", route=route, model=route, mode=mode,
                           study_instance_uid=STUDY, series_instance_uid=series,
                           state=JobState.QUEUED)  # fmt: skip
        assert repo.claim("w", [route]) is not None
        repo.finish(job.id, "w", result)
        return job.id

    for route, mode, mask in (("lung", "live", live_mask), ("lung_next", "shadow", shadow_mask)):
        job_id = repo.enqueue(dedupe_key=f"id-{route}", route="x", model="x",
                              study_instance_uid=STUDY).id  # fmt: skip
        masks = write_masks(Findings("m", "1", False, masks={"nodules": mask}), storage, job_id)
        finished(route, mode, f"{STUDY}.1", {"findings": [nodule], "masks": masks})
    grade = {"label": "dr_grade", "probability": 0.8}
    finished("lung", "live", f"{STUDY}.2", {"findings": [{**grade, "attributes": {"grade": 2}}]})
    finished("lung_next", "shadow", f"{STUDY}.2",
             {"findings": [{**grade, "attributes": {"grade": 2}}]})  # fmt: skip
    finished("lung", "live", f"{STUDY}.3", {"findings": [{**grade, "attributes": {"grade": 0}}]})
    finished("lung_next", "shadow", f"{STUDY}.3",
             {"findings": [{**grade, "attributes": {"grade": 2}}]})  # fmt: skip
    finished("lung", "live", f"{STUDY}.4", {"findings": [nodule]})

    code, out, _ = run(capsys, "models", "compare", "lung", "lung_next", "--json")
    assert code == 0
    numbers = json.loads(out)
    assert (numbers["live_jobs"], numbers["shadow_jobs"], numbers["inputs"]) == (4, 3, 3)
    assert (numbers["matched"], numbers["only_live"], numbers["only_shadow"]) == (3, 0, 0)
    assert numbers["dice_pairs"] == 1 and numbers["mean_dice"] == pytest.approx(0.6)
    assert numbers["graded"] == 2 and numbers["grade_agreement"] == pytest.approx(0.5)
    code, out, _ = run(capsys, "models", "compare", "lung", "lung_next")
    assert code == 0 and "3 inputs both ran on" in out
    assert "mean Dice (1 masks)" in out and "0.600" in out and "50.0%" in out
    code, out, _ = run(capsys, "models", "compare", "lung", "lung_next", "--since", "1h",
                       "--json")  # fmt: skip
    assert json.loads(out)["inputs"] == 3
    code, out, _ = run(capsys, "jobs", "list")
    assert "lung_next (shadow)" in out


def test_jobs_approve_and_reject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomnode.audit import list_events
    from dicomnode.queue.outcomes import ReleasePolicy

    config = tmp_path / "dicomnode.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "var"}"\n'
        '[[routes]]\nname = "rv"\nmodel = "echo"\ndestinations = ["pacs"]\nreview = true\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 1\n'
    )
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    settings = load_settings(config)
    database = open_database(settings, migrate=True)
    repo = JobRepository(database.sessions, policy=ReleasePolicy.from_settings(settings))
    ids = []
    for i in range(2):
        job = repo.enqueue(dedupe_key=f"rv{i}", route="rv", model="echo", study_instance_uid=STUDY,
                           destinations=["pacs"], state=JobState.QUEUED)  # fmt: skip
        assert repo.claim("w") is not None
        assert repo.finish(job.id, "w", {"objects": []}) is JobState.REVIEW
        ids.append(job.id)
    code, out, _ = run(
        capsys, "jobs", "list", "--state", "review", "--json", "--config", str(config)
    )
    assert code == 0 and [j["id"] for j in json.loads(out)] == ids[::-1]
    code, out, _ = run(
        capsys, "jobs", "approve", str(ids[0]), "--note", "ok", "--config", str(config)
    )
    assert (code, out.strip()) == (0, f"job {ids[0]} sending")
    code, _, err = run(capsys, "jobs", "approve", str(ids[0]), "--config", str(config))
    assert code == 2 and "only a job in review can be approved" in err
    with pytest.raises(SystemExit):
        run(capsys, "jobs", "reject", str(ids[1]), "--config", str(config))
    assert "--reason" in capsys.readouterr().err
    code, _, err = run(
        capsys, "jobs", "reject", str(ids[1]), "--reason", " ", "--config", str(config)
    )
    assert code == 2 and "needs a reason" in err
    code, out, _ = run(
        capsys, "jobs", "reject", str(ids[1]), "--reason", "motion", "--config", str(config)
    )
    assert (code, out.strip()) == (0, f"job {ids[1]} rejected")
    with database.sessions() as session:
        events, _ = list_events(session, action="rejected")
    assert [(e.actor.startswith("cli:"), e.detail) for e in events] == [(True, "motion")]
