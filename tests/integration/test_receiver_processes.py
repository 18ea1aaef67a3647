"""``dicomnode serve --processes 2``: two receiver processes on one DICOM port (SO_REUSEPORT),
one index, one spool (issue 15); on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from dicomnode.db.models import Association, Instance
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.process import ServeProcess, child_pids, running
from dicomnode.testing.waiting import wait_until

SENDERS = 6  # associations at once, per round
SLICES = 8


def _serve(storage: Path, database_url: str) -> ServeProcess:
    serve = ServeProcess(storage, receiver_id="recv", processes="2", database_url=database_url)
    serve.env["DICOMNODE_WORKERS"] = "[]"
    serve.env["DICOMNODE_API__ENABLED"] = "false"
    serve.start()
    wait_until(
        lambda: "listening on" in serve.log.read_text(), timeout=60, what="serve listening",
        detail=lambda: serve.log.read_text()[-3000:],
    )  # fmt: skip
    return serve


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_receiver_processes_share_the_port_the_index_and_the_spool(
    tmp_path: Path, request: pytest.FixtureRequest, database: str
) -> None:
    storage = tmp_path / "node"
    if database == "postgresql":
        request.applymarker(pytest.mark.postgres)
        url = request.getfixturevalue("clean_postgres_url")
    else:
        url = f"sqlite:///{storage.resolve() / 'dicomnode.db'}"
    serve = _serve(storage, url)
    engine = create_engine(url)
    try:
        (child,) = child_pids(serve.pid)
        sent = 0

        def receivers() -> set[str | None]:
            with engine.connect() as connection:
                return set(connection.scalars(select(Association.receiver_id).distinct()))

        # The kernel spreads connections by a hash of their addresses: send rounds of parallel
        # associations until both processes have had some (2 ** -6 per round to miss one).
        for round_ in range(6):
            series = [
                write_series(
                    ct_slices(
                        SeriesSpec(slices=SLICES, rows=16, columns=16, seed=1000 * round_ + s)
                    ),
                    tmp_path / f"series-{round_}-{s}",
                )
                for s in range(SENDERS)
            ]
            with concurrent.futures.ThreadPoolExecutor(SENDERS) as pool:
                results = list(pool.map(lambda files: peers.storescu(serve.port, files), series))
            assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
            sent += SENDERS * SLICES
            if receivers() == {"recv", "recv-1"}:
                break
        assert receivers() == {"recv", "recv-1"}

        def closed_with_all() -> bool:  # each records its end just after storescu has exited
            with engine.connect() as connection:
                open_ = connection.scalar(
                    select(func.count(Association.id)).where(Association.outcome.is_(None))
                )
                stored = connection.scalar(select(func.sum(Association.stored)))
            return open_ == 0 and stored == sent

        wait_until(closed_with_all, timeout=30, what="every association closed")
        with engine.connect() as connection:
            count = connection.scalar(select(func.count(Instance.id)))
            distinct = connection.scalar(
                select(func.count(func.distinct(Instance.sop_instance_uid)))
            )
        assert count == distinct == sent
        for receiver_id in ("recv", "recv-1"):  # each received into its own folder, all placed
            folder = storage / "incoming" / receiver_id
            assert folder.is_dir() and not list(folder.iterdir())
        assert len(list((storage / "spool").rglob("*.dcm"))) == sent

        # The serve killed outright: its receiver process stops too (its stdin closes).
        serve.kill()
        wait_until(lambda: not running(child), timeout=30, what="the receiver process to exit")
    finally:
        serve.kill()
        engine.dispose()


def test_a_dead_receiver_process_is_restarted_and_sigterm_stops_them_all(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "node"
    serve = _serve(storage, f"sqlite:///{storage.resolve() / 'dicomnode.db'}")
    try:
        (child,) = child_pids(serve.pid)
        os.kill(child, signal.SIGKILL)
        restarted = wait_until(
            lambda: [p for p in child_pids(serve.pid) if p != child and running(p)],
            timeout=30,
            what="a new receiver process",
        )
        wait_until(
            lambda: serve.log.read_text().count("receiver recv-1") >= 2,
            timeout=30,
            what="the restarted receiver listening",
        )
        assert "exited with status -9; restarting it" in serve.log.read_text()
        assert peers.echoscu(serve.port).returncode == 0
        assert serve.process is not None
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0
        wait_until(lambda: not any(running(p) for p in restarted), timeout=30,
                   what="the receiver process to stop with the serve")  # fmt: skip
    finally:
        serve.kill()
