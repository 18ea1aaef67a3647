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
from dicomnode.receive.server import Receiver
from dicomnode.receive.spool import Spool
from dicomnode.receive.store import InstanceStore

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


@dataclass
class Node:
    """The receiver with its spool and index, as ``dicomnode serve`` runs it."""

    settings: Settings
    database: Database
    spool: Spool
    store: InstanceStore
    receiver: Receiver

    def start(self) -> None:
        self.spool.prepare()
        self.receiver.start()

    def stop(self) -> None:
        self.receiver.stop()
        self.database.engine.dispose()


def build_node(settings: Settings) -> Node:
    """Open the database (migrating if configured) and wire the receiver; nothing listens yet."""
    database = open_database(settings, migrate=settings.node.auto_migrate)
    spool = Spool(settings.node.storage_dir)
    store = InstanceStore(
        spool,
        database.sessions,
        duplicate_policy=settings.node.duplicate_policy,
        min_free_bytes=settings.node.min_free_disk_mb * 2**20,
    )
    return Node(settings, database, spool, store, Receiver(settings, store, database.sessions))
