"""Several receivers on one database and one spool (issue 15): receiver ids on associations,
in-transit files per receiver, associations a dead receiver held closed as lost at restart."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomnode.app import Node
from dicomnode.db.index import LOST
from dicomnode.db.models import Association
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from tests.helpers import port_of

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def _association(receiver_id: str, outcome: str | None, port: int) -> Association:
    closed = None if outcome is None else T0
    return Association(calling_aet="CT1", called_aet="DICOMNODE", host="10.0.0.9", port=port,
                       opened_at=T0, closed_at=closed, outcome=outcome, stored=3, refused=0,
                       receiver_id=receiver_id)  # fmt: skip


def test_associations_carry_the_receiver_id_and_files_arrive_in_its_folder(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(node={"receiver_id": "recv-a"}, background=False)
    assert node.spool.incoming == node.spool.root / "incoming" / "recv-a"
    files = write_series(ct_slices(SeriesSpec(slices=3, rows=16, columns=16, seed=7)), tmp_path)
    assert peers.storescu(port_of(node), files).returncode == 0
    with node.database.sessions() as session:
        rows = session.scalars(select(Association)).all()
    assert [(r.receiver_id, r.outcome, r.stored) for r in rows] == [("recv-a", "released", 3)]
    assert node.spool.incoming.is_dir() and not list(node.spool.incoming.iterdir())


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_restarting_receiver_closes_only_its_own_open_associations_as_lost(
    start_node: Callable[..., Node], tmp_path: Path, request: pytest.FixtureRequest, database: str
) -> None:
    node_settings: dict[str, object] = {"receiver_id": "recv-a"}
    if database == "postgresql":
        request.applymarker(pytest.mark.postgres)
        node_settings["database_url"] = request.getfixturevalue("clean_postgres_url")
    storage = tmp_path / "shared"
    first = start_node(storage, node=node_settings, background=False)
    with first.database.sessions.begin() as session:
        session.add_all([
            _association("recv-a", None, 1),  # recv-a died holding these two
            _association("recv-a", None, 2),
            _association("recv-a", "released", 3),
            _association("recv-b", None, 4),  # recv-b is alive and receiving
        ])  # fmt: skip
    first.stop()
    before = datetime.now(UTC)
    again = start_node(storage, node=node_settings, background=False)
    assert again.receiver.close_lost_associations() == 0  # done once, at start
    with again.database.sessions() as session:
        rows = {r.port: r for r in session.scalars(select(Association))}
    assert {p: rows[p].outcome for p in rows} == {1: LOST, 2: LOST, 3: "released", 4: None}
    assert all(rows[p].closed_at is not None and rows[p].closed_at >= before for p in (1, 2))
    assert rows[3].closed_at == T0 and rows[4].closed_at is None
