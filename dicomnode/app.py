"""Wiring: builds the node's parts from settings. Entry points (CLI, tests) use this."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import make_engine, make_session_factory, upgrade
from dicomnode.db.migrate import current_revision, head_revision
from dicomnode.errors import DatabaseError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]


def open_database(settings: Settings, *, migrate: bool) -> Database:
    """Connect, and bring the schema up to date when asked (else insist it already is)."""
    settings.node.storage_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    engine = make_engine(settings.node.resolved_database_url)
    try:
        if migrate:
            upgrade(engine)
        elif current_revision(engine) != head_revision():
            raise DatabaseError("the database schema is not current: run `dicomnode db upgrade`")
    except DatabaseError:
        raise
    except Exception as exc:
        raise DatabaseError(
            f"database {engine.url.render_as_string(hide_password=True)} could not be opened: {exc}"
        ) from exc
    return Database(engine, make_session_factory(engine))


def restrict_new_files() -> None:
    """Spool files and the SQLite database hold patient data: no access for others."""
    os.umask(0o027)
