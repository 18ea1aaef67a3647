"""The index writes of the C-STORE path: duplicates, latest-wins attributes, the key cache.

Each test runs on SQLite through the sqlite3 driver (the fast path), on SQLite through
SQLAlchemy (the path PostgreSQL takes), and on PostgreSQL when it is installed.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import Engine, delete, func, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import DuplicatePolicy
from dicomnode.db import make_engine, make_session_factory, upgrade
from dicomnode.db.index import list_studies
from dicomnode.db.models import Instance, Patient, Series, Study
from dicomnode.db.writer import IndexWriter
from dicomnode.domain import InstanceHeader, Peer, StoredInstance
from dicomnode.errors import StoreFailed
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.receive.spool import Spool
from dicomnode.receive.store import InstanceStore

PEER = Peer(calling_aet="SCANNER", called_aet="DICOMNODE", host="127.0.0.1", port=4242)
OTHER_SERIES = "1.2.826.0.1.3680043.99.2"
OTHER_STUDY = "1.2.826.0.1.3680043.99.3"
_files = itertools.count()
MakeStore = Callable[..., InstanceStore]


@pytest.fixture(params=["sqlite", "sqlite-core", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Engine, bool]]:
    """An empty, migrated index, and whether writes go to the sqlite3 driver directly."""
    if request.param == "postgresql":
        request.applymarker(pytest.mark.postgres)
        engine = make_engine(request.getfixturevalue("postgres_url"))
        upgrade(engine)
        with engine.begin() as connection:
            connection.execute(
                text("truncate instances, series, studies, patients, associations cascade")
            )
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
        upgrade(engine)
    yield engine, request.param == "sqlite"
    engine.dispose()


@pytest.fixture
def engine(database: tuple[Engine, bool]) -> Engine:
    return database[0]


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def make_store(
    database: tuple[Engine, bool], sessions: sessionmaker[Session], tmp_path: Path
) -> MakeStore:
    spool = Spool(tmp_path / "storage")
    spool.prepare()

    def make(policy: str = "keep_first") -> InstanceStore:
        store = InstanceStore(
            spool, sessions, duplicate_policy=DuplicatePolicy(policy), min_free_bytes=0
        )
        store._index = IndexWriter(sqlite_driver=database[1])
        return store

    return make


def slices(count: int = 3, **spec: object) -> list[Dataset]:
    return list(ct_slices(SeriesSpec(slices=count, rows=8, columns=8, **spec)))  # type: ignore[arg-type]


def send(store: InstanceStore, ds: Dataset) -> StoredInstance:
    """What the receiver does: the dataset lands in incoming/, then store() takes it."""
    received = store.spool.incoming / f"received-{next(_files)}.dcm"
    ds.save_as(received, enforce_file_format=True)
    return store.store(
        received,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        peer=PEER,
        association_pk=None,
    )


def naive_utc(value: datetime) -> datetime:
    """SQLite gives back naive UTC, PostgreSQL aware values: compare them as naive UTC."""
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def counts(sessions: sessionmaker[Session]) -> tuple[int, ...]:
    with sessions() as session:
        return tuple(
            int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Patient, Study, Series, Instance)
        )


def instance(sessions: sessionmaker[Session], uid: str) -> tuple[Instance, Series, Study, Patient]:
    with sessions() as session:
        row = session.scalar(select(Instance).where(Instance.sop_instance_uid == uid))
        assert row is not None
        return row, row.series, row.series.study, row.series.study.patient


# -- one series ------------------------------------------------------------------------------------


def test_a_series_makes_one_row_each_and_tracks_receive_times(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    datasets = slices(4, seed=1)
    stored = []
    for ds in datasets:
        stored.append(send(store, ds))
        last = stored[-1].received_at
        _, series, study, _ = instance(sessions, ds.SOPInstanceUID)
        # accurate to the instance: every store moves both, in its own transaction
        assert naive_utc(series.last_received_at) == naive_utc(last)
        assert naive_utc(study.last_received_at) == naive_utc(last)
    assert counts(sessions) == (1, 1, 1, 4)
    row, series, study, patient = instance(sessions, datasets[2].SOPInstanceUID)
    assert row.path == stored[2].path == Spool.relative_path(stored[2].header)
    assert row.size_bytes == store.spool.path(row.path).stat().st_size == stored[2].size_bytes
    assert (row.instance_number, row.rows, row.columns) == (3, 8, 8)
    assert (row.calling_aet, row.calling_host) == ("SCANNER", "127.0.0.1")
    assert naive_utc(row.received_at) == naive_utc(stored[2].received_at)
    assert naive_utc(series.first_received_at) == naive_utc(stored[0].received_at)
    assert naive_utc(study.first_received_at) == naive_utc(stored[0].received_at)
    assert (patient.patient_id, patient.patient_name, series.modality) == (
        "PHANTOM-1",
        "Phantom^Chest",
        "CT",
    )
    with sessions() as session:
        (summary,) = list_studies(session)
    assert (summary.instance_count, summary.series_count, summary.modalities) == (4, 1, ("CT",))


# -- duplicates ------------------------------------------------------------------------------------


def test_keep_first_ignores_the_second_copy(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store("keep_first")
    (first,) = slices(1, seed=2, patient_name="First^Copy")
    (second,) = slices(1, seed=2, patient_name="Second^Copy")
    second.StudyDescription = second.SeriesDescription = "changed"
    kept = send(store, first)
    target = store.spool.path(kept.path)
    inode = target.stat().st_ino
    _, series_before, study_before, _ = instance(sessions, first.SOPInstanceUID)

    again = send(store, second)

    assert again.duplicate and not kept.duplicate
    assert (again.path, again.size_bytes) == (kept.path, kept.size_bytes)
    assert naive_utc(again.received_at) == naive_utc(kept.received_at)
    assert target.stat().st_ino == inode and dcmread(target).PatientName == "First^Copy"
    assert len(list(store.spool.incoming.iterdir())) == 1  # the copy is left to the caller
    row, series, study, patient = instance(sessions, first.SOPInstanceUID)
    assert patient.patient_name == "First^Copy"
    assert (study.study_description, series.series_description) == (
        "Generated study",
        "Generated CT",
    )
    assert naive_utc(row.received_at) == naive_utc(kept.received_at)
    assert series.last_received_at == series_before.last_received_at
    assert study.last_received_at == study_before.last_received_at
    assert counts(sessions) == (1, 1, 1, 1)


def test_replace_takes_the_second_copy(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store("replace")
    (first,) = slices(1, seed=3, patient_name="First^Copy")
    (second,) = slices(1, seed=3, patient_name="Second^Copy")
    kept = send(store, first)
    again = send(store, second)
    assert not again.duplicate and again.path == kept.path
    assert dcmread(store.spool.path(again.path)).PatientName == "Second^Copy"
    row, series, _study, patient = instance(sessions, first.SOPInstanceUID)
    assert patient.patient_name == "Second^Copy"
    assert naive_utc(row.received_at) == naive_utc(again.received_at)
    assert naive_utc(series.first_received_at) == naive_utc(kept.received_at)
    assert naive_utc(series.last_received_at) == naive_utc(again.received_at)
    assert counts(sessions) == (1, 1, 1, 1)
    assert not list(store.spool.incoming.iterdir())


def test_replace_into_another_series_and_study_moves_the_file(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store("replace")
    (first,) = slices(1, seed=4)
    (moved,) = slices(1, seed=4, series_uid=OTHER_SERIES, study_uid=OTHER_STUDY)
    moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    old = send(store, first)
    new = send(store, moved)
    assert new.path != old.path
    assert not store.spool.path(old.path).exists() and store.spool.path(new.path).exists()
    row, series, study, _ = instance(sessions, first.SOPInstanceUID)
    assert (row.path, series.series_instance_uid) == (new.path, OTHER_SERIES)
    assert study.study_instance_uid == OTHER_STUDY
    assert counts(sessions) == (1, 2, 2, 1)  # the old series stays, empty


# -- latest wins -----------------------------------------------------------------------------------


def test_a_correction_updates_demographics_and_attributes(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    first, second, third = slices(3, seed=5, patient_name="Doe^Jon")
    send(store, first)
    second.PatientName, second.PatientSex, second.PatientBirthDate = "Doe^John", "M", "19600202"
    second.StudyDescription, second.AccessionNumber = "Chest CT", "ACC2"
    second.SeriesDescription, second.SeriesNumber, second.BodyPartExamined = "Axial", 7, "CHEST"
    send(store, second)
    _, series, study, patient = instance(sessions, first.SOPInstanceUID)
    assert (patient.patient_name, patient.sex, patient.birth_date) == ("Doe^John", "M", "19600202")
    assert (study.study_description, study.accession_number) == ("Chest CT", "ACC2")
    assert (series.series_description, series.series_number, series.body_part_examined) == (
        "Axial",
        7,
        "CHEST",
    )
    send(store, third)  # the old values again: the latest instance wins
    _, series, study, patient = instance(sessions, first.SOPInstanceUID)
    assert (patient.patient_name, patient.sex, patient.birth_date) == ("Doe^Jon", "O", "19700101")
    assert (study.study_description, series.series_description) == (
        "Generated study",
        "Generated CT",
    )
    assert counts(sessions) == (1, 1, 1, 3)


def test_a_corrected_patient_id_repoints_the_study(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    first, second = slices(2, seed=6, patient_id="WRONG-1")
    send(store, first)
    second.PatientID = "RIGHT-1"
    send(store, second)
    _, _, _study, patient = instance(sessions, first.SOPInstanceUID)
    assert patient.patient_id == "RIGHT-1"
    with sessions() as session:
        ids = session.scalars(select(Patient.patient_id).order_by(Patient.id)).all()
    assert ids == ["WRONG-1", "RIGHT-1"]  # the old patient row stays, without studies
    assert counts(sessions) == (2, 1, 1, 2)


def test_an_instance_naming_another_study_keeps_its_series_where_it_was(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    first, second = slices(2, seed=7)
    send(store, first)
    second.StudyInstanceUID = OTHER_STUDY
    send(store, second)
    _, _series, study, _ = instance(sessions, second.SOPInstanceUID)
    assert study.study_instance_uid == first.StudyInstanceUID  # as before: placed by the first
    assert counts(sessions) == (1, 2, 1, 2)


# -- the key cache against other writers --------------------------------------------------------


def test_rows_deleted_by_another_session_are_recreated(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    datasets = slices(3, seed=8)
    send(store, datasets[0])
    with sessions.begin() as session:
        for model in (Instance, Series, Study, Patient):
            session.execute(delete(model))
    send(store, datasets[1])
    assert counts(sessions) == (1, 1, 1, 1)
    send(store, datasets[2])
    assert counts(sessions) == (1, 1, 1, 2)
    _, series, study, patient = instance(sessions, datasets[2].SOPInstanceUID)
    assert series.series_instance_uid == datasets[0].SeriesInstanceUID
    assert (study.study_instance_uid, patient.patient_id) == (
        datasets[0].StudyInstanceUID,
        "PHANTOM-1",
    )


def test_a_cached_pk_taken_by_another_row_is_not_written(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    first, second = slices(2, seed=9)
    send(store, first)
    _, series, study, patient = instance(sessions, first.SOPInstanceUID)
    now = datetime.now(UTC)
    with sessions.begin() as session:  # the same pks now name other rows
        session.execute(delete(Instance))
        session.execute(delete(Series))
        session.execute(delete(Study))
        session.execute(
            update(Patient).where(Patient.id == patient.id).values(patient_id="SOMEONE-ELSE")
        )
        session.execute(
            insert(Study).values(
                id=study.id,
                study_instance_uid=OTHER_STUDY,
                patient_pk=patient.id,
                study_date="",
                study_time="",
                study_id="",
                accession_number="",
                study_description="theirs",
                referring_physician_name="",
                first_received_at=now,
                last_received_at=now,
            )
        )
        session.execute(
            insert(Series).values(
                id=series.id,
                series_instance_uid=OTHER_SERIES,
                study_pk=study.id,
                modality="MR",
                series_number=1,
                series_description="theirs",
                body_part_examined="",
                frame_of_reference_uid="",
                first_received_at=now,
                last_received_at=now,
            )
        )
    send(store, second)
    _row, series2, study2, patient2 = instance(sessions, second.SOPInstanceUID)
    assert series2.series_instance_uid == second.SeriesInstanceUID and series2.id != series.id
    assert study2.study_instance_uid == second.StudyInstanceUID and study2.id != study.id
    assert patient2.patient_id == "PHANTOM-1" and patient2.id != patient.id
    with sessions() as session:
        theirs = session.scalar(select(Series).where(Series.id == series.id))
        assert theirs is not None
        assert (theirs.series_instance_uid, theirs.modality) == (OTHER_SERIES, "MR")
        assert naive_utc(theirs.last_received_at) == naive_utc(now)
        their_study = session.get(Study, study.id)
        assert their_study is not None and their_study.study_description == "theirs"
        assert session.get(Patient, patient.id).patient_id == "SOMEONE-ELSE"  # type: ignore[union-attr]


def test_a_patient_row_rekeyed_by_another_session_is_not_taken_for_ours(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    first, second = slices(2, seed=18)
    send(store, first)
    with sessions.begin() as session:  # say, a merge tool gave the row another patient ID
        session.execute(update(Patient).values(patient_id="MERGED-1"))
    send(store, second)
    _, _, _study, patient = instance(sessions, second.SOPInstanceUID)
    assert patient.patient_id == "PHANTOM-1"
    with sessions() as session:
        assert session.scalars(select(Patient.patient_id).order_by(Patient.id)).all() == [
            "MERGED-1",
            "PHANTOM-1",
        ]


def test_changes_by_another_process_are_overwritten_by_the_next_instance(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    first, second = slices(2, seed=10)
    send(store, first)
    _, _, study, patient = instance(sessions, first.SOPInstanceUID)
    with sessions.begin() as session:  # another node host took a corrected instance meanwhile
        session.execute(update(Patient).values(patient_name="Other^Name", sex="F"))
        session.execute(update(Study).values(study_description="other"))
        session.execute(update(Series).values(series_description="other"))
        other = Patient(
            patient_id="OTHER-1", issuer_of_patient_id="", patient_name="", birth_date="", sex=""
        )
        session.add(other)
        session.flush()
        session.execute(update(Study).values(patient_pk=other.id))
    send(store, second)  # ... and now this one is the latest
    _, series, study, patient = instance(sessions, second.SOPInstanceUID)
    assert (patient.patient_id, patient.patient_name, patient.sex) == (
        "PHANTOM-1",
        "Phantom^Chest",
        "O",
    )
    assert (study.study_description, series.series_description) == (
        "Generated study",
        "Generated CT",
    )


def test_two_writers_with_their_own_caches_take_turns(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    """Two processes on one database: each sees what the other wrote."""
    one, two = make_store(), make_store()
    datasets = slices(6, seed=11)
    for number, ds in enumerate(datasets):
        ds.PatientName = f"Name^{number}"
        ds.SeriesDescription = f"description {number}"
        send((one, two)[number % 2], ds)
        _, series, _, patient = instance(sessions, ds.SOPInstanceUID)
        assert (patient.patient_name, series.series_description) == (
            f"Name^{number}",
            f"description {number}",
        )
    assert counts(sessions) == (1, 1, 1, 6)


def test_a_small_cache_forgets_and_stays_correct(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    store._index.max_entries = 1
    a, b = slices(3, seed=12), slices(3, seed=13, patient_id="PHANTOM-2")
    for ds in itertools.chain.from_iterable(zip(a, b, strict=True)):
        send(store, ds)
    assert counts(sessions) == (2, 2, 2, 6)


def test_a_failed_store_rolls_back_and_the_next_one_succeeds(
    make_store: MakeStore, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    first, second = slices(2, seed=14)

    def broken(*_args: object, **_kwargs: object) -> Path:
        raise RuntimeError("disk went away")

    original = store.spool.place
    monkeypatch.setattr(store.spool, "place", broken)
    with pytest.raises(RuntimeError):
        send(store, first)
    monkeypatch.setattr(store.spool, "place", original)
    assert counts(sessions) == (0, 0, 0, 0)
    send(store, second)
    assert counts(sessions) == (1, 1, 1, 1)


def test_an_index_error_refuses_the_instance_and_the_next_one_is_stored(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    store = make_store()
    first, second = slices(2, seed=19)
    received = store.spool.incoming / "bad-association.dcm"
    first.save_as(received, enforce_file_format=True)
    with pytest.raises(StoreFailed, match="IntegrityError"):
        store.store(
            received,
            sop_class_uid=str(first.SOPClassUID),
            sop_instance_uid=str(first.SOPInstanceUID),
            transfer_syntax=str(first.file_meta.TransferSyntaxUID),
            peer=PEER,
            association_pk=123456,  # no such association: the foreign key refuses it
        )
    assert counts(sessions) == (0, 0, 0, 0)
    send(store, second)
    assert counts(sessions) == (1, 1, 1, 1)


def test_last_received_at_never_moves_back(
    database: tuple[Engine, bool], sessions: sessionmaker[Session]
) -> None:
    """Writers that race may commit an older receive time after a newer one."""
    engine, sqlite_driver = database
    writer = IndexWriter(sqlite_driver=sqlite_driver)
    header = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.826.0.1.3680043.99.20",
        study_instance_uid=OTHER_STUDY,
        series_instance_uid=OTHER_SERIES,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    newer = datetime(2026, 11, 21, 10, 0, 0, 500000, tzinfo=UTC)
    older = datetime(2026, 11, 21, 9, 59, 59, 900000, tzinfo=UTC)
    for number, received in enumerate((newer, older)):
        with writer.transaction(engine) as writes:
            uid = f"{header.sop_instance_uid}.{number}"
            writes.record(
                replace(header, sop_instance_uid=uid),
                path=f"spool/{number}.dcm",
                size_bytes=1,
                peer=PEER,
                association_pk=None,
                received_at=received,
                existing=writes.lookup(uid),
            )
    with sessions() as session:
        study = session.scalar(select(Study))
        series = session.scalar(select(Series))
        assert study is not None and series is not None
        assert naive_utc(study.last_received_at) == naive_utc(newer)
        assert naive_utc(series.last_received_at) == naive_utc(newer)
        assert naive_utc(series.first_received_at) == naive_utc(newer)


# -- threads --------------------------------------------------------------------------------------


def test_associations_in_threads_into_the_same_and_other_series(
    make_store: MakeStore, sessions: sessionmaker[Session]
) -> None:
    one, two = make_store(), make_store()  # two stores: like two processes on one database
    shared = slices(24, seed=15)
    work = [
        (one, shared[0::4]),
        (one, shared[1::4]),
        (two, shared[2::4]),
        (two, shared[3::4]),
        (one, slices(6, seed=16)),
        (two, slices(6, seed=17, patient_id="PHANTOM-3")),
    ]
    errors: list[BaseException] = []

    def association(store: InstanceStore, datasets: list[Dataset]) -> None:
        try:
            for ds in datasets:
                assert not send(store, ds).duplicate
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=association, args=job) for job in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert counts(sessions) == (2, 3, 3, 36)
    with sessions() as session:
        assert sorted(s.instance_count for s in list_studies(session)) == [6, 6, 24]
        series = session.scalars(select(Series)).all()
        instances = session.scalars(select(Instance)).all()
    for row in series:  # last_received_at is the newest instance of each series
        newest = max(i.received_at for i in instances if i.series_pk == row.id)
        assert naive_utc(row.last_received_at) == naive_utc(newest)


# -- the SQLAlchemy path for callers with their own session ---------------------------------------


def _record(session: Session, header: InstanceHeader, **values: object) -> int:
    """Write through a caller's session, as InstanceStore does for a factory with no engine."""
    writes = IndexWriter().on(session.connection())
    existing = writes.lookup(header.sop_instance_uid)
    return writes.record(header, existing=existing, **values)  # type: ignore[arg-type]


def test_writes_in_the_callers_session(sessions: sessionmaker[Session]) -> None:
    header = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.826.0.1.3680043.99.10",
        study_instance_uid=OTHER_STUDY,
        series_instance_uid=OTHER_SERIES,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="P1",
        modality="CT",
    )
    received = datetime.now(UTC)
    with sessions.begin() as session:
        pk = _record(
            session,
            header,
            path="spool/x.dcm",
            size_bytes=10,
            peer=PEER,
            association_pk=None,
            received_at=received,
        )
    with sessions.begin() as session:  # again: an update of the same row
        assert pk == _record(
            session,
            header,
            path="spool/y.dcm",
            size_bytes=11,
            peer=PEER,
            association_pk=None,
            received_at=received,
        )
    row, _, _, patient = instance(sessions, header.sop_instance_uid)
    assert (row.id, row.path, row.size_bytes, patient.patient_id) == (pk, "spool/y.dcm", 11, "P1")
