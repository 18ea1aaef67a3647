"""The C-STORE path's index writes: prepared SQLAlchemy Core statements and a small cache of row
keys, so an instance of a series seen before costs one lookup, two UPDATEs and one INSERT in its
transaction, with no ORM objects and no SELECT of the patient, study or series.

On SQLite (the default) the statements, compiled once by SQLAlchemy, run on the pooled sqlite3
connection itself (:mod:`dicomnode.db.executor`): SQLAlchemy's per-statement work cost more than
SQLite's own, and this path runs once per received instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Table,
    bindparam,
    case,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from dicomnode.db.executor import (
    CompiledStatement,
    CoreExecutor,
    Executor,
    sqlite_transaction,
    uses_sqlite3,
)
from dicomnode.db.models import Instance, Patient, Series, Study
from dicomnode.domain import InstanceHeader, Peer

PATIENTS = cast(Table, Patient.__table__)
STUDIES = cast(Table, Study.__table__)
SERIES = cast(Table, Series.__table__)
INSTANCES = cast(Table, Instance.__table__)


# -- the write path ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedInstance:
    """The index row of an instance, as the duplicate policy needs it."""

    pk: int
    path: str
    size_bytes: int
    received_at: datetime
    series_pk: int


_PATIENT_ATTRIBUTES = ("patient_name", "birth_date", "sex")
_STUDY_ATTRIBUTES = (
    "patient_pk",
    "study_date",
    "study_time",
    "study_id",
    "accession_number",
    "study_description",
    "referring_physician_name",
    "last_received_at",
)
_SERIES_ATTRIBUTES = (
    "modality",
    "series_number",
    "series_description",
    "body_part_examined",
    "frame_of_reference_uid",
    "last_received_at",
)
_INSTANCE_ATTRIBUTES = (
    "series_pk",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "number_of_frames",
    "rows",
    "columns",
    "path",
    "size_bytes",
    "association_pk",
    "calling_aet",
    "calling_host",
    "received_at",
)
_NEW_PATIENT = ("patient_id", "issuer_of_patient_id", *_PATIENT_ATTRIBUTES)
_NEW_STUDY = ("study_instance_uid", "first_received_at", *_STUDY_ATTRIBUTES)
_NEW_SERIES = ("series_instance_uid", "study_pk", "first_received_at", *_SERIES_ATTRIBUTES)
_NEW_INSTANCE = ("sop_instance_uid", *_INSTANCE_ATTRIBUTES)


def _set(table: Table, names: tuple[str, ...]) -> dict[str, Any]:
    """VALUES or SET binding each column to a parameter ``v_<column>`` (SQLAlchemy keeps the
    column's own name for itself)."""
    return {name: bindparam(f"v_{name}", type_=table.c[name].type) for name in names}


def _set_latest(table: Table, names: tuple[str, ...]) -> dict[str, Any]:
    """SET, but last_received_at never moves back: when writers race, the one committing last
    may have the older receive time (SQLite keeps these as fixed-width UTC text, in order)."""
    values = _set(table, names)
    column, new = table.c.last_received_at, values["last_received_at"]
    values["last_received_at"] = case((column > new, column), else_=new)
    return values


def _v(values: dict[str, Any]) -> dict[str, Any]:
    return {f"v_{name}": value for name, value in values.items()}


# Built once, so running one skips SQLAlchemy's statement construction.
_FIND_INSTANCE = select(
    INSTANCES.c.id,
    INSTANCES.c.path,
    INSTANCES.c.size_bytes,
    INSTANCES.c.received_at,
    INSTANCES.c.series_pk,
).where(INSTANCES.c.sop_instance_uid == bindparam("k_sop_instance_uid"))
_FIND_PATIENT = select(PATIENTS.c.id, *(PATIENTS.c[name] for name in _PATIENT_ATTRIBUTES)).where(
    PATIENTS.c.patient_id == bindparam("k_patient_id"),
    PATIENTS.c.issuer_of_patient_id == bindparam("k_issuer_of_patient_id"),
)
_FIND_STUDY = select(STUDIES.c.id).where(
    STUDIES.c.study_instance_uid == bindparam("k_study_instance_uid")
)
_FIND_SERIES = select(SERIES.c.id).where(
    SERIES.c.series_instance_uid == bindparam("k_series_instance_uid")
)
_UPDATE_PATIENT = (
    update(PATIENTS)
    .where(PATIENTS.c.id == bindparam("k_pk"))
    .values(_set(PATIENTS, _PATIENT_ATTRIBUTES))
)
_UPDATE_STUDY = (
    update(STUDIES)
    .where(STUDIES.c.id == bindparam("k_pk"))
    .values(_set_latest(STUDIES, _STUDY_ATTRIBUTES))
)
# The cached path. Cached pks are hints, so the UPDATE matches the UID too, and the patient row
# by its key and its current demographics: a row deleted, re-created under another pk, or
# changed elsewhere (a demographics correction) makes it match nothing, and the writer falls
# back to looking the rows up.
_UPDATE_STUDY_CHECKED = (
    update(STUDIES)
    .where(
        STUDIES.c.id == bindparam("k_pk"),
        STUDIES.c.study_instance_uid == bindparam("k_study_instance_uid"),
        select(PATIENTS.c.id)
        .where(
            PATIENTS.c.id == bindparam("v_patient_pk"),
            PATIENTS.c.patient_id == bindparam("k_patient_id"),
            PATIENTS.c.issuer_of_patient_id == bindparam("k_issuer_of_patient_id"),
            *(PATIENTS.c[name] == bindparam(f"k_{name}") for name in _PATIENT_ATTRIBUTES),
        )
        .exists(),
    )
    .values(_set_latest(STUDIES, _STUDY_ATTRIBUTES))
)
# Neither first_received_at nor the study change: the first instance placed the series.
_UPDATE_SERIES = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("k_pk"))
    .values(_set_latest(SERIES, _SERIES_ATTRIBUTES))
)
_UPDATE_SERIES_CHECKED = (
    update(SERIES)
    .where(
        SERIES.c.id == bindparam("k_pk"),
        SERIES.c.series_instance_uid == bindparam("k_series_instance_uid"),
    )
    .values(_set_latest(SERIES, _SERIES_ATTRIBUTES))
)
_INSERT_INSTANCE = insert(INSTANCES).values(_set(INSTANCES, _NEW_INSTANCE))
_UPDATE_INSTANCE = (
    update(INSTANCES)
    .where(INSTANCES.c.id == bindparam("k_pk"))
    .values(_set(INSTANCES, _INSTANCE_ATTRIBUTES))
)
_NEW_ROWS = {"patients": _NEW_PATIENT, "studies": _NEW_STUDY, "series": _NEW_SERIES}

