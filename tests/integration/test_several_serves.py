"""Two nodes on one PostgreSQL and one spool, as several ``dicomnode serve`` behind one service:
their intake sweeps, retention and queue purge run in one process at a time (the other skips its
turn), so concurrent sweeps of the same new series neither fail nor do the work twice."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.app import RETENTION_JOB, SWEEP_JOB, Node
from dicomnode.db.locks import TaskLocks
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.queue.periodic import PURGE_JOB
from dicomnode.testing import peers
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

CHEST = {"name": "chest", "model": "echo", "match": {"Modality": "CT"},
         "completion": {"quiet_s": 30, "release_grace_s": 0.5}}  # fmt: skip
SERIES = 12


def _together(tasks: list[Callable[[], None]]) -> None:
    """Run the tasks at the same moment, each in its own thread, and wait for them."""
    barrier = threading.Barrier(len(tasks))

    def run(task: Callable[[], None]) -> None:
        barrier.wait()
        task()

    threads = [threading.Thread(target=run, args=(task,)) for task in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


@pytest.mark.postgres
def test_two_nodes_sweeping_the_same_new_series_make_each_job_once(
    start_node: Callable[..., Node],
    clean_postgres_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = tmp_path / "shared"
    options = {"node": {"database_url": clean_postgres_url, "retention_days": 30},
               "routes": [CHEST], "background": False}  # fmt: skip
    nodes = [start_node(storage, **options), start_node(storage, **options)]
    files = [
        path
        for n in range(SERIES)
        for path in write_series(ct_slices(SeriesSpec(slices=3, seed=n)), tmp_path / f"ct{n}")
    ]
    series = {str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID) for path in files}
    assert len(series) == SERIES
    assert peers.storescu(port_of(nodes[0]), files).returncode == 0

    caplog.set_level(logging.INFO, logger="dicomnode")
    sweeps = [node.periodic.task(SWEEP_JOB) for node in nodes]
    jobs = nodes[0].jobs
    # a third process holds the sweep: both nodes skip their turn and change nothing
    with TaskLocks(nodes[0].database.engine).hold(SWEEP_JOB) as held:
        assert held
        _together(sweeps)
        assert jobs.count() == 0

    def swept_all() -> bool:
        _together(sweeps)  # both nodes' sweeps (as the scheduler runs them), at once
        return sum(j.state is JobState.QUEUED for j in jobs.list(limit=100)) == SERIES

    wait_until(swept_all, timeout=60, interval=0.1, what="a job for every series")
    for name in (RETENTION_JOB, PURGE_JOB):  # these too: at once, no failure
        _together([node.periodic.task(name) for node in nodes])

    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == []
    found = jobs.list(limit=100)
    assert Counter(job.series_instance_uid for job in found) == dict.fromkeys(series, 1)
