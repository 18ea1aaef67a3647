"""Task locks on SQLite and PostgreSQL: one holder at a time, across processes, never waiting;
released on exit, on an exception, and when the holding process dies."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine

from dicomnode.db.locks import TaskLocks, advisory_key
from dicomnode.testing.waiting import wait_until

#: holds the lock "crash.test" on the database named by argv[1], says so, and waits to be killed
HOLDER = """
import sys, time
from sqlalchemy import create_engine
from dicomnode.db.locks import TaskLocks
with TaskLocks(create_engine(sys.argv[1])).hold("crash.test") as held:
    print("held" if held else "refused", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def other(engine: Engine) -> Iterator[TaskLocks]:
    """Locks through a second engine on the same database: another process's view of it."""
    second = create_engine(engine.url)
    yield TaskLocks(second)
    second.dispose()


def test_a_second_holder_is_refused_at_once_then_gets_it_after_release(
    engine: Engine, other: TaskLocks
) -> None:
    locks = TaskLocks(engine)
    with locks.hold("intake.sweep") as held:
        assert held
        with other.hold("intake.sweep") as second:
            assert not second
        with other.hold("spool.retention") as different:
            assert different  # another name is another lock
    with other.hold("intake.sweep") as second:
        assert second


def test_the_lock_is_released_when_the_task_raises(engine: Engine, other: TaskLocks) -> None:
    locks = TaskLocks(engine)

    def boom() -> None:
        raise RuntimeError("task failed")

    with pytest.raises(RuntimeError, match="task failed"):
        locks.exclusively("queue.purge", boom)()
    with other.hold("queue.purge") as held:
        assert held


def test_exclusively_runs_the_task_only_when_it_gets_the_lock(
    engine: Engine, other: TaskLocks
) -> None:
    runs: list[str] = []
    task = TaskLocks(engine).exclusively("queue.purge", lambda: runs.append("ran"))
    task()
    with other.hold("queue.purge") as held:
        assert held
        task()  # skipped: the other holder has it
    assert runs == ["ran"]


def test_a_killed_holders_lock_is_released(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        locks = TaskLocks(engine)
        with locks.hold("crash.test") as held:
            assert not held
        holder.kill()  # SIGKILL: no unlock, only the connection (or the process) ends
        holder.wait(timeout=10)

        def free() -> bool:
            with locks.hold("crash.test") as got:
                return got

        wait_until(free, timeout=10, what="the killed holder's lock released")
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_in_memory_sqlite_locks_within_the_process() -> None:
    locks = TaskLocks(create_engine("sqlite://"))
    with locks.hold("intake.sweep") as held:
        assert held
        with locks.hold("intake.sweep") as second:
            assert not second
    with locks.hold("intake.sweep") as held:
        assert held


def test_keys_are_stable_signed_64_bit_and_names_checked() -> None:
    key = advisory_key("intake.sweep")
    assert key == advisory_key("intake.sweep") and -(2**63) <= key < 2**63
    assert key != advisory_key("spool.retention")
    assert advisory_key("intake.sweep") == -4063562001356757322  # the same in every release
    locks = TaskLocks(create_engine("sqlite://"))
    with pytest.raises(ValueError, match=r"'bad name/\.\.'"), locks.hold("bad name/.."):
        pass