# INSERT that returns the new pk, or no row when another writer inserted the same key first
# (PostgreSQL waits for that writer's commit), so concurrent processes do not fail each other.
_INSERT_OR_IGNORE: dict[str, Callable[[Table], Any]] = {
    "sqlite": lambda table: sqlite.insert(table).on_conflict_do_nothing(),
    "postgresql": lambda table: postgresql.insert(table).on_conflict_do_nothing(),
}
_INSERTS: dict[tuple[str, str], Executable] = {}


def _insert_row(dialect: str, table: Table) -> tuple[Executable, bool]:
    """The INSERT of a new patient, study or series; True when it may return no row."""
    statement = _INSERTS.get((dialect, table.name))
    if statement is None:
        make = _INSERT_OR_IGNORE.get(dialect)
        values = _set(table, _NEW_ROWS[table.name])
        if make is None:  # no INSERT .. ON CONFLICT: a concurrent insert fails the transaction
            statement = insert(table).values(values)
        else:
            statement = make(table).values(values).returning(table.c.id)
        _INSERTS[(dialect, table.name)] = statement
    return statement, dialect in _INSERT_OR_IGNORE


class IndexWriter:
    """Writes the rows of stored instances; one per process, shared by its threads.

    It remembers the pks of the patients, studies and series it wrote. These are hints only:
    every statement that uses one also checks the row's UIDs (see ``_UPDATE_STUDY_CHECKED``),
    so rows changed or removed by another process or session are noticed and looked up again.
    An instance of a series seen before then costs one lookup, two UPDATEs and one INSERT.
    """

    def __init__(self, *, max_entries: int = 10_000, sqlite_driver: bool = True) -> None:
        self.max_entries = max_entries
        #: Run SQLite's statements on the sqlite3 connection itself (False: through SQLAlchemy).
        self.sqlite_driver = sqlite_driver
        self.patients: dict[tuple[str, str], int] = {}
        self.studies: dict[str, int] = {}
        self.series: dict[str, int] = {}
        self._compiled: dict[int, CompiledStatement] = {}

    def forget(self) -> None:
        """Drop every cached key (after a rollback, say); the next writes look them up."""
        self.patients.clear()
        self.studies.clear()
        self.series.clear()

    def on(self, connection: Connection) -> IndexWrites:
        """Writes in a transaction the caller opened on ``connection`` and will commit."""
        return IndexWrites(self, CoreExecutor(connection))

    @contextmanager
    def transaction(self, engine: Engine) -> Iterator[IndexWrites]:
        """One transaction, committed on leaving the block, rolled back on an exception."""
        if not (self.sqlite_driver and uses_sqlite3(engine)):
            with engine.begin() as connection:
                yield self.on(connection)
            return
        with sqlite_transaction(engine, self._compiled) as executor:
            yield IndexWrites(self, executor)

    def remember(self, cache: dict[Any, int], key: Any, pk: int) -> None:
        if len(cache) >= self.max_entries:
            cache.clear()  # a long-running node sees endless series; old ones rarely come back
        cache[key] = pk


