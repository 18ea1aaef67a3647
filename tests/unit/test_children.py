"""The child processes of ``serve`` (issue 16): the generic supervisor (restart with backoff,
the stop line, EOF), which workers run as children and which in threads, and the worker
process's guards (its out-of-memory score, RLIMIT_DATA)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomnode import children
from dicomnode.app import Node
from dicomnode.children import Parent, Supervisor
from dicomnode.config import Settings, WorkerSettings
from dicomnode.queue.processes import OOM_SCORE_ADJ, WorkerAssignment, offer_to_oom_killer
from dicomnode.testing.waiting import wait_until

#: a child: reads its assignment, says it is ready, echoes what it reads after to a file, and
#: exits with the status its assignment names (after the stop line or EOF, or at once)
CHILD = """
import sys
from dicomnode.children import Parent
parent = Parent()
out, code, at_once = parent.assignment().decode().split()
parent.say(b"L")
if at_once == "1":
    sys.exit(int(code))
asked = parent.wait()
open(out, "a").write("asked\\n" if asked else "gone\\n")
sys.exit(int(code))
"""


def _supervisor(tmp_path: Path, code: int, at_once: bool, **hooks: Callable[..., None]):
    out = tmp_path / "out.txt"
    supervisor = Supervisor(
        "test",
        ["one"],
        [sys.executable, "-c", CHILD],
        assignment=lambda name, pid: f"{out} {code} {int(at_once)}".encode(),
        **hooks,  # type: ignore[arg-type]
    )
    return supervisor, out


def test_the_stop_line_stops_a_child_and_it_is_not_restarted(tmp_path: Path) -> None:
    supervisor, out = _supervisor(tmp_path, 0, False)
    supervisor.start()
    assert supervisor.wait_ready(30) == []
    (pid,) = supervisor.pids.values()
    supervisor.stop(10)
    assert out.read_text() == "asked\n"
    assert supervisor.pids == {} and not supervisor.alive("one")
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_dying_child_is_restarted_with_backoff_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(children, "RESTART_DELAY_S", 0.05)
    exits: list[tuple[str, int]] = []
    lock = threading.Lock()

    def died(name: str, pid: int, code: int) -> None:
        with lock:
            exits.append((name, code))

    supervisor, _ = _supervisor(tmp_path, 3, True, on_exit=died)
    supervisor.start()
    try:
        wait_until(lambda: len(exits) >= 3, timeout=30, what="three restarts")
    finally:
        supervisor.stop(10)
    assert exits[:3] == [("one", 3)] * 3


def test_a_child_sees_eof_without_the_stop_line_as_its_serve_gone() -> None:
    read, write = _pipe()
    write.write(b"assignment\n")
    write.close()
    parent = Parent(read, open("/dev/null", "wb"))  # noqa: SIM115
    assert parent.assignment() == b"assignment\n"
    assert parent.wait() is False
    read, write = _pipe()
    write.write(b"assignment\nstop\n")
    write.flush()  # the stop line alone ends the wait, before EOF
    parent = Parent(read, open("/dev/null", "wb"))  # noqa: SIM115
    parent.assignment()
    assert parent.wait() is True
    write.close()


def _pipe():  # type: ignore[no-untyped-def]
    import os

    r, w = os.pipe()
    return os.fdopen(r, "rb"), os.fdopen(w, "wb")


def test_the_child_environment_drops_what_the_settings_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DICOMNODE_NODE__PORT", "1")
    monkeypatch.setenv("DICOMNODE_WORKERS", "[]")
    monkeypatch.setenv("DICOMNODE_CONFIG", "/x.toml")
    monkeypatch.setenv("DICOMNODE_TEST_RUN_LOG", "/tmp/runs.log")
    env = children.settings_free_environ()
    assert "DICOMNODE_NODE__PORT" not in env and "DICOMNODE_WORKERS" not in env
    assert "DICOMNODE_CONFIG" not in env and env["DICOMNODE_TEST_RUN_LOG"] == "/tmp/runs.log"


def test_workers_run_as_processes_by_default_and_in_threads_with_builtin_models(
    start_node: Callable[..., Node],
) -> None:
    assert WorkerSettings().isolation == "process" and WorkerSettings().max_memory_mb == 0
    node = start_node(background=False)  # build_node(..., builtin_models=the test models)
    assert node.worker_processes is None and len(node.workers) == 1


def test_serve_of_the_testing_cli_runs_its_workers_as_processes(tmp_path: Path) -> None:
    from dicomnode.app import build_node
    from dicomnode.testing.cli import COMMAND
    from dicomnode.testing.models import MODELS

    workers = [{"models": ["echo"]}, {"models": ["echo"], "isolation": "thread"}]
    node_settings = {"host": "127.0.0.1", "port": 0, "storage_dir": tmp_path / "node"}
    settings = Settings(node=node_settings, workers=workers, routes=[], api={"enabled": False})
    node = build_node(settings, builtin_models=MODELS, worker_processes=True, command=COMMAND)
    try:
        assert node.worker_processes is not None and len(node.workers) == 1  # the thread one
        (process,) = node.worker_processes.workers.values()
        assert process.models == ("echo",) and process.device == "cpu"
        argv = node.worker_processes.children.argv
        assert argv[:3] == list(COMMAND) and argv[-2:] == ["worker", "--serve-child"]
    finally:
        node.database.engine.dispose()


def test_an_assignment_travels_whole(tmp_path: Path) -> None:
    settings = Settings(workers=[{"models": ["echo"], "max_memory_mb": 512}])
    line = WorkerAssignment(settings, 0, "host:1:cpu").to_json()
    back = WorkerAssignment.from_json(line)
    assert back.settings == settings and back.worker_id == "host:1:cpu"
    assert back.entry.max_memory_mb == 512


def test_a_worker_process_offers_itself_to_the_oom_killer(tmp_path: Path) -> None:
    score = tmp_path / "oom_score_adj"
    score.write_text("0\n")
    offer_to_oom_killer(score)
    assert score.read_text() == f"{OOM_SCORE_ADJ}\n"
    score.write_text("900\n")
    offer_to_oom_killer(score)  # never lowered
    assert score.read_text() == "900\n"


def test_max_memory_mb_limits_the_data_of_a_cpu_worker_only() -> None:
    probe = (
        "import resource; from dicomnode.config import WorkerSettings; "
        "from dicomnode.queue.processes import limit_memory; "
        "limit_memory(WorkerSettings(device=DEVICE, max_memory_mb=256)); "
        "print(resource.getrlimit(resource.RLIMIT_DATA)[0]); "
        "data = bytearray(512 * 2**20)"
    )
    limited = subprocess.run([sys.executable, "-c", probe.replace("DEVICE", "'cpu'")],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert limited.stdout.strip() == str(256 * 2**20)
    assert limited.returncode == 1 and "MemoryError" in limited.stderr
    gpu = subprocess.run([sys.executable, "-c", probe.replace("DEVICE", "'cuda:0'")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert gpu.returncode == 0, gpu.stderr
