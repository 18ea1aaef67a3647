"""Hostile input against a running ``dicomnode serve``: a fuzzer on the dataset side, hostile
association attempts, and load; the node must refuse each cleanly, keep serving a good sender,
and keep its memory bounded."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomnode.errors import DatasetTooLarge
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.bombs import bomb
from dicomnode.testing.fuzz import (
    ATTEMPTS,
    SYNTAXES,
    Mutation,
    Tally,
    fuzz_association,
    hostile_attempt,
    mutations,
    send_mutation,
    stored_bytes,
)
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.rawstore import AssociationRefused, RawAssociation
from dicomnode.testing.waiting import wait_until
from dicomnode.testing.watch import watch

pytestmark = pytest.mark.slow

#: how many malformed datasets the fuzzer sends (the issue asks for at least 1,000 inputs)
FUZZ_EXAMPLES = int(os.environ.get("DICOMNODE_FUZZ_EXAMPLES", "1000"))
ASSOCIATION_ATTEMPTS = int(os.environ.get("DICOMNODE_HOSTILE_ASSOCIATIONS", "300"))
#: the receiver's memory bound under attack (the receive benchmark's target for 1000 slices)
MAX_RSS_MB = 300
ALLOWED = ["RAW", "STORESCU", "ECHOSCU", "GOOD"]


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The real ``serve`` in a child process (its own memory), receiving only: no workers."""
    process = ServeProcess(tmp_path_factory.mktemp("hostile") / "node")
    process.env["DICOMNODE_WORKERS"] = "[]"
    process.env["DICOMNODE_SECURITY__ALLOWED_CALLING_AETS"] = json.dumps(ALLOWED)
    # every sender here is 127.0.0.1: eight at once, the good sender and the fuzzer's own
    process.env["DICOMNODE_NODE__MAX_ASSOCIATIONS_PER_HOST"] = "16"
    process.env["DICOMNODE_NODE__MAX_ASSOCIATIONS_PER_AET"] = "16"
    process.start()
    yield process
    process.stop()


def _alive(node: ServeProcess) -> None:
    assert node.process is not None and node.process.poll() is None, "the node died"
    assert peers.echoscu(node.port).returncode == 0, "the node no longer answers C-ECHO"


def test_fuzzed_datasets_are_refused_or_stored_exactly(hostile_node: ServeProcess) -> None:
    tally = Tally()
    lookup = stored_bytes(hostile_node.storage)
    sent = {"n": 0}
    association: list[RawAssociation] = []

    def connection() -> RawAssociation:
        if not association:
            association.append(fuzz_association("127.0.0.1", hostile_node.port))
        return association[0]

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutation=mutations())
    def one(mutation: Mutation) -> None:
        sent["n"] += 1
        try:
            outcome = send_mutation(connection(), mutation, sent["n"], lookup)
        except (ConnectionError, OSError) as exc:
            association.clear()
            raise AssertionError(f"{mutation}: the node hung up instead of answering") from exc
        tally.add(f"{mutation.kind}/{mutation.syntax}", outcome)

    with watch(hostile_node.pid, hostile_node.port) as seen:
        one()
    for assoc in association:
        assoc.release()
    _alive(hostile_node)
    assert tally.total >= FUZZ_EXAMPLES
    assert tally.count("refused") > FUZZ_EXAMPLES // 2, tally.by_kind
    for syntax in SYNTAXES:  # every syntax was tried, and some of each refused
        assert any(k.endswith(syntax) and v.get("refused") for k, v in tally.by_kind.items())
    print(json.dumps(tally.by_kind, sort_keys=True))
    assert not seen.good_failures and seen.good_sent > 0, seen.good_failures
    assert seen.peak_rss_mb < MAX_RSS_MB, f"peak RSS {seen.peak_rss_mb:.0f} MB"