class IndexWrites:
    """The index writes of one transaction."""

    def __init__(self, writer: IndexWriter, executor: Executor) -> None:
        self.writer = writer
        self.executor = executor

    def lookup(self, sop_instance_uid: str) -> IndexedInstance | None:
        row = self.executor.first(_FIND_INSTANCE, {"k_sop_instance_uid": sop_instance_uid})
        return None if row is None else IndexedInstance(*row)

    def record(
        self,
        header: InstanceHeader,
        *,
        path: str,
        size_bytes: int,
        peer: Peer,
        association_pk: int | None,
        received_at: datetime,
        existing: IndexedInstance | None,
    ) -> int:
        """Write the rows for one instance; return its pk.

        ``existing`` is what :meth:`lookup` found for the instance in this same transaction.
        The latest instance wins for the patient's demographics and the study's and series'
        attributes; first_received_at is kept and last_received_at set to ``received_at``.
        """
        study_pk = self._study(header, received_at)
        values = {
            "series_pk": self._series(header, study_pk, received_at),
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "instance_number": header.instance_number,
            "number_of_frames": header.number_of_frames,
            "rows": header.rows,
            "columns": header.columns,
            "path": path,
            "size_bytes": size_bytes,
            "association_pk": association_pk,
            "calling_aet": peer.calling_aet,
            "calling_host": peer.host,
            "received_at": received_at,
        }
        replaced = existing is not None and self.executor.rowcount(
            _UPDATE_INSTANCE, {"k_pk": existing.pk, **_v(values)}
        )
        if existing is not None and replaced:
            return existing.pk
        values["sop_instance_uid"] = header.sop_instance_uid
        return self.executor.insert(_INSERT_INSTANCE, _v(values))

    def _study(self, header: InstanceHeader, now: datetime) -> int:
        writer, run = self.writer, self.executor
        patient_pk = writer.patients.get((header.patient_id, header.issuer_of_patient_id))
        study_pk = writer.studies.get(header.study_instance_uid)
        if patient_pk is not None and study_pk is not None:
            params = _v(_study_values(header, patient_pk, now))
            params.update(
                k_pk=study_pk,
                k_study_instance_uid=header.study_instance_uid,
                k_patient_id=header.patient_id,
                k_issuer_of_patient_id=header.issuer_of_patient_id,
                k_patient_name=header.patient_name,
                k_birth_date=header.patient_birth_date,
                k_sex=header.patient_sex,
            )
            if run.rowcount(_UPDATE_STUDY_CHECKED, params) == 1:
                return study_pk
        # The patient first: the study row refers to it.
        values = _study_values(header, self._patient(header), now)
        key = {"k_study_instance_uid": header.study_instance_uid}
        row = run.first(_FIND_STUDY, key)
        if row is None:
            new = {"study_instance_uid": header.study_instance_uid, "first_received_at": now}
            study_pk = self._insert(STUDIES, new, values, (_FIND_STUDY, key, _UPDATE_STUDY))
        else:
            study_pk = row[0]
            run.rowcount(_UPDATE_STUDY, {"k_pk": study_pk, **_v(values)})
        writer.remember(writer.studies, header.study_instance_uid, study_pk)
        return study_pk

    def _patient(self, header: InstanceHeader) -> int:
        demographics = {
            "patient_name": header.patient_name,
            "birth_date": header.patient_birth_date,
            "sex": header.patient_sex,
        }
        key = {
            "k_patient_id": header.patient_id,
            "k_issuer_of_patient_id": header.issuer_of_patient_id,
        }
        row = self.executor.first(_FIND_PATIENT, key)
        if row is None:
            new = {
                "patient_id": header.patient_id,
                "issuer_of_patient_id": header.issuer_of_patient_id,
            }
            pk = self._insert(PATIENTS, new, demographics, (_FIND_PATIENT, key, _UPDATE_PATIENT))
        else:
            pk = row[0]
            # The latest instance wins for demographics, as a PACS shows the latest correction.
            if tuple(row[1:]) != tuple(demographics.values()):
                self.executor.rowcount(_UPDATE_PATIENT, {"k_pk": pk, **_v(demographics)})
        self.writer.remember(
            self.writer.patients, (header.patient_id, header.issuer_of_patient_id), pk
        )
        return pk

    def _series(self, header: InstanceHeader, study_pk: int, now: datetime) -> int:
        writer, run = self.writer, self.executor
        uid = header.series_instance_uid
        values = {
            "modality": header.modality,
            "series_number": header.series_number,
            "series_description": header.series_description,
            "body_part_examined": header.body_part_examined,
            "frame_of_reference_uid": header.frame_of_reference_uid,
            "last_received_at": now,
        }
        series_pk = writer.series.get(uid)
        if series_pk is not None:
            params = {"k_pk": series_pk, "k_series_instance_uid": uid, **_v(values)}
            if run.rowcount(_UPDATE_SERIES_CHECKED, params) == 1:
                return series_pk
        key = {"k_series_instance_uid": uid}
        row = run.first(_FIND_SERIES, key)
        if row is None:
            new = {"series_instance_uid": uid, "study_pk": study_pk, "first_received_at": now}
            series_pk = self._insert(SERIES, new, values, (_FIND_SERIES, key, _UPDATE_SERIES))
        else:
            series_pk = row[0]
            run.rowcount(_UPDATE_SERIES, {"k_pk": series_pk, **_v(values)})
        writer.remember(writer.series, uid, series_pk)
        return series_pk

    def _insert(
        self,
        table: Table,
        new: dict[str, Any],
        values: dict[str, Any],
        found: tuple[Executable, dict[str, Any], Executable],
    ) -> int:
        """Insert a patient, study or series (``new``: the columns only a new row sets) and
        return its pk; if another writer inserted the same key meanwhile, update that row with
        ``values`` instead, as if it had been there (the latest instance wins)."""
        find, key, update = found
        statement, may_skip = _insert_row(self.executor.dialect, table)
        if not may_skip:
            return self.executor.insert(statement, _v({**new, **values}))
        inserted = self.executor.first(statement, _v({**new, **values}))
        if inserted is not None:
            return int(inserted[0])
        row = self.executor.first(find, key)
        if row is None:
            raise LookupError(f"a row of {table.name} vanished after a conflicting insert")
        self.executor.rowcount(update, {"k_pk": row[0], **_v(values)})
        return int(row[0])


def _study_values(header: InstanceHeader, patient_pk: int, now: datetime) -> dict[str, Any]:
    return {
        "patient_pk": patient_pk,  # the latest instance may correct the patient
        "study_date": header.study_date,
        "study_time": header.study_time,
        "study_id": header.study_id,
        "accession_number": header.accession_number,
        "study_description": header.study_description,
        "referring_physician_name": header.referring_physician_name,
        "last_received_at": now,
    }
