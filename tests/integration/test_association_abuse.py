"""Abuse of the association layer (issue 16): one host holding every association with C-ECHO
keep-alives, connections that never associate, hostile bytes in command UIDs and AE titles,
a fault in our own code. The node refuses or ends each, logs why, and a real sender from
another address stores all the while.

Loopback has every 127.0.0.0/8 address on Linux: the attackers bind 127.0.0.2 and 127.0.0.3,
the legitimate dcmtk storescu comes from 127.0.0.1.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select as sql_select

from dicomnode.app import Node
from dicomnode.db.models import Association as AssociationRow
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.receive import pdu
from dicomnode.testing import peers
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.rawstore import RawAssociation, associate_rq, encode_dataset
from dicomnode.testing.waiting import wait_until
from tests.helpers import instance_count, port_of

StartNode = Callable[..., Node]
ATTACKER, OTHER_HOST = "127.0.0.2", "127.0.0.3"


def _actions(caplog: pytest.LogCaptureFixture, action: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "action", None) == action]


def _series(folder: Path, slices: int, seed: int) -> list[Path]:
    spec = SeriesSpec(slices=slices, rows=16, columns=16, seed=seed)
    return write_series(ct_slices(spec), folder)


def _associate(
    port: int, *, source: str = peers.LOOPBACK, calling: str = "HOLDER", store: bool = False
) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    if store:
        # the files' own syntax only: pynetdicom streams files as they are once any sender in
        # this process (dicomnode's) has turned its chunked sending on
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate(peers.LOOPBACK, port, ae_title="DICOMNODE", bind_address=(source, 0))


def _connect(port: int, source: str) -> socket.socket:
    return socket.create_connection((peers.LOOPBACK, port), timeout=10, source_address=(source, 0))


def _rejection(port: int, source: str, calling: str) -> tuple[int, int, int]:
    """The (result, source, reason) of the A-ASSOCIATE-RJ the node answers."""
    with _connect(port, source) as s:
        s.sendall(associate_rq(calling=calling))
        pdu_type, length = pdu.read_header(s)
        body = pdu.read_exact(s, length)
    assert pdu_type == pdu.ASSOCIATE_RJ, pdu_type
    return body[1], body[2], body[3]


def _stores(port: int, folder: Path, seed: int) -> None:
    files = _series(folder, 2, seed)
    sent = peers.storescu(port, files, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def _closed_by_node(sock: socket.socket) -> bool:
    """Whether the node has closed this connection (without blocking)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1 << 16) == b""
    except ConnectionError:
        return True


@pytest.fixture
def held() -> Iterator[list[Association]]:
    """Associations a test holds open; released (or found aborted) at its end."""
    associations: list[Association] = []
    yield associations
    for assoc in associations:
        if assoc.is_established:
            assoc.release()


# -- one host cannot take every association --------------------------------------------------


