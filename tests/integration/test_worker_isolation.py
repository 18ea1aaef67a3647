"""``serve`` runs its ``[[workers]]`` as child processes (issue 16): a model run that takes its
process down (the out-of-memory killer's SIGKILL, simulated by the echo model's ``kill``
directive, or an outside SIGKILL) takes down that worker only. The serve (receiver, API) keeps
its process and keeps storing a legitimate sender's series during and after; the dead worker
is restarted; its job is retried, and fails for good with the cause once its attempts are used
up. ``max_memory_mb`` turns a run past the limit into a job error, the worker living on.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.models import RUN_LOG_ENV
from dicomnode.testing.process import ServeProcess, child_pids, cli, running
from dicomnode.testing.waiting import wait_until

CONFIG = """
[queue]
max_attempts = {attempts}
backoff_s = 0
lease_s = {lease}
heartbeat_s = 1

[[workers]]
models = ["echo"]
{worker}

[[routes]]
name = "{bomb}"
model = "echo"
match = {{ calling_aet = "BOMBER" }}
completion = {{ quiet_s = 30, release_grace_s = 0.5, confirm_s = 0 }}

[[routes]]
name = "chest"
model = "echo"
match = {{ Modality = "CT" }}
completion = {{ quiet_s = 30, release_grace_s = 0.5, confirm_s = 0 }}
"""


class Node:
    """A ``serve`` of the testing CLI with the config above; its jobs, series and children."""

    def __init__(self, tmp_path: Path, *, bomb: str, attempts: int = 2, lease: float = 30,
                 worker: str = "") -> None:  # fmt: skip
        self.folder = tmp_path
        config = tmp_path / "node.toml"
        config.write_text(CONFIG.format(bomb=bomb, attempts=attempts, lease=lease, worker=worker))
        self.serve = ServeProcess(tmp_path / "node", config=config)
        self.serve.env[RUN_LOG_ENV] = str(tmp_path / "runs.log")
        self.serve.env["DICOMNODE_API__TOKEN"] = "t"
        self.series = 0

    def start(self) -> Node:
        seen = self.log().count("started: models") if self.serve.log.exists() else 0
        self.serve.start()
        self.api = (
            wait_until(
                lambda: re.search(r"HTTP API on (http://\S+)", self.serve.log.read_text()),
                timeout=30,
                what="the API's address",
            )
            .group(1)
            .rstrip(",")
        )
        self.worker_pid = wait_until(self.worker_child, timeout=30, what="a worker process")
        wait_until(lambda: self.log().count("started: models") > seen, timeout=60,
                   what="the worker process running", detail=self.log)  # fmt: skip
        return self

    def log(self) -> str:
        return self.serve.log.read_text(errors="replace")

    def worker_child(self) -> int | None:
        live = [pid for pid in child_pids(self.serve.pid) if running(pid)]
        return live[0] if len(live) == 1 else None

    def store(self, calling_aet: str = "STORESCU") -> None:
        """One new CT series, sent in one association: every instance stored."""
        self.series += 1
        spec = SeriesSpec(slices=4, rows=16, columns=16, seed=700 + self.series)
        files = write_series(ct_slices(spec), self.folder / f"series-{self.series}")
        sent = peers.storescu(self.serve.port, files, calling_aet=calling_aet)
        assert sent.returncode == 0, sent.stderr

    def jobs(self) -> list[dict[str, object]]:
        result = cli("jobs", "list", "--json", "--limit", "500", env=self.serve.env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def job(self, route: str, state: str) -> dict[str, object] | None:
        return next((j for j in self.jobs() if j["route"] == route and j["state"] == state), None)

    def runs(self) -> list[list[str]]:
        path = self.folder / "runs.log"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def health(self) -> dict[str, object]:
        # the details need a token (read scope); without one, health says only up or down
        answer = httpx.get(
            f"{self.api}/api/health", headers={"Authorization": "Bearer t"}, timeout=10
        )
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.mark.slow
def test_a_run_killed_like_the_oom_killer_does_takes_down_its_worker_only(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, bomb="bomb?kill=always").start()
    try:
        serve_pid, first_worker = node.serve.pid, node.worker_pid
        # out of memory in a cgroup (MemoryMax=, a container's limit), the kernel kills the
        # process of the highest score: the worker's, never the serve's
        scores = [int(Path(f"/proc/{pid}/oom_score_adj").read_text())
                  for pid in (serve_pid, first_worker)]  # fmt: skip
        assert scores[1] >= 500 and scores[1] > scores[0], scores
        node.store(calling_aet="BOMBER")
        # while the worker process dies and is restarted, a legitimate sender stores
        stored_during = 0
        while node.job("bomb?kill=always", "failed") is None:
            node.store()
            stored_during += 1
            assert stored_during < 40, node.log()[-3000:]
        bomb = node.job("bomb?kill=always", "failed")
        assert bomb is not None
        assert bomb["attempts"] == 2  # both attempts killed their worker process
        assert "killed by SIGKILL" in str(bomb["error"]), bomb
        assert "died while running this job" in str(bomb["error"])
        kills = [run for run in node.runs() if run[0] == "kill"]
        assert [int(run[2]) for run in kills] == [1, 2]
        assert kills[0][3] != kills[1][3]  # the second attempt ran in a restarted process
        log = node.log()
        assert log.count("Worker process worker-0") >= 2 and "exited with status -9" in log

        # the serve was never touched: the same process, receiving, answering, its worker back
        assert node.serve.process is not None and node.serve.process.poll() is None
        assert node.serve.pid == serve_pid
        restarted = wait_until(node.worker_child, timeout=30, what="the restarted worker")
        assert restarted != first_worker
        node.store()  # and after
        wait_until(
            lambda: (
                sum(j["route"] == "chest" and j["state"] == "done" for j in node.jobs())
                == stored_during + 1
            ),
            timeout=60,
            what="every legitimate series' job done",
            detail=node.jobs,
        )
        health = node.health()
        (worker,) = health["workers"]["embedded"]  # type: ignore[index]
        assert worker["alive"] is True and worker["models"] == ["echo"]
        assert worker["jobs_run"] >= 1
    finally:
        node.serve.stop()
    assert not running(restarted)  # stopped with the serve


@pytest.mark.slow
def test_a_worker_process_killed_mid_job_is_restarted_and_its_job_runs_again(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, bomb="slow?sleep=3").start()
    try:
        node.store(calling_aet="BOMBER")
        wait_until(lambda: any(r[0] == "start" for r in node.runs()), timeout=30,
                   what="the slow job to start")  # fmt: skip
        doomed = node.worker_pid
        os.kill(doomed, signal.SIGKILL)
        node.store()  # while it is down
        done = wait_until(
            lambda: node.job("slow?sleep=3", "done"), timeout=60, what="the slow job done",
            detail=node.jobs,
        )  # fmt: skip
        assert done["attempts"] == 2 and done["error"] is None
        starts = [r for r in node.runs() if r[0] == "start" and r[1] == str(done["id"])]
        assert [r[2] for r in starts] == ["1", "2"] and starts[0][3] != starts[1][3]
        assert str(doomed) in starts[0][3]  # worker ids name their process
        node.store()  # and after
        wait_until(
            lambda: sum(j["route"] == "chest" and j["state"] == "done" for j in node.jobs()) == 2,
            timeout=60,
            what="the legitimate series' jobs done",
        )
    finally:
        node.serve.stop()


@pytest.mark.slow
def test_a_run_past_max_memory_mb_fails_with_memory_error_and_the_worker_lives_on(
    tmp_path: Path,
) -> None:
    node = Node(
        tmp_path, bomb="big?allocate=4096", attempts=1, worker="max_memory_mb = 1024"
    ).start()
    try:
        node.store(calling_aet="BOMBER")
        failed = wait_until(
            lambda: node.job("big?allocate=4096", "failed"), timeout=60, what="the big job"
        )
        assert failed["error"] == "MemoryError", failed
        node.store()
        wait_until(lambda: node.job("chest", "done"), timeout=60, what="the next job done")
        assert node.worker_child() == node.worker_pid  # the same process, never restarted
        assert "data may not grow past 1024 MB" in node.log()
    finally:
        node.serve.stop()


@pytest.mark.slow
def test_a_serve_killed_outright_takes_its_worker_process_with_it(tmp_path: Path) -> None:
    """SIGKILL to the serve: its worker process goes at once (stdin EOF) without finishing the
    job; the restarted serve's worker runs it once its lease has expired."""
    node = Node(tmp_path, bomb="slow?sleep=5", lease=3).start()
    node.store(calling_aet="BOMBER")
    wait_until(lambda: any(r[0] == "start" for r in node.runs()), timeout=30,
               what="the slow job to start")  # fmt: skip
    orphan = node.worker_pid
    node.serve.kill()
    wait_until(lambda: not running(orphan), timeout=10, what="the worker process to go")
    assert not any(r[0] == "end" for r in node.runs())  # it did not finish the job
    node.start()
    try:
        done = wait_until(lambda: node.job("slow?sleep=5", "done"), timeout=60,
                          what="the job run again", detail=node.jobs)  # fmt: skip
        assert done["attempts"] == 2
    finally:
        node.serve.stop()
