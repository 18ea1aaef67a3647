"""Concurrent stores (issue 15).

The same instance arriving at two receivers at once: the one that loses the race answers per
``duplicate_policy``, never "could not index the instance: IntegrityError", and the file in the
spool is the one the index row describes. Two InstanceStores on two engines stand for two
receiver processes (each has its own lock).

Group commit: instances that arrive while the writer works go in one transaction together; one
bad instance among them is refused alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import Engine, func, select, text

from dicomnode.config import DuplicatePolicy
from dicomnode.db import make_engine, make_session_factory, upgrade
from dicomnode.db import writer as index_writer
from dicomnode.db.models import Instance
from dicomnode.domain import Peer, StoredInstance
from dicomnode.errors import StoreFailed
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.receive.spool import Spool
from dicomnode.receive.store import InstanceStore
from dicomnode.testing.waiting import wait_until

PEER = Peer(calling_aet="SCANNER", called_aet="DICOMNODE", host="127.0.0.1", port=4242)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        request.applymarker(pytest.mark.postgres)
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'index.db'}"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("delete from instances"))
    engine.dispose()
    yield url


def _copies() -> tuple[Dataset, Dataset]:
    """One instance twice, with different bytes (as two senders' copies may be)."""
    (first,) = ct_slices(SeriesSpec(slices=1, rows=8, columns=8, seed=41))
    (second,) = ct_slices(SeriesSpec(slices=1, rows=8, columns=8, seed=41))
    second.ImageComments = "the second receiver's copy, longer than the first"
    return first, second


def _race(
    url: str,
    storage: Path,
    policy: DuplicatePolicy,
    monkeypatch: pytest.MonkeyPatch,
    *,
    meet_after_lookup: bool,
) -> tuple[list[StoredInstance], list[Path], Engine]:
    """Both stores take their copy at once; with ``meet_after_lookup`` both have looked the
    instance up (and found nothing) before either writes, the race's worst case."""
    engines = [make_engine(url) for _ in range(2)]
    stores = [
        InstanceStore(
            Spool(storage, f"recv-{k}"),
            make_session_factory(engine),
            duplicate_policy=policy,
            min_free_bytes=0,
        )
        for k, engine in enumerate(engines)
    ]
    received = []
    for store, ds in zip(stores, _copies(), strict=True):
        store.spool.prepare()
        path = store.spool.new_incoming()
        ds.save_as(path, enforce_file_format=True)
        received.append(path)

    barrier = threading.Barrier(2)
    met = threading.local()
    lookup = index_writer.IndexWrites.lookup

    def lookup_then_meet(self: index_writer.IndexWrites, uid: str) -> object:
        found = lookup(self, uid)
        if meet_after_lookup and not getattr(met, "done", False):
            met.done = True  # only the first lookup of each: the retry must not wait
            barrier.wait(timeout=30)
        return found

    monkeypatch.setattr(index_writer.IndexWrites, "lookup", lookup_then_meet)
    start = threading.Barrier(2)
    results: list[StoredInstance | BaseException] = [RuntimeError("not run")] * 2

    def run(k: int) -> None:
        try:
            start.wait(timeout=30)
            ds = _copies()[k]
            results[k] = stores[k].store(
                received[k],
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                peer=PEER,
                association_pk=None,
            )
        except BaseException as exc:
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    engines[1].dispose()
    return [r for r in results if isinstance(r, StoredInstance)], received, engines[0]


def _indexed(engine: Engine) -> tuple[int, str, int]:
    with engine.connect() as connection:
        count = connection.scalar(select(func.count(Instance.id)))
        path, size = connection.execute(select(Instance.path, Instance.size_bytes)).one()
    return int(count or 0), path, size


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
def test_the_same_instance_at_two_receivers_at_once(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: DuplicatePolicy
) -> None:
    storage = tmp_path / "storage"
    # SQLite takes its write lock at BEGIN: the second lookup cannot run before the first
    # commits, so the stores only start together there.
    meet = database_url.startswith("postgresql")
    stored, received, engine = _race(database_url, storage, policy, monkeypatch,
                                     meet_after_lookup=meet)  # fmt: skip
    try:
        count, path, size = _indexed(engine)
    finally:
        engine.dispose()
    assert count == 1
    on_disk = storage.resolve() / path
    assert on_disk.stat().st_size == size
    # The file in place is the copy whose row was committed last, byte for byte.
    copies = {p.name: p for p in received if p.exists()}
    if policy is DuplicatePolicy.KEEP_FIRST:
        assert sorted(s.duplicate for s in stored) == [False, True]
        (winner,) = (k for k, s in enumerate(stored) if not s.duplicate)
        (loser,) = (k for k, s in enumerate(stored) if s.duplicate)
        assert stored[loser].path == stored[winner].path == path
        assert stored[loser].size_bytes == size
        assert received[loser].exists()  # left to the caller (the association removes it)
        assert not received[winner].exists()
        expected = _copies()[winner]
    else:
        assert not any(s.duplicate for s in stored)
        assert not copies  # both moved into place, one after the other
        assert all(s.path == path for s in stored)
        last = max(range(2), key=lambda k: stored[k].received_at)
        assert stored[last].size_bytes == size
        expected = _copies()[last]
    assert dcmread(on_disk).get("ImageComments") == expected.get("ImageComments")


def test_instances_arriving_together_are_committed_together(
    database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    policy = DuplicatePolicy.KEEP_FIRST
    store = InstanceStore(
        Spool(tmp_path / "storage", "recv"), sessions, duplicate_policy=policy, min_free_bytes=0
    )
    store.spool.prepare()
    datasets = list(ct_slices(SeriesSpec(slices=6, rows=8, columns=8, seed=43)))
    (again,) = ct_slices(SeriesSpec(slices=1, rows=8, columns=8, seed=43))  # slice 1, once more
    work = [(ds, None) for ds in datasets] + [(again, None), (datasets[0], 123456)]
    # 123456: no such association, the foreign key refuses that row (and so its batch at first)
    results: dict[int, StoredInstance | BaseException] = {}

    def send(k: int) -> None:
        ds, association_pk = work[k]
        received = store.spool.new_incoming()
        ds.save_as(received, enforce_file_format=True)
        try:
            results[k] = store.store(received, sop_class_uid=str(ds.SOPClassUID),
                                     sop_instance_uid=str(ds.SOPInstanceUID),
                                     transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                                     peer=PEER,
                                     association_pk=association_pk)  # fmt: skip
        except BaseException as exc:
            results[k] = exc

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(work) - 1)]
    with store._lock:  # the writer is busy: everyone queues behind it
        for thread in threads:
            thread.start()
        wait_until(lambda: len(store._queue) == len(threads), timeout=30, what="all queued")
    for thread in threads:
        thread.join(timeout=60)
    assert (store.transactions, store.written) == (1, len(threads))  # one COMMIT for them all
    assert sum(isinstance(r, StoredInstance) and r.duplicate for r in results.values()) == 1
    assert all(isinstance(r, StoredInstance) for r in results.values()), results

    # A bad instance in a batch: the batch falls back to one transaction each.
    results.clear()
    fresh = list(ct_slices(SeriesSpec(slices=3, rows=8, columns=8, seed=44)))
    work = [(ds, None) for ds in fresh] + [(datasets[0], 123456)]
    store.duplicate_policy = DuplicatePolicy.REPLACE  # so the bad one is written, and refused
    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(work))]
    with store._lock:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(store._queue) == len(threads), timeout=30, what="all queued")
    for thread in threads:
        thread.join(timeout=60)
    refused = results.pop(len(work) - 1)
    assert isinstance(refused, StoreFailed) and "IntegrityError" in str(refused)
    assert all(isinstance(r, StoredInstance) and not r.duplicate for r in results.values())
    with engine.connect() as connection:
        rows = connection.execute(select(Instance.path, Instance.size_bytes)).all()
    assert len(rows) == 6 + 3
    for path, size in rows:  # each row's file is in place, whole
        assert (store.spool.root / path).stat().st_size == size
    engine.dispose()
