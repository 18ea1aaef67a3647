"""A run's result files are staged privately and published only under the lease (SQLite and
PostgreSQL): a worker that lost its lease leaves ``results/<job id>/`` as it was."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from dicomnode.config import QueueSettings
from dicomnode.domain import Findings, JobState
from dicomnode.errors import ResultsError
from dicomnode.inference.findings import RESULTS_DIR, write_masks
from dicomnode.queue import JobRecord, JobRepository
from dicomnode.queue.staging import RESULTS_DIR as STAGED_RESULTS_DIR
from dicomnode.queue.staging import STAGING_DIR, Staging, clean_staging
from dicomnode.queue.worker import Worker
from dicomnode.testing.jobs import Clock
from dicomnode.testing.models import EchoModel
from dicomnode.testing.waiting import wait_until

STUDY = "1.2.826.0.1.3680043.99.150"


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 3, 1, 8, 0, tzinfo=UTC))


@pytest.fixture
def repo(engine: Engine, clock: Clock) -> JobRepository:
    settings = QueueSettings(max_attempts=3, backoff_s=0, lease_s=30, heartbeat_s=5)
    return JobRepository(engine, settings, clock=clock)


def add(repo: JobRepository, route: str = "r") -> JobRecord:
    return repo.enqueue(
        dedupe_key=f"{route}/1",
        route=route,
        model="echo",
        study_instance_uid=STUDY,
        inputs=[f"{STUDY}.1"],
        state=JobState.QUEUED,
    )


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime in ns) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write(staging: Staging, **files: str) -> None:
    staging.folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (staging.folder / name).write_text(text)


def take_over(repo: JobRepository, clock: Clock, job_id: int, tmp_path: Path) -> Path:
    """w1's lease runs out; w2 runs the job again and publishes its files. The job's folder."""
    clock.advance(31)
    assert repo.reap_expired_leases() == [job_id]
    again = repo.claim("w2")
    assert again is not None and again.id == job_id
    theirs = Staging.for_run(tmp_path, job_id, again.attempts)
    write(theirs, **{"echo.json": "w2's result", "seg.npz": "w2's mask"})
    assert repo.finish(job_id, "w2", {"by": "w2"}, publish=theirs.publish) is JobState.DONE
    assert not theirs.root.exists()
    return tmp_path / RESULTS_DIR / str(job_id)


def test_the_staged_results_layout_is_the_spools() -> None:
    assert STAGED_RESULTS_DIR == RESULTS_DIR


def test_a_finish_without_the_lease_publishes_nothing(
    repo: JobRepository, clock: Clock, tmp_path: Path
) -> None:
    job = add(repo)
    first = repo.claim("w1")
    assert first is not None
    mine = Staging.for_run(tmp_path, job.id, first.attempts)
    folder = take_over(repo, clock, job.id, tmp_path)
    before = snapshot(folder)
    assert set(before) == {"echo.json", "seg.npz"}

    write(mine, **{"echo.json": "w1's late result", "extra.npz": "w1's mask"})  # w1 wakes up
    published: list[bool] = []

    def publish() -> None:
        published.append(True)
        mine.publish()

    assert repo.finish(job.id, "w1", {"by": "w1"}, publish=publish) is None
    assert published == []
    assert snapshot(folder) == before  # byte-identical, not even touched
    done = repo.get(job.id)
    assert done is not None and done.result == {"by": "w2"} and done.lease_owner == "w2"


def test_a_worker_that_lost_its_lease_removes_its_staging_folder(
    repo: JobRepository, clock: Clock, tmp_path: Path
) -> None:
    job = add(repo, "late?write=1")
    claimed = repo.claim("w1")
    assert claimed is not None
    folder = take_over(repo, clock, job.id, tmp_path)
    before = snapshot(folder)

    model = EchoModel()
    worker = Worker(repo, {"echo": model}, worker_id="w1", storage_dir=tmp_path)
    worker.load_models()
    assert worker.execute(claimed) is None  # its run ended, wrote, and found the lease gone
    assert model.runs == 1
    assert snapshot(folder) == before
    assert not any((tmp_path / RESULTS_DIR / STAGING_DIR).iterdir())
    done = repo.get(job.id)
    assert done is not None and done.result == {"by": "w2"}


def test_the_lease_holder_publishes_and_replaces_an_earlier_attempt_whole(
    repo: JobRepository, tmp_path: Path
) -> None:
    job = add(repo, "echo?write=1")
    earlier = tmp_path / RESULTS_DIR / str(job.id)
    earlier.mkdir(parents=True)
    (earlier / "stale.npz").write_text("an earlier attempt's mask")
    claimed = repo.claim("w1")
    assert claimed is not None
    worker = Worker(repo, {"echo": EchoModel()}, worker_id="w1", storage_dir=tmp_path)
    worker.load_models()
    assert worker.execute(claimed) is JobState.DONE
    assert sorted(p.name for p in earlier.iterdir()) == ["echo.json"]
    assert '"worker_id": "w1"' in (earlier / "echo.json").read_text()
    assert not any((tmp_path / RESULTS_DIR / STAGING_DIR).iterdir())


def test_recorded_paths_point_at_the_published_files(tmp_path: Path) -> None:
    staging = Staging.for_run(tmp_path, 7, 1)
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    findings = Findings(model="m", version="1", demo=True, masks={"lesion": mask})
    entries = write_masks(findings, staging.root, 7)
    path = entries["lesion"]["path"]
    assert path == f"{RESULTS_DIR}/7/lesion.npz"
    assert (staging.root / path).is_file() and not (tmp_path / path).exists()
    staging.publish()
    assert (tmp_path / path).is_file() and not staging.root.exists()


def test_a_run_that_wrote_nothing_leaves_the_folder_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / RESULTS_DIR / "3"
    folder.mkdir(parents=True)
    (folder / "seg.dcm").write_text("kept")
    before = snapshot(folder)
    staging = Staging.for_run(tmp_path, 3, 2)
    staging.publish()
    staging.publish()  # again, as after a commit that failed and was retried
    assert snapshot(folder) == before


def test_a_publish_that_fails_records_nothing(repo: JobRepository, tmp_path: Path) -> None:
    job = add(repo)
    assert repo.claim("w1") is not None

    def publish() -> None:
        raise ResultsError("disk full")

    with pytest.raises(ResultsError, match="disk full"):
        repo.finish(job.id, "w1", {"by": "w1"}, publish=publish)
    running = repo.get(job.id)
    assert running is not None and running.state is JobState.RUNNING and running.result is None


def test_a_publish_that_cannot_move_the_files_in_keeps_the_earlier_ones(tmp_path: Path) -> None:
    folder = tmp_path / RESULTS_DIR / "5"
    folder.mkdir(parents=True)
    (folder / "seg.dcm").write_text("earlier")
    staging = Staging.for_run(tmp_path, 5, 2)
    write(staging, **{"seg.dcm": "new"})
    (staging.root / "replaced").mkdir()  # where the earlier folder would go aside: not empty
    (staging.root / "replaced" / "x").write_text("in the way")
    with pytest.raises(ResultsError, match="job 5: results could not be moved"):
        staging.publish()
    assert (folder / "seg.dcm").read_text() == "earlier"


def test_clean_staging_removes_only_folders_no_live_run_can_publish(
    repo: JobRepository, clock: Clock, tmp_path: Path
) -> None:
    running = add(repo, "a")
    claimed = repo.claim("w1")
    assert claimed is not None and claimed.id == running.id
    live = Staging.for_run(tmp_path, running.id, claimed.attempts)
    earlier_attempt = Staging.for_run(tmp_path, running.id, claimed.attempts + 1)
    unknown_job = Staging.for_run(tmp_path, 999, 1)
    for staging in (live, earlier_attempt, unknown_job):
        write(staging, **{"seg.dcm": "x"})
    other = tmp_path / RESULTS_DIR / STAGING_DIR / "not-a-run"
    other.mkdir()
    assert clean_staging(tmp_path, repo.sessions) == 2
    assert live.folder.is_dir() and other.is_dir()
    assert not earlier_attempt.root.exists() and not unknown_job.root.exists()
    assert clean_staging(tmp_path / "elsewhere", repo.sessions) == 0


def test_a_worker_cleans_leftover_staging_folders_when_it_starts(
    repo: JobRepository, tmp_path: Path
) -> None:
    leftover = Staging.for_run(tmp_path, 42, 1)  # a worker killed mid-write
    write(leftover, **{"seg.dcm": "half"})
    worker = Worker(repo, {"echo": EchoModel()}, worker_id="w1", storage_dir=tmp_path)
    worker.start()
    try:
        wait_until(lambda: not leftover.root.exists(), timeout=10, what="leftover removed")
    finally:
        worker.stop(timeout=10)


def test_a_worker_whose_files_cannot_be_published_fails_the_attempt(
    repo: JobRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = add(repo, "echo?write=1")
    claimed = repo.claim("w1")
    assert claimed is not None

    def no_room(self: Staging) -> None:
        raise ResultsError(f"job {self.job_id}: results could not be moved: disk full")

    monkeypatch.setattr(Staging, "publish", no_room)
    worker = Worker(repo, {"echo": EchoModel()}, worker_id="w1", storage_dir=tmp_path)
    worker.load_models()
    assert worker.execute(claimed) is JobState.QUEUED  # retried, as any failed run
    again = repo.get(job.id)
    assert again is not None and again.result is None
    assert again.error == f"ResultsError: job {job.id}: results could not be moved: disk full"
    assert not (tmp_path / RESULTS_DIR / str(job.id)).exists()
    assert not any((tmp_path / RESULTS_DIR / STAGING_DIR).iterdir())