def test_one_host_holding_associations_leaves_room_for_a_real_sender(
    start_node: StartNode,
    held: list[Association],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = start_node()  # the defaults: 16 in all, 8 per host, 8 per calling AE title
    port = port_of(node)
    for k in range(20):  # more than max_associations, each kept alive by C-ECHO
        assoc = _associate(port, source=ATTACKER, calling="HOLDER" if k < 8 else f"EVIL{k}")
        if assoc.is_established:
            held.append(assoc)
        # else rejected (pynetdicom may see the connection close before it reads the RJ: the
        # A-ASSOCIATE-RJ itself is checked below on a raw socket)
    assert len(held) == 8
    assert all(assoc.send_c_echo().Status == 0 for assoc in held)
    assert _rejection(port, ATTACKER, "FRESH") == (2, 3, 2)  # transient, local limit exceeded
    rejected = _actions(caplog, "association_rejected")
    assert any("max_associations_per_host" in line for line in rejected), rejected
    # the same calling AE title from another host meets the per-AE limit
    assert _rejection(port, OTHER_HOST, "HOLDER") == (2, 3, 2)
    rejected = _actions(caplog, "association_rejected")
    assert any("'HOLDER'" in line and "max_associations_per_aet" in line for line in rejected)

    _stores(port, tmp_path / "good", seed=51)  # the real sender, while they hold theirs
    assert instance_count(node) == 2
    assert all(assoc.send_c_echo().Status == 0 for assoc in held)  # refusals disturbed nothing


# -- time limits: C-ECHO keeps nothing alive, and nothing lives for ever ----------------------


def _until_aborted(assoc: Association, traffic: Callable[[], object], timeout: float) -> float:
    """Send ``traffic`` every 0.2 s until the node ends the association; seconds it lived."""
    started = time.monotonic()
    wait_until(
        lambda: not assoc.is_established or traffic() is None,
        interval=0.2,
        timeout=timeout,
        what="the node to end the association",
    )
    return time.monotonic() - started


def test_echo_keepalives_do_not_hold_an_association(
    start_node: StartNode, held: list[Association], caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(node={"idle_timeout_s": 2})
    assoc = _associate(port_of(node))
    assert assoc.is_established
    held.append(assoc)
    lived = _until_aborted(assoc, assoc.send_c_echo, timeout=10)
    assert assoc.is_aborted
    assert 1.8 <= lived < 5, lived
    aborts = _actions(caplog, "association_abort")
    assert any("idle_timeout_s" in line and "C-ECHO does not count" in line for line in aborts)

    def closed_as_aborted() -> bool:
        with node.database.sessions() as session:
            rows = session.scalars(sql_select(AssociationRow)).all()
        return len(rows) == 1 and rows[0].outcome == "aborted" and rows[0].closed_at is not None

    wait_until(closed_as_aborted, timeout=10, what="the association closed in the index")


def test_stores_keep_an_association_past_the_idle_time(
    start_node: StartNode, held: list[Association], tmp_path: Path
) -> None:
    node = start_node(node={"idle_timeout_s": 2})
    files = iter(_series(tmp_path / "series", 30, seed=52))
    assoc = _associate(port_of(node), store=True)
    held.append(assoc)
    started, statuses = time.monotonic(), []
    while time.monotonic() - started < 4:  # twice the idle time, a store every 0.3 s
        statuses.append(assoc.send_c_store(next(files)).Status)
        wait_until(lambda: time.monotonic() - started >= 0.3 * len(statuses), interval=0.02)
    assert assoc.is_established and set(statuses) == {0}
    assert assoc.send_c_echo().Status == 0


def test_an_association_ends_after_its_lifetime_however_busy(
    start_node: StartNode, held: list[Association], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(node={"max_association_s": 3, "idle_timeout_s": 0})
    files = iter(_series(tmp_path / "series", 60, seed=53))
    assoc = _associate(port_of(node), store=True)
    held.append(assoc)
    stored = []

    def store() -> object:
        status = assoc.send_c_store(next(files))
        stored.append(status.get("Status"))
        return status

    lived = _until_aborted(assoc, store, timeout=15)
    assert 2.8 <= lived < 6, lived
    assert stored.count(0) >= 5  # it was busy all along
    assert any("max_association_s" in m for m in _actions(caplog, "association_abort"))
    after = peers.echoscu(port_of(node))
    assert after.returncode == 0, after.stderr


# -- connections that never associate ----------------------------------------------------------


@pytest.mark.slow
def test_silent_connections_cost_no_thread_and_are_closed(
    start_node: StartNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(node={"associate_timeout_s": 5})  # 8 pending per host, 32 in all
    port = port_of(node)
    assert _handler_threads() == 0
    silent = []
    for _ in range(50):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((ATTACKER, 0))
        sock.connect((peers.LOOPBACK, port))
        silent.append(sock)
    started = time.monotonic()
    try:
        # all but 8 closed at once, without a thread
        wait_until(
            lambda: sum(map(_closed_by_node, silent)) >= 42,
            timeout=3,
            what="the connections over max_pending_per_host closed",
        )
        assert _handler_threads() <= 8
        refused = _actions(caplog, "connection_refused")
        assert refused and "max_pending_per_host" in refused[0]
        assert len(refused) < 5, refused  # rate-limited: not a line per connection

        _stores(port, tmp_path / "good", seed=54)  # another host gets through meanwhile
        assert instance_count(node) == 2
        assert time.monotonic() - started < 5, "the sender must store while they are pending"

        open_ = [s for s in silent if not _closed_by_node(s)]
        assert len(open_) == 8
        wait_until(
            lambda: all(map(_closed_by_node, open_)), timeout=10, what="the pending ones closed"
        )
        assert 4.5 <= time.monotonic() - started < 9
        wait_until(lambda: _handler_threads() == 0, timeout=5, what="their threads gone")
    finally:
        for sock in silent:
            sock.close()
    assert any(
        "no association request within 5 s" in m for m in _actions(caplog, "association_rejected")
    )


def test_trickled_association_request_is_cut_at_the_deadline(start_node: StartNode) -> None:
    """Bytes that keep coming do not extend associate_timeout_s (a per-read timeout would)."""
    node = start_node(node={"associate_timeout_s": 2})
    request = associate_rq()
    with _connect(port_of(node), ATTACKER) as s:
        started, sent = time.monotonic(), 0

        def trickle() -> bool:
            nonlocal sent
            if _closed_by_node(s):
                return True
            try:
                s.sendall(request[sent : sent + 1])  # one byte every 0.2 s: 40 s for it all
            except ConnectionError:
                return True
            sent += 1
            return False

        wait_until(trickle, interval=0.2, timeout=8, what="the node to close the connection")
        assert 1.8 <= time.monotonic() - started < 4
        assert sent < len(request)
    assert peers.echoscu(port_of(node)).returncode == 0


# -- hostile command UIDs ------------------------------------------------------------------------


def test_hostile_affected_sop_instance_uid_is_refused_and_the_association_goes_on(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    good = next(ct_slices(SeriesSpec(slices=1, rows=16, columns=16, seed=55)))
    payload = encode_dataset(good)
    raw = RawAssociation(peers.LOOPBACK, port_of(node), calling="RAW")
    try:
        assert raw.store(payload, b"1.2\xff\xfe.4") == 0x0117  # once: UnicodeEncodeError, dead
        assert raw.store(payload, b"1.2.3\n\x1b[31m") == 0x0117
        assert raw.store(payload, "1." + "2" * 63) == 0x0117  # 65 characters
        assert raw.store(payload, str(good.SOPInstanceUID)) == 0x0000  # same association
    finally:
        raw.release()
    assert instance_count(node) == 1
    assert not list(node.spool.incoming.iterdir())
    refused = _actions(caplog, "store_refused")
    assert len(refused) == 3 and "'1.2\\\\xff\\\\xfe.4'" in refused[0], refused
    assert all(m.isprintable() for m in refused)
    assert peers.echoscu(port_of(node)).returncode == 0


def test_internal_error_aborts_and_closes_the_association(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("a fault of ours")

    monkeypatch.setattr(node.receiver.store, "check_disk", boom)
    files = _series(tmp_path / "series", 1, seed=56)
    assoc = _associate(port_of(node), store=True)
    assert assoc.is_established
    assert "Status" not in assoc.send_c_store(files[0])
    wait_until(lambda: assoc.is_aborted, timeout=10, what="the A-ABORT")
    aborts = [r for r in caplog.records if getattr(r, "action", None) == "association_abort"]
    assert len(aborts) == 1 and aborts[0].exc_info is not None
    assert "RuntimeError" in aborts[0].getMessage()

    def closed() -> bool:
        with node.database.sessions() as session:
            row = session.scalars(sql_select(AssociationRow)).one()
        return row.outcome == "aborted"

    wait_until(closed, timeout=10, what="the association closed in the index")
    monkeypatch.undo()
    _stores(port_of(node), tmp_path / "good", seed=57)  # and the node goes on


# -- hostile AE titles in the log of a real serve ------------------------------------------------


@pytest.mark.slow
def test_control_characters_from_peers_are_escaped_in_the_log(tmp_path: Path) -> None:
    process = ServeProcess(tmp_path / "node")
    process.env["DICOMNODE_WORKERS"] = "[]"
    process.start()
    try:
        # a calling AE title that would forge a log line and turn an admin's terminal red
        evil = b"EVIL\n\x1b[31mFORGE"
        request = associate_rq(calling="PLACEHOLDER")
        request = request[:26] + evil.ljust(16, b" ") + request[42:]
        with socket.create_connection((peers.LOOPBACK, process.port), timeout=10) as s:
            s.sendall(request)
            pdu_type, length = pdu.read_header(s)
            body = pdu.read_exact(s, length)
        assert pdu_type == pdu.ASSOCIATE_RJ and body[1:4] == bytes([1, 1, 3])
        # a presentation context that pynetdicom itself warns about, quoting it raw
        request = associate_rq()
        syntax = b"1.2.840.10008.5.1.4.1.1.2"
        hostile = b"1.2.8\n\x1b[31m0.10008.5.1.41"
        assert len(hostile) == len(syntax)  # the PDU's lengths stay right
        request = request.replace(syntax, hostile)
        with socket.create_connection((peers.LOOPBACK, process.port), timeout=10) as s:
            s.sendall(request)
            assert pdu.read_header(s)[0] == pdu.ASSOCIATE_AC  # with no context accepted
            s.sendall(pdu.encode_abort(0))
        assert peers.echoscu(process.port).returncode == 0
    finally:
        process.stop()
    text = process.log.read_bytes()
    assert b"\x1b" not in text and b"\r" not in text
    lines = text.decode().splitlines()
    timestamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
    assert not [line for line in lines if "FORGE" in line and not timestamp.match(line)]
    rejected = [line for line in lines if "[association_rejected]" in line]
    assert any(r"'EVIL\n\x1b[31mFORGE'" in line for line in rejected), rejected
    library = [line for line in lines if "Non-conformant" in line]
    assert library and all(r"1.2.8\n\x1b[31m0.10008" in line for line in library), library
    assert all(timestamp.match(line) for line in library)
