"""Prepared statements run in one transaction, through SQLAlchemy or, on SQLite, on the sqlite3
connection itself: a small DB-API executor for the index's hot write path
(:mod:`dicomnode.db.writer`), where SQLAlchemy's per-statement work costs more than SQLite's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Dialect, Engine, Executable, ReturnsRows
from sqlalchemy.exc import DBAPIError


class Executor(Protocol):
    """Runs the prepared statements in one open transaction."""

    dialect: str

    def first(self, statement: Executable, params: dict[str, Any]) -> Sequence[Any] | None: ...

    def rowcount(self, statement: Executable, params: dict[str, Any]) -> int: ...

    def insert(self, statement: Executable, params: dict[str, Any]) -> int: ...


class CoreExecutor:
    """Statements through an SQLAlchemy Connection (PostgreSQL, or a caller's Session)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect.name

    def first(self, statement: Executable, params: dict[str, Any]) -> Sequence[Any] | None:
        return self.connection.execute(statement, params).first()

    def rowcount(self, statement: Executable, params: dict[str, Any]) -> int:
        return self.connection.execute(statement, params).rowcount

    def insert(self, statement: Executable, params: dict[str, Any]) -> int:
        key = self.connection.execute(statement, params).inserted_primary_key
        assert key is not None, "an INSERT"  # None only for other statements
        return int(key[0])


@dataclass(frozen=True)
class CompiledStatement:
    """A statement compiled once for a positional DBAPI: its SQL and how to bind and read it."""

    sql: str
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    results: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def of(cls, statement: Executable, dialect: Dialect) -> CompiledStatement:
        # the index's SELECT, INSERT and UPDATE statements: clause elements with their columns
        assert isinstance(statement, ReturnsRows), "a SELECT or a DML statement"
        compiled = statement.compile(dialect=dialect)
        assert compiled.positional and compiled.positiontup is not None, (
            "only for a positional paramstyle"
        )
        binds = tuple(
            (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in compiled.positiontup
        )
        results = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.exported_columns
        )
        return cls(compiled.string, binds, results)

    def args(self, params: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            params[name] if process is None else process(params[name])
            for name, process in self.binds
        )


class SQLiteExecutor:
    """The same statements, compiled once by SQLAlchemy, on the pooled sqlite3 connection:
    SQLAlchemy's per-statement machinery costs ~40 us, several times SQLite's own work."""

    dialect = "sqlite"

    def __init__(
        self, cursor: Any, compiled: dict[int, CompiledStatement], dialect: Dialect
    ) -> None:
        self.cursor = cursor
        self._compiled = compiled
        self._dialect = dialect

    def _run(self, statement: Executable, params: dict[str, Any]) -> CompiledStatement:
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            compiled = self._compiled[id(statement)] = CompiledStatement.of(
                statement, self._dialect
            )
        self.cursor.execute(compiled.sql, compiled.args(params))
        return compiled

    def first(self, statement: Executable, params: dict[str, Any]) -> Sequence[Any] | None:
        compiled = self._run(statement, params)
        rows = self.cursor.fetchall()  # to the end, so a RETURNING statement completes
        if not rows:
            return None
        return tuple(
            value if process is None else process(value)
            for value, process in zip(rows[0], compiled.results, strict=True)
        )

    def rowcount(self, statement: Executable, params: dict[str, Any]) -> int:
        self._run(statement, params)
        return int(self.cursor.rowcount)

    def insert(self, statement: Executable, params: dict[str, Any]) -> int:
        self._run(statement, params)
        return int(self.cursor.lastrowid)


def rollback(raw: Any) -> None:
    try:
        raw.rollback()
    except Exception:
        raw.invalidate()  # the pool drops it rather than hand out a broken connection


def uses_sqlite3(engine: Engine) -> bool:
    """Whether ``engine`` is SQLite through the standard library's sqlite3 driver."""
    return engine.dialect.name == "sqlite" and engine.dialect.driver == "pysqlite"


@contextmanager
def sqlite_transaction(
    engine: Engine, compiled: dict[int, CompiledStatement]
) -> Iterator[SQLiteExecutor]:
    """One transaction on a pooled sqlite3 connection, committed on leaving the block, rolled
    back on an exception; sqlite3's errors are raised as SQLAlchemy raises them
    (IntegrityError, OperationalError...). ``compiled`` caches the statements' SQL by id.

    The write lock is taken at once (BEGIN IMMEDIATE, as dicomnode.db.session does); the
    connection's pragmas (WAL, synchronous=FULL) make the commit durable.
    """
    dialect = engine.dialect
    error = dialect.loaded_dbapi.Error
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            yield SQLiteExecutor(cursor, compiled, dialect)
            cursor.execute("COMMIT")  # as explicit as the BEGIN, whatever the driver's mode
        except BaseException:
            rollback(raw)
            raise
        finally:
            cursor.close()
    except error as exc:
        raise DBAPIError.instance(None, None, exc, error, dialect=dialect) from exc
    finally:
        raw.close()  # back to the pool
