from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect

from dicomnode.db import make_engine, upgrade
from dicomnode.db.migrate import current_revision, head_revision
from dicomnode.db.models import Base


def test_migrations_build_the_models_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)
    for name, table in Base.metadata.tables.items():
        columns = {c["name"] for c in inspect(engine).get_columns(name)}
        assert columns == {c.name for c in table.columns}, name
    upgrade(engine)  # a second upgrade is a no-op
    assert current_revision(engine) == head_revision()


def test_head_revision_is_alembics_head() -> None:
    """The quick reading of the scripts agrees with Alembic's own."""
    from alembic.script import ScriptDirectory

    from dicomnode.db.migrate import _config

    assert head_revision() == ScriptDirectory.from_config(_config("sqlite://")).get_current_head()
