"""`dicomnode serve` end to end: series in, job routed, completed, run by the embedded worker;
and a serve killed with jobs queued runs them after its restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.process import ServeProcess, cli
from dicomnode.testing.waiting import wait_until

CONFIG = """
{workers}
[[routes]]
name = "chest"
model = "echo"
match = {{ Modality = "CT" }}
completion = {{ quiet_s = 30, release_grace_s = 1 }}
"""


def _config(tmp_path: Path, workers: str = "") -> Path:
    path = tmp_path / f"node{len(workers)}.toml"
    path.write_text(CONFIG.format(workers=workers))
    return path


def _jobs(node: ServeProcess) -> list[dict[str, object]]:
    result = cli("jobs", "list", "--json", env=node.env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _all_jobs(node: ServeProcess, state: str) -> list[dict[str, object]]:
    """The node's jobs, once there are some and all of them are ``state`` (within 30 s)."""

    def all_in_state() -> list[dict[str, object]] | None:
        jobs = _jobs(node)
        return jobs if jobs and all(job["state"] == state for job in jobs) else None

    return wait_until(
        all_in_state, timeout=30, interval=0.2, what=f"jobs {state}", detail=lambda: _jobs(node)
    )


@pytest.mark.slow
def test_series_runs_through_serve(tmp_path: Path) -> None:
    files = write_series(ct_slices(SeriesSpec(slices=20, seed=51)), tmp_path / "ct")
    node = ServeProcess(tmp_path / "node", config=_config(tmp_path)).start()
    try:
        assert peers.storescu(node.port, files).returncode == 0
        (job,) = _all_jobs(node, "done")
        assert job["model"] == "echo" and job["result"]["series_count"] == 1  # type: ignore[index]
        for stage in ("received_at", "completed_at", "queued_at", "started_at", "finished_at"):
            assert job[stage], stage
    finally:
        node.stop()


@pytest.mark.slow
def test_restarted_serve_runs_what_it_had_queued(tmp_path: Path) -> None:
    files = write_series(ct_slices(SeriesSpec(slices=10, seed=52)), tmp_path / "ct")
    storage = tmp_path / "node"
    no_workers = _config(tmp_path, workers="workers = []")
    node = ServeProcess(storage, config=no_workers).start()
    assert peers.storescu(node.port, files).returncode == 0
    _all_jobs(node, "queued")
    node.kill()  # a crash with a queued job
    restarted = ServeProcess(storage, port=node.port, config=_config(tmp_path)).start()
    try:
        (job,) = _all_jobs(restarted, "done")
        assert job["attempts"] == 1
    finally:
        restarted.stop()
