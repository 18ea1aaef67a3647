"""Engine and session factory; SQLite is tuned for durable, concurrent writes."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; for SQLite, WAL with full sync so a commit survives power loss."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
            **kwargs,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # Take the write lock up front: a deferred transaction that reads and then writes can fail
    # with "database is locked" at once, without waiting, when another writer got in between.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def rowcount(session: Session, statement: Executable) -> int:
    """Run an UPDATE or DELETE in ``session``; the number of rows it matched.

    ``Session.execute`` is typed to return a ``Result``; for a Core DML statement it is the
    ``CursorResult`` that carries ``rowcount``.
    """
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def insert_unless_present(
    session: Session, table: Table, values: dict[str, Any], unique: list[str]
) -> bool:
    """INSERT a row unless one with the same ``unique`` columns exists; True when inserted.

    Concurrent processes inserting the same key do not fail each other: on PostgreSQL and SQLite
    with ``ON CONFLICT DO NOTHING`` (PostgreSQL waits for the other writer's commit), elsewhere
    with a savepoint that catches the duplicate.
    """
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        module = postgresql if dialect == "postgresql" else sqlite
        statement = (
            module.insert(table)
            .values(**values)
            .on_conflict_do_nothing(index_elements=unique)
            .returning(*(table.c[name] for name in unique))
        )
        return session.execute(statement).first() is not None
    try:
        with session.begin_nested():
            session.execute(table.insert().values(**values))
        return True
    except IntegrityError:
        return False
