"""A series (or a study) sent in several associations is analysed once, whole: the first part,
a released contiguous stack, starts a job at once, but its results are held for the confirmation
window; the second part, arriving inside it, supersedes that run before anything is sent. The
PACS (Orthanc) ends with exactly one set of results, made from every instance."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicomnode.app import open_database
from dicomnode.config import load_settings
from dicomnode.db.models import Instance
from dicomnode.domain import JobState
from dicomnode.phantoms.chest import chest_ct
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.queue import JobRecord, JobRepository
from dicomnode.testing.orthanc import orthanc
from dicomnode.testing.peers import LOOPBACK, storescu
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.waiting import wait_until

pytestmark = pytest.mark.slow

CONFIRM_S = 12  # longer than the longest gap tried: a split inside it is one series

SERIES_CONFIG = """
[node]
storage_dir = "{storage}"

[[workers]]
models = ["lung_nodule"]

[[routes]]
name = "chest"
model = "lung_nodule"
destinations = ["pacs"]
match = {{ Modality = "CT" }}
completion = {{ quiet_s = 30, release_grace_s = 1, confirm_s = {confirm} }}

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "{host}"
port = {port}
backoff_s = 1
"""

STUDY_CONFIG = """
[node]
storage_dir = "{storage}"

[[routes]]
name = "pair?sleep=1"
model = "echo"
level = "study"
match = {{ Modality = "CT" }}

[routes.completion]
quiet_s = 30
release_grace_s = 1
confirm_s = {confirm}
required_series = {{ first = "(?i)part one", second = "(?i)part two" }}
"""


def _described(spec: SeriesSpec, description: str) -> Iterator[Dataset]:
    for ds in ct_slices(spec):
        ds.SeriesDescription = description
        yield ds


ENDED = {JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.SKIPPED}


def _settled(jobs: JobRepository) -> list[JobRecord] | None:
    """Every job, once one is done and none is unfinished."""
    found = jobs.list(limit=100)
    if any(job.state is JobState.DONE for job in found) and all(
        job.state in ENDED for job in found
    ):
        return found
    return None


@pytest.mark.parametrize("gap_s", [0, 2, 8])
def test_a_series_split_over_two_associations_is_analysed_once_whole(
    tmp_path: Path, gap_s: float
) -> None:
    phantom = chest_ct((40, 128, 128), (2.0, 2.0, 2.5), nodules=1, seed=5101, sizes=(10.0, 14.0))
    files = sorted(phantom.write(tmp_path / "chest"))
    storage = tmp_path / "node"
    with orthanc(tmp_path / "orthanc", sync_storage=False, graceful_stop=False) as pacs:
        config = tmp_path / "node.toml"
        config.write_text(
            SERIES_CONFIG.format(
                storage=storage, host=LOOPBACK, port=pacs.dicom_port, confirm=CONFIRM_S
            )
        )
        settings = load_settings(config)
        serve = ServeProcess(storage, config=config).start()
        database = open_database(settings, migrate=False)
        jobs = JobRepository(database.sessions, settings.queue)
        try:
            half = len(files) // 2
            assert storescu(serve.port, files[:half]).returncode == 0
            if gap_s:
                # the sender pauses (a scanner still reconstructing): the first half, a
                # released contiguous stack, is analysed meanwhile
                wait_until(lambda: jobs.list(limit=10), timeout=10, what="a job for part one")
                time.sleep(gap_s)
            assert storescu(serve.port, files[half:]).returncode == 0
            found = wait_until(lambda: _settled(jobs), timeout=180, what="the jobs to settle",
                               detail=lambda: jobs.list(limit=100))  # fmt: skip
            (done,) = [job for job in found if job.state is JobState.DONE]
            assert done.result is not None
            (source,) = done.result["inputs"]
            assert source["shape"][0] == len(files)  # every slice, not a half
            for other in found:
                if other is not done:
                    assert other.state is JobState.CANCELLED
                    assert "superseded" in (other.error or "")
            objects = done.result["objects"]
            held = Counter(
                i["SOPInstanceUID"] for i in pacs.study_instances(done.study_instance_uid)
            )
            assert set(held) == {o["sop_instance_uid"] for o in objects}  # one set of results
            assert all(count == 1 for count in held.values())
            assert done.sent_at is not None
            # nothing went out before the window after the last instance had passed
            assert done.sent_at >= done.completed_at  # type: ignore[operator]
        finally:
            serve.stop()
            database.engine.dispose()


def test_a_study_whose_series_is_split_runs_once_on_all_of_it(tmp_path: Path) -> None:
    study_uid = generate_uid()
    first = write_series(_described(SeriesSpec(slices=12, seed=5102, study_uid=study_uid),
                                    "part one"), tmp_path / "one")  # fmt: skip
    second = write_series(_described(SeriesSpec(slices=12, seed=5103, study_uid=study_uid),
                                     "part two"), tmp_path / "two")  # fmt: skip
    storage = tmp_path / "node"
    config = tmp_path / "node.toml"
    config.write_text(STUDY_CONFIG.format(storage=storage, confirm=CONFIRM_S))
    settings = load_settings(config)
    serve = ServeProcess(storage, config=config).start()
    database = open_database(settings, migrate=False)
    jobs = JobRepository(database.sessions, settings.queue)
    try:
        assert storescu(serve.port, first).returncode == 0
        assert storescu(serve.port, second[:6]).returncode == 0
        wait_until(
            lambda: [j for j in jobs.list(limit=10) if j.state is not JobState.WAITING],
            timeout=20,
            what="the study job to start on part two's first half",
        )
        time.sleep(2)  # the sender pauses, then sends the rest of part two
        assert storescu(serve.port, second[6:]).returncode == 0
        found = wait_until(lambda: _settled(jobs), timeout=120, what="the jobs to settle",
                           detail=lambda: jobs.list(limit=100))  # fmt: skip
        (done,) = [job for job in found if job.state is JobState.DONE]
        assert len(done.inputs) == 2
        assert done.started_at is not None
        with database.sessions() as session:
            last = session.scalar(select(func.max(Instance.received_at)))
        assert done.started_at >= last  # it ran on all of part two
        superseded = [job for job in found if job is not done]
        assert superseded and all(job.state is JobState.CANCELLED for job in superseded)
    finally:
        serve.stop()
        database.engine.dispose()
