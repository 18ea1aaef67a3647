"""The same receiver, indexing into PostgreSQL (the multi-host setup)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from dicomnode.app import Node
from dicomnode.db.index import list_studies
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from tests.helpers import instance_count, port_of

pytestmark = pytest.mark.postgres


def test_receive_into_postgres(
    start_node: Callable[..., Node], clean_postgres_url: str, tmp_path: Path
) -> None:
    node = start_node(node={"database_url": clean_postgres_url})
    with node.database.engine.connect() as connection:
        assert connection.execute(text("select version()")).scalar().startswith("PostgreSQL")
    batches = [
        write_series(
            ct_slices(SeriesSpec(slices=15, rows=64, columns=64, seed=40 + s)), tmp_path / str(s)
        )
        for s in range(3)
    ]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda files: peers.storescu(port_of(node), files), batches))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert instance_count(node) == 45
    with node.database.sessions() as session:
        assert sorted(s.instance_count for s in list_studies(session)) == [15, 15, 15]
