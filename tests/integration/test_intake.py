"""Series sent by dcmtk's storescu become jobs at the right moment, through the intake sweep."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.app import Node
from dicomnode.db.models import Association
from dicomnode.domain import JobState
from dicomnode.intake import Intake
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.queue.repository import JobRecord, JobRepository
from dicomnode.routing import Router
from dicomnode.testing import peers
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CHEST = {"name": "chest", "model": "echo", "match": {"Modality": "CT"},
         "completion": {"quiet_s": 30, "release_grace_s": 1}}  # fmt: skip


def _intake(node: Node) -> tuple[Intake, JobRepository]:
    jobs = JobRepository(node.database.sessions, node.settings.queue)
    router = Router.from_settings(node.settings)
    return Intake(node.database.sessions, node.spool.root, router, jobs), jobs


def _sweep_until(
    intake: Intake,
    jobs: JobRepository,
    done: Callable[[list[JobRecord]], bool],
    timeout: float = 10,
) -> tuple[list[JobRecord], float]:
    """Sweep until ``done(jobs)``: the jobs, and how long that took."""
    start = time.monotonic()

    def swept() -> list[JobRecord] | None:
        intake.sweep()
        found = jobs.list(limit=100)
        return found if done(found) else None

    found = wait_until(swept, timeout=timeout, what="the sweeps' verdict")
    return found, time.monotonic() - start


def _released(node: Node) -> bool:
    """Every association's row records its end (written just after the sender's release)."""
    with node.database.sessions() as session:
        outcomes = session.scalars(select(Association.outcome)).all()
    return bool(outcomes) and all(outcomes)


def _queued(found: list[JobRecord]) -> bool:
    return any(job.state is JobState.QUEUED for job in found)


def _ct(tmp_path: Path, name: str, slices: int = 20, seed: int = 0) -> list[Path]:
    return write_series(ct_slices(SeriesSpec(slices=slices, seed=seed)), tmp_path / name)


def test_whole_series_in_one_association_is_queued_at_release(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False, routes=[CHEST])
    intake, jobs = _intake(node)
    files = _ct(tmp_path, "ct")
    assert peers.storescu(port_of(node), files).returncode == 0
    found, waited = _sweep_until(intake, jobs, _queued)
    (job,) = found
    assert job.state is JobState.QUEUED and waited < 1.0
    assert (job.route, job.model, job.inputs) == ("chest", "echo", (job.series_instance_uid,))
    assert job.completed_at is not None and job.queued_at is not None


def test_series_over_several_associations_waits_for_the_grace(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False, routes=[CHEST])
    intake, jobs = _intake(node)
    files = _ct(tmp_path, "ct", slices=12)
    for part in (files[:4], files[4:8], files[8:]):
        assert peers.storescu(port_of(node), part).returncode == 0
    intake.sweep()
    assert [job.state for job in jobs.list()] == [JobState.WAITING]
    found, waited = _sweep_until(intake, jobs, _queued)
    assert found[0].state is JobState.QUEUED and 0.3 < waited < 3


def test_series_with_a_gap_waits_for_the_grace(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False, routes=[CHEST])
    intake, jobs = _intake(node)
    files = _ct(tmp_path, "ct", slices=12)
    assert peers.storescu(port_of(node), files[:5] + files[6:]).returncode == 0
    wait_until(lambda: _released(node), timeout=10, what="the association row's release")
    intake.sweep()
    assert [job.state for job in jobs.list()] == [JobState.WAITING]
    found, _ = _sweep_until(intake, jobs, _queued)
    assert found[0].state is JobState.QUEUED


def test_quiet_period_without_release(start_node: Callable[..., Node], tmp_path: Path) -> None:
    # no background: the test sweeps itself, and no worker may take the job past queued first
    node = start_node(
        background=False,
        routes=[
            {
                **CHEST,
                "completion": {"quiet_s": 0.5, "release_grace_s": 60, "expected_counts": False},
            }
        ],
    )
    intake, jobs = _intake(node)
    assert peers.storescu(port_of(node), _ct(tmp_path, "ct", slices=3)).returncode == 0
    found, waited = _sweep_until(intake, jobs, _queued)
    assert found[0].state is JobState.QUEUED and waited < 3


def test_unrouted_series_is_skipped_with_its_reason(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False, routes=[{**CHEST, "match": {"Modality": "MR"}}])
    intake, jobs = _intake(node)
    assert peers.storescu(port_of(node), _ct(tmp_path, "ct", slices=3)).returncode == 0
    intake.sweep()
    (job,) = jobs.list()
    assert job.state is JobState.SKIPPED and "no route matched" in (job.error or "")
    intake.sweep()
    assert len(jobs.list()) == 1  # routed once, not every sweep


def test_slice_count_is_checked_when_complete(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(
        background=False, routes=[{**CHEST, "match": {"Modality": "CT", "slices": {"min": 50}}}]
    )
    intake, jobs = _intake(node)
    assert peers.storescu(port_of(node), _ct(tmp_path, "ct", slices=20)).returncode == 0
    found, _ = _sweep_until(intake, jobs, lambda f: bool(f) and f[0].state is not JobState.WAITING)
    assert found[0].state is JobState.SKIPPED and "slices" in (found[0].error or "")


def test_late_instance_opens_a_new_generation(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False, routes=[CHEST])
    intake, jobs = _intake(node)
    files = _ct(tmp_path, "ct", slices=13)
    assert peers.storescu(port_of(node), files[:12]).returncode == 0
    _sweep_until(intake, jobs, _queued)
    assert peers.storescu(port_of(node), files[12:]).returncode == 0  # one more slice
    intake.sweep()
    states = sorted(job.state for job in jobs.list())
    assert states == sorted([JobState.CANCELLED, JobState.WAITING])  # the earlier one superseded
    found, _ = _sweep_until(intake, jobs, _queued)
    assert [job.dedupe_key.rsplit("|", 1)[1] for job in found if job.state is JobState.QUEUED] == [
        "2"
    ]


def test_instances_stored_while_a_sweep_ran_are_not_late(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    # A sweep reads its clock, then the series: the slices stored in between were seen by the
    # verdict although received after that clock. They must not open a second generation.
    node = start_node(background=False, routes=[CHEST])
    jobs = JobRepository(node.database.sessions, node.settings.queue)
    started = datetime.now(UTC)
    intake = Intake(
        node.database.sessions, node.spool.root, Router.from_settings(node.settings), jobs,
        clock=lambda: started,
    )  # fmt: skip
    assert peers.storescu(port_of(node), _ct(tmp_path, "ct")).returncode == 0
    _sweep_until(intake, jobs, _queued)
    for _ in range(3):
        assert intake.sweep().routed == 0
    (job,) = jobs.list()
    assert job.state is JobState.QUEUED and job.dedupe_key.endswith("|1")


def test_a_restarted_intake_picks_up_what_was_stored(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False, routes=[CHEST])
    assert peers.storescu(port_of(node), _ct(tmp_path, "ct")).returncode == 0
    intake, jobs = _intake(node)  # nothing swept before this "restart"
    found, _ = _sweep_until(intake, jobs, _queued)
    assert found[0].state is JobState.QUEUED


# -- a study-level route: brain MRI with four required sequences ------------------------------

BRAIN = {
    "name": "brain", "model": "echo", "level": "study", "match": {"Modality": "MR"},
    "completion": {
        "quiet_s": 0.3, "release_grace_s": 0.3, "study_timeout_s": 2,
        "required_series": {"T1c": r"(?i)t1.*(\+c|post|gd|contrast)", "T1": "(?i)t1",
                            "T2": "(?i)t2(?!.*flair)", "FLAIR": "(?i)flair"},
    },
}  # fmt: skip


def _mr_series(
    tmp_path: Path, study_uid: str, description: str, seed: int, contrast: bool = False
) -> list[Path]:
    def as_mr(ds: Dataset) -> Dataset:
        ds.Modality, ds.SeriesDescription = "MR", description
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        del ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType
        if contrast:
            ds.ContrastBolusAgent = "Gadobutrol"
        return ds

    spec = SeriesSpec(slices=4, rows=32, columns=32, study_uid=study_uid, seed=seed)
    return write_series([as_mr(ds) for ds in ct_slices(spec)], tmp_path / description)


def _brain_study(node: Node, tmp_path: Path, descriptions: list[str]) -> None:
    study_uid = generate_uid()
    for seed, description in enumerate(descriptions, start=100):
        files = _mr_series(
            tmp_path, study_uid, description, seed, contrast=description.endswith("post")
        )
        assert peers.storescu(port_of(node), files).returncode == 0


def test_brain_study_runs_on_its_four_sequences(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False, routes=[BRAIN])
    intake, jobs = _intake(node)
    _brain_study(node, tmp_path, ["AX T1 SE", "AX T1 SE post", "AX T2 TSE", "AX T2 FLAIR"])
    found, _ = _sweep_until(intake, jobs, _queued)
    (job,) = found
    assert job.state is JobState.QUEUED and job.level == "study" and len(job.inputs) == 4


@pytest.mark.parametrize("on_missing,state", [("fail", JobState.FAILED), ("run", JobState.QUEUED)])
def test_brain_study_missing_flair_follows_its_action(
    start_node: Callable[..., Node], tmp_path: Path, on_missing: str, state: JobState
) -> None:
    route: dict[str, Any] = {
        **BRAIN,
        "completion": {**BRAIN["completion"], "on_missing": on_missing},
    }
    node = start_node(background=False, routes=[route])
    intake, jobs = _intake(node)
    _brain_study(node, tmp_path, ["AX T1 SE", "AX T1 SE post", "AX T2 TSE"])
    intake.sweep()
    assert [job.state for job in jobs.list()] == [JobState.WAITING]
    found, _ = _sweep_until(intake, jobs, lambda f: f[0].state is not JobState.WAITING)
    (job,) = found
    assert job.state is state
    if state is JobState.FAILED:
        assert "FLAIR" in (job.error or "")
    else:
        assert len(job.inputs) == 3


@pytest.mark.postgres
def test_series_and_study_routes_on_postgres(
    start_node: Callable[..., Node], clean_postgres_url: str, tmp_path: Path
) -> None:
    node = start_node(background=False, node={"database_url": clean_postgres_url},
                      routes=[CHEST, BRAIN])  # fmt: skip
    intake, jobs = _intake(node)
    assert peers.storescu(port_of(node), _ct(tmp_path, "ct")).returncode == 0
    _brain_study(node, tmp_path, ["AX T1 SE", "AX T1 SE post", "AX T2 TSE", "AX T2 FLAIR"])
    found, _ = _sweep_until(intake, jobs, lambda f: sum(j.state is JobState.QUEUED for j in f) == 2)
    assert sorted((job.route, job.state, len(job.inputs)) for job in found) == [
        ("brain", JobState.QUEUED, 4), ("chest", JobState.QUEUED, 1)]  # fmt: skip
