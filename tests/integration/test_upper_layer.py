"""Our Upper Layer against hostile and broken peers, speaking raw PDUs on a socket."""

from __future__ import annotations

import socket
import struct

import pytest

from dicomnode.app import Node
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.receive import dimse, pdu
from dicomnode.testing import peers
from dicomnode.testing.rawstore import associate_rq, encode_dataset, read_status, store_command
from dicomnode.testing.waiting import wait_until
from tests.helpers import instance_count, port_of


def _connect(node: Node) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(node)), timeout=10)
    sock.sendall(associate_rq())
    pdu_type, length = pdu.read_header(sock)
    pdu.read_exact(sock, length)
    assert pdu_type == pdu.ASSOCIATE_AC
    return sock


def _closed_by_node(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection."""
    received = b""
    sock.settimeout(10)
    while chunk := sock.recv(4096):
        received += chunk
    return received


def _still_serving(node: Node) -> None:
    assert peers.echoscu(port_of(node)).returncode == 0


def test_garbage_on_the_port_is_closed(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", port_of(node))) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed_by_node(sock) == b""
    _still_serving(node)


def test_wrong_application_context_is_rejected(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", port_of(node))) as sock:
        sock.sendall(associate_rq(context="1.2.3.4"))
        reply = _closed_by_node(sock)
    assert reply[0] == pdu.ASSOCIATE_RJ and reply[7:10] == bytes([1, 1, 2])


def test_unaccepted_context_is_aborted(node: Node) -> None:
    with _connect(node) as sock:
        sock.sendall(pdu.encode_p_data(3, 0x03, store_command()))
        reply = _closed_by_node(sock)
    assert reply[0] == pdu.ABORT
    _still_serving(node)


def test_abort_mid_dataset_leaves_nothing(node: Node) -> None:
    ds = next(ct_slices(SeriesSpec(slices=1, rows=256, columns=256)))
    data = encode_dataset(ds)
    with _connect(node) as sock:
        sock.sendall(pdu.encode_p_data(1, 0x03, store_command(sop_instance=ds.SOPInstanceUID)))
        sock.sendall(pdu.encode_p_data(1, 0x00, data[: len(data) // 2]))
        wait_until(
            lambda: list(node.spool.incoming.iterdir()), timeout=10, what="the arriving file"
        )
        assert len(list(node.spool.incoming.iterdir())) == 1  # arriving
        sock.sendall(pdu.encode_abort(0))
    wait_until(
        lambda: not list(node.spool.incoming.iterdir()), timeout=10, what="the partial file gone"
    )
    assert not list(node.spool.incoming.iterdir())
    assert instance_count(node) == 0
    _still_serving(node)


def test_whole_store_over_raw_pdus_then_release(node: Node) -> None:
    ds = next(ct_slices(SeriesSpec(slices=1, rows=64, columns=64)))
    data = encode_dataset(ds)
    with _connect(node) as sock:
        sock.sendall(pdu.encode_p_data(1, 0x03, store_command(sop_instance=ds.SOPInstanceUID)))
        for start in range(0, len(data), 1000):  # many small fragments
            last = start + 1000 >= len(data)
            sock.sendall(pdu.encode_p_data(1, 0x02 if last else 0x00, data[start : start + 1000]))
        assert read_status(sock) == 0x0000
        sock.sendall(struct.pack(">BxI", pdu.RELEASE_RQ, 4) + b"\0" * 4)
        assert _closed_by_node(sock) == pdu.RELEASE_RP_PDU
    assert instance_count(node) == 1


def test_store_without_dataset_is_refused(node: Node) -> None:
    command = bytearray(store_command())
    offset = command.index(struct.pack("<HH", 0, 0x0800))
    struct.pack_into("<H", command, offset + 8, dimse.NO_DATASET)
    with _connect(node) as sock:
        sock.sendall(pdu.encode_p_data(1, 0x03, bytes(command)))
        assert read_status(sock) == 0xC000


@pytest.mark.parametrize("declared", [0xFFFFFFF0, 1 << 30])
def test_absurd_pdu_length_neither_allocates_nor_blocks(node: Node, declared: int) -> None:
    with _connect(node) as sock:
        sock.sendall(struct.pack(">BxI", pdu.P_DATA_TF, declared))
        sock.sendall(struct.pack(">IBB", declared - 4, 1, 0x01) + b"\0" * 100)
        sock.shutdown(socket.SHUT_WR)  # and then nothing: the node must let go
        _closed_by_node(sock)
    _still_serving(node)


def test_pdu_larger_than_agreed_is_aborted(start_node) -> None:  # type: ignore[no-untyped-def]
    node = start_node(node={"max_pdu_size": 16384})
    with _connect(node) as sock:
        sock.sendall(pdu.encode_p_data(1, 0x00, b"\0" * 20000))
        assert _closed_by_node(sock)[0] == pdu.ABORT
    _still_serving(node)