def test_hostile_associations_are_refused(hostile_node: ServeProcess) -> None:
    rng = random.Random(9)
    tally = Tally()
    with watch(hostile_node.pid, hostile_node.port) as seen:
        for index in range(ASSOCIATION_ATTEMPTS):
            kind = ATTEMPTS[index % len(ATTEMPTS)]
            tally.add(kind, hostile_attempt(kind, hostile_node.port, rng))
    _alive(hostile_node)
    for kind in ("unknown-calling-ae", "wrong-called-ae", "wrong-context"):
        assert tally.by_kind[kind] == {"rejected": tally.by_kind[kind]["rejected"]}, tally.by_kind
    for kind in ("garbage", "truncated-rq", "absurd-pdu-length"):
        assert set(tally.by_kind[kind]) <= {"closed", "aborted", "rejected"}, tally.by_kind
    with pytest.raises(AssociationRefused):  # and a refused AE stores nothing, ever
        RawAssociation("127.0.0.1", hostile_node.port, calling="INTRUDER")
    assert not seen.good_failures and seen.good_sent > 0, seen.good_failures
    assert seen.peak_rss_mb < MAX_RSS_MB, f"peak RSS {seen.peak_rss_mb:.0f} MB"


def test_eight_senders_at_once_lose_nothing(hostile_node: ServeProcess, tmp_path: Path) -> None:
    senders, each = 8, 200
    folders = []
    for sender in range(senders):
        spec = SeriesSpec(slices=each, rows=128, columns=128, seed=20_000 + sender)
        folders.append(write_series(ct_slices(spec), tmp_path / f"sender{sender}"))
    lookup = stored_bytes(hostile_node.storage)
    with ThreadPoolExecutor(senders) as pool:
        results = list(
            pool.map(lambda files: peers.storescu(hostile_node.port, files, timeout=600), folders)
        )
    failures = [r.stderr[-300:] for r in results if r.returncode != 0]
    assert not failures, failures
    for files in folders:
        for path in files:
            assert lookup(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)) is not None
    _alive(hostile_node)


#: deflate bombs by their size on the wire: each inflates about 1,000 times
BOMBS_MB = (1, 12)


@pytest.mark.parametrize("wire_mb", BOMBS_MB, ids=lambda mb: f"{mb}MB-on-the-wire")
def test_deflate_bomb_is_refused_with_memory_bounded(
    hostile_node: ServeProcess, wire_mb: int
) -> None:
    attack = bomb(wire_mb << 30)
    assert abs(len(attack.payload) / 2**20 - wire_mb) < wire_mb * 0.1 + 0.1
    incoming = hostile_node.storage / "incoming"
    with watch(hostile_node.pid, hostile_node.port) as seen:
        with RawAssociation(
            "127.0.0.1",
            hostile_node.port,
            calling="RAW",
            transfer_syntax=DeflatedExplicitVRLittleEndian,
            fragment=1 << 20,
        ) as association:
            status = association.store(attack.payload, attack.sop_instance_uid)
        wait_until(lambda: seen.good_sent >= 2, timeout=60, what="a good sender alongside")
    assert status == DatasetTooLarge.dicom_status, hex(status)
    assert stored_bytes(hostile_node.storage)(attack.sop_instance_uid) is None
    assert not [p for p in incoming.rglob("*") if p.is_file()], "nothing is left in transit"
    _alive(hostile_node)
    assert not seen.good_failures and seen.good_sent > 0, seen.good_failures
    assert seen.peak_rss_mb < MAX_RSS_MB, f"peak RSS {seen.peak_rss_mb:.0f} MB"


def test_deflated_padding_under_the_limit_is_stored_and_read_bounded(
    hostile_node: ServeProcess,
) -> None:
    """256 MB of zeros in 256 kB: stored inflated, and the intake's read of it stays small."""
    padded = bomb(256 << 20, seed=2)
    with watch(hostile_node.pid, hostile_node.port) as seen:
        with RawAssociation(
            "127.0.0.1",
            hostile_node.port,
            calling="RAW",
            transfer_syntax=DeflatedExplicitVRLittleEndian,
        ) as association:
            status = association.store(padded.payload, padded.sop_instance_uid)
        assert status == 0x0000, hex(status)
        path = _stored_path(hostile_node, padded.sop_instance_uid)
        wait_until(lambda: seen.good_sent >= 2, timeout=60, what="a good sender alongside")
    stored = dcmread(path, stop_before_pixels=True, defer_size=1 << 20)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    _alive(hostile_node)
    assert not seen.good_failures, seen.good_failures
    assert seen.peak_rss_mb < MAX_RSS_MB, f"peak RSS {seen.peak_rss_mb:.0f} MB"


def _stored_path(node: ServeProcess, sop_instance_uid: str) -> Path:
    uri = f"file:{node.storage / 'dicomnode.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        row = db.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
    assert row is not None, f"{sop_instance_uid} is not indexed"
    return node.storage / row[0]
