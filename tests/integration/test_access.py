"""Who may talk to the node: AE titles, source hosts, the association limit and DICOM TLS.

Real peers only: dcmtk's echoscu and storescu, pynetdicom as a second requestor, ``dicomnode send``
in-process, and certificates made with the openssl command line once per test session.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode import cli
from dicomnode.app import Node
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.waiting import WaitTimeout, wait_until
from tests.helpers import instance_count, port_of, stored_instance

REJECTED = "association_rejected"
TLS_REFUSED = "tls_refused"

StartNode = Callable[..., Node]
Result = subprocess.CompletedProcess[str]


def _actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


def _ct_files(folder: Path, *, seed: int = 11) -> list[Path]:
    return write_series(ct_slices(SeriesSpec(slices=2, rows=32, columns=32, seed=seed)), folder)


def _output(result: Result) -> str:
    return (result.stdout + result.stderr).strip()


def _refused(result: Result) -> bool:
    """dcmtk could not associate (rejected, aborted or no TLS): nonzero exit."""
    return result.returncode != 0


# -- called and calling AE titles ----------------------------------------------------------


def test_wrong_called_aet_is_rejected_and_logged(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        wrong = peers.echoscu(port_of(node), called_aet="WRONG")
        assert _refused(wrong), _output(wrong)
        rejections = _actions(caplog, REJECTED)
        assert len(rejections) == 1
        message = rejections[0].getMessage()
        assert "'WRONG'" in message and "127.0.0.1" in message
        assert rejections[0].levelno == logging.WARNING

        right = peers.echoscu(port_of(node), called_aet="DICOMNODE")
        assert right.returncode == 0, _output(right)
        assert len(_actions(caplog, REJECTED)) == 1, "the good echo must not be rejected"


def test_called_aet_trailing_spaces_do_not_matter(node: Node) -> None:
    result = peers.echoscu(port_of(node), called_aet="DICOMNODE ")
    assert result.returncode == 0, _output(result)


def test_only_allowed_calling_aets_associate(
    start_node: StartNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(security={"allowed_calling_aets": ["PACS"]})
    port = port_of(node)
    files = _ct_files(tmp_path / "series")
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        allowed = peers.echoscu(port, calling_aet="PACS")
        assert allowed.returncode == 0, _output(allowed)

        intruder = peers.echoscu(port, calling_aet="INTRUDER")
        assert _refused(intruder), _output(intruder)
        stored = peers.storescu(port, files, calling_aet="INTRUDER")
        assert _refused(stored), _output(stored)
        assert instance_count(node) == 0

        rejections = _actions(caplog, REJECTED)
        assert len(rejections) == 2
        assert all("'INTRUDER'" in r.getMessage() for r in rejections)

    from_pacs = peers.storescu(port, files, calling_aet="PACS")
    assert from_pacs.returncode == 0, _output(from_pacs)
    assert instance_count(node) == len(files)


def test_intruder_stores_nothing(start_node: StartNode, tmp_path: Path) -> None:
    """Holds today, whatever the calling AE title check does with the title it reads."""
    node = start_node(security={"allowed_calling_aets": ["PACS"]})
    port = port_of(node)
    assert _refused(peers.echoscu(port, calling_aet="INTRUDER"))
    stored = peers.storescu(port, _ct_files(tmp_path / "series"), calling_aet="INTRUDER")
    assert _refused(stored), _output(stored)
    assert instance_count(node) == 0


# -- source hosts ---------------------------------------------------------------------------


def test_host_outside_allowed_networks_is_rejected(
    start_node: StartNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(security={"allowed_hosts": ["10.0.0.0/8"]})
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        echo = peers.echoscu(port_of(node))
        assert _refused(echo), _output(echo)
        stored = peers.storescu(port_of(node), _ct_files(tmp_path / "series"))
        assert _refused(stored), _output(stored)
    assert instance_count(node) == 0
    rejections = _actions(caplog, REJECTED)
    assert len(rejections) == 2
    assert all("host 127.0.0.1" in r.getMessage() for r in rejections)


@pytest.mark.parametrize(
    "hosts",
    [
        ["127.0.0.0/8"],
        ["127.0.0.1"],
        ["::1", "127.0.0.0/8"],
        ["10.0.0.0/8", "fd00::/8", "127.0.0.1/32"],
    ],
    ids=["network", "address", "with-ipv6-address", "with-ipv6-network"],
)
def test_host_inside_allowed_networks_is_accepted(
    start_node: StartNode, tmp_path: Path, hosts: list[str]
) -> None:
    node = start_node(security={"allowed_hosts": hosts})
    echo = peers.echoscu(port_of(node))
    assert echo.returncode == 0, _output(echo)
    files = _ct_files(tmp_path / "series")
    stored = peers.storescu(port_of(node), files)
    assert stored.returncode == 0, _output(stored)
    assert instance_count(node) == len(files)


def test_ipv6_only_allowed_hosts_reject_ipv4_loopback(start_node: StartNode) -> None:
    node = start_node(security={"allowed_hosts": ["::1"]})
    assert _refused(peers.echoscu(port_of(node)))


# -- what the refused peer is told ----------------------------------------------------------

REJECT_REASONS = {
    "called-aet": ({}, {"called_aet": "WRONG"}, "Called AE Title Not Recognized"),
    "calling-aet": (
        {"allowed_calling_aets": ["PACS"]},
        {"calling_aet": "INTRUDER"},
        "Calling AE Title Not Recognized",
    ),
    "host": ({"allowed_hosts": ["10.0.0.0/8"]}, {}, "Reason: No Reason"),
}


@pytest.mark.parametrize("case", sorted(REJECT_REASONS))
def test_rejected_peer_gets_associate_rj_with_reason(start_node: StartNode, case: str) -> None:
    security, sender, reason = REJECT_REASONS[case]
    node = start_node(security=security)
    result = peers.echoscu(port_of(node), **sender)
    assert _refused(result)
    assert "Association Rejected" in _output(result)
    assert "Rejected Permanent, Source: Service User" in _output(result)
    assert reason in _output(result)


# -- association limit ----------------------------------------------------------------------


def _hold_association(port: int) -> Association:
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(peers.LOOPBACK, port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _echo_within(port: int, seconds: float) -> Result:
    """echoscu until it succeeds; an association's thread ends a moment after its release.
    The last try when none succeeded within ``seconds``, for the test to show."""
    tries: list[Result] = []

    def echoed() -> bool:
        tries.append(peers.echoscu(port))
        return tries[-1].returncode == 0

    with contextlib.suppress(WaitTimeout):
        wait_until(echoed, timeout=seconds, what="a C-ECHO accepted")
    return tries[-1]


def test_max_associations_refuses_the_extra_one(start_node: StartNode) -> None:
    node = start_node(node={"max_associations": 1})
    port = port_of(node)
    held = _hold_association(port)
    try:
        assert held.send_c_echo().Status == 0
        refused = peers.echoscu(port)
        assert _refused(refused)
        assert "Local Limit Exceeded" in _output(refused)
        assert held.is_established, "the refusal must not disturb the open association"
        assert held.send_c_echo().Status == 0
    finally:
        held.release()
    after = _echo_within(port, 5)
    assert after.returncode == 0, _output(after)


def test_max_associations_allows_that_many(start_node: StartNode) -> None:
    # every peer here is on 127.0.0.1: the per-host limit (half, by default) must allow both
    node = start_node(node={"max_associations": 2, "max_associations_per_host": 2})
    held = _hold_association(port_of(node))
    try:
        echo = peers.echoscu(port_of(node))
        assert echo.returncode == 0, _output(echo)
    finally:
        held.release()


# -- DICOM TLS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """A CA, a server and a client it signed, and a client signed by another CA."""

    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, f"openssl {' '.join(map(str, args))}: {result.stderr}"


def _make_ca(folder: Path, name: str, common_name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
        "-keyout", key, "-out", cert, "-subj", f"/CN={common_name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _make_leaf(
    folder: Path, name: str, common_name: str, ca: tuple[Path, Path], usage: str
) -> tuple[Path, Path]:
    cert, key, request = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request,
        "-subj", f"/CN={common_name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-sha256", "-days", "30", "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        peers.missing_peer("the openssl command line is not installed")
    folder = tmp_path_factory.mktemp("certs")
    ca = _make_ca(folder, "ca", "dicomnode test CA")
    other = _make_ca(folder, "other-ca", "some other CA")
    server = _make_leaf(folder, "server", "DICOMNODE", ca, "serverAuth")
    client = _make_leaf(folder, "client", "PACS", ca, "clientAuth")
    stranger = _make_leaf(folder, "stranger", "STRANGER", other, "clientAuth")
    return Certs(folder, ca[0], *server, *client, other[0], *stranger)


def _tls_security(certs: Certs, *, verify_peer: bool = True) -> dict[str, object]:
    tls = {
        "enabled": True,
        "cert": certs.server_cert,
        "key": certs.server_key,
        "ca": certs.ca,
        "verify_peer": verify_peer,
    }
    return {"tls": tls}


def _dcmtk_tls(key: Path, cert: Path, trust: Path) -> list[str]:
    """storescu/echoscu: authenticate with key+cert, trust only the CA file given."""
    return ["+tls", str(key), str(cert), "+cf", str(trust)]


def _good_tls(certs: Certs) -> list[str]:
    return _dcmtk_tls(certs.client_key, certs.client_cert, certs.ca)


@pytest.fixture
def tls_node(start_node: StartNode, certs: Certs) -> Node:
    return start_node(security=_tls_security(certs))


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """cli.main() sets up logging for a process; give the test session its own back after."""
    root = logging.getLogger()
    names = ("pynetdicom", "alembic")
    saved = (root.handlers[:], root.level, [logging.getLogger(n).level for n in names])
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in zip(names, saved[2], strict=True):
        logging.getLogger(name).setLevel(level)


def _send(files: Sequence[Path], port: int, *tls: str | Path) -> int:
    return cli.main(["send", *map(str, files), "--to", f"DICOMNODE@127.0.0.1:{port}",
                     "--timeout", "10", *map(str, tls)])  # fmt: skip


def test_tls_sender_with_our_ca_stores(tls_node: Node, certs: Certs, tmp_path: Path) -> None:
    files = _ct_files(tmp_path / "series")
    result = peers.storescu(port_of(tls_node), files, extra=_good_tls(certs))
    assert result.returncode == 0, _output(result)
    assert instance_count(tls_node) == len(files)
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = stored_instance(tls_node, uid)
        assert row is not None and tls_node.spool.path(row.path).is_file()


def test_tls_client_of_another_ca_is_refused(
    tls_node: Node, certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(tls_node)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        stranger = _dcmtk_tls(certs.stranger_key, certs.stranger_cert, certs.ca)
        echo = peers.echoscu(port, extra=stranger)
        assert _refused(echo), _output(echo)
        stored = peers.storescu(port, _ct_files(tmp_path / "series"), extra=stranger)
        assert _refused(stored), _output(stored)
    assert instance_count(tls_node) == 0
    refusals = _actions(caplog, TLS_REFUSED)
    assert len(refusals) == 2
    assert all("127.0.0.1" in r.getMessage() for r in refusals)


def test_tls_client_without_certificate_is_refused(tls_node: Node, certs: Certs) -> None:
    anonymous = peers.echoscu(port_of(tls_node), extra=["+tla", "+cf", str(certs.ca)])
    assert _refused(anonymous), _output(anonymous)


def test_plain_tcp_to_tls_port_is_refused(
    tls_node: Node, certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        echo = peers.echoscu(port_of(tls_node))
        assert _refused(echo), _output(echo)
        stored = peers.storescu(port_of(tls_node), _ct_files(tmp_path / "series"))
        assert _refused(stored), _output(stored)
        # the node logs a refusal in the connection's thread, which may end after the peer exits
        wait_until(
            lambda: len(_actions(caplog, TLS_REFUSED)) >= 2, timeout=10, what="two TLS refusals"
        )
    assert instance_count(tls_node) == 0
    assert len(_actions(caplog, TLS_REFUSED)) == 2


def test_tls_sender_checks_the_node_certificate(tls_node: Node, certs: Certs) -> None:
    """A sender that trusts only another CA does not talk to our node."""
    wrong_trust = _dcmtk_tls(certs.client_key, certs.client_cert, certs.other_ca)
    echo = peers.echoscu(port_of(tls_node), extra=wrong_trust)
    assert _refused(echo)
    assert "certificate verify failed" in _output(echo)


def test_tls_node_keeps_serving_after_failed_handshakes(
    tls_node: Node, certs: Certs, tmp_path: Path
) -> None:
    port = port_of(tls_node)
    stranger = _dcmtk_tls(certs.stranger_key, certs.stranger_cert, certs.ca)
    failures = [
        peers.echoscu(port),
        peers.echoscu(port, extra=stranger),
        peers.echoscu(port, extra=["+tla", "+cf", str(certs.ca)]),
        peers.echoscu(port),
    ]
    assert all(_refused(r) for r in failures), [_output(r) for r in failures]
    with socket.create_connection((peers.LOOPBACK, port)) as garbage:
        garbage.sendall(b"\x16\x03\x01\x00\x05hello")  # a broken TLS record
    files = _ct_files(tmp_path / "series")
    stored = peers.storescu(port, files, extra=_good_tls(certs))
    assert stored.returncode == 0, _output(stored)
    assert instance_count(tls_node) == len(files)


def test_silent_tls_client_does_not_block_others(
    tls_node: Node, certs: Certs, tmp_path: Path
) -> None:
    """A connection that never starts its handshake must not hold up the accept loop."""
    with socket.create_connection((peers.LOOPBACK, port_of(tls_node))):
        files = _ct_files(tmp_path / "series")
        started = time.monotonic()
        stored = peers.storescu(port_of(tls_node), files, extra=_good_tls(certs), timeout=20)
        assert stored.returncode == 0, _output(stored)
        assert time.monotonic() - started < 10
    assert instance_count(tls_node) == len(files)


def test_tls_without_peer_verification_accepts_anonymous_client(
    start_node: StartNode, certs: Certs, tmp_path: Path
) -> None:
    node = start_node(security=_tls_security(certs, verify_peer=False))
    port = port_of(node)
    anonymous = peers.echoscu(port, extra=["+tla", "+cf", str(certs.ca)])
    assert anonymous.returncode == 0, _output(anonymous)
    stranger = _dcmtk_tls(certs.stranger_key, certs.stranger_cert, certs.ca)
    files = _ct_files(tmp_path / "series")
    stored = peers.storescu(port, files, extra=stranger)
    assert stored.returncode == 0, _output(stored)
    assert instance_count(node) == len(files)
    assert _refused(peers.echoscu(port)), "still TLS: plain TCP is refused"


@pytest.mark.usefixtures("cli_logging")
def test_dicomnode_send_over_tls(tls_node: Node, certs: Certs, tmp_path: Path) -> None:
    files = _ct_files(tmp_path / "series")
    port = port_of(tls_node)
    code = _send(files, port, "--tls-ca", certs.ca, "--tls-cert", certs.client_cert,
                 "--tls-key", certs.client_key)  # fmt: skip
    assert code == 0
    assert instance_count(tls_node) == len(files)


@pytest.mark.usefixtures("cli_logging")
def test_dicomnode_send_over_tls_is_refused_without_our_ca(
    tls_node: Node, certs: Certs, tmp_path: Path
) -> None:
    files = _ct_files(tmp_path / "series")
    port = port_of(tls_node)
    stranger = _send(files, port, "--tls-ca", certs.ca, "--tls-cert", certs.stranger_cert,
                     "--tls-key", certs.stranger_key)  # fmt: skip
    assert stranger != 0
    no_client_cert = _send(files, port, "--tls-ca", certs.ca)
    assert no_client_cert != 0
    wrong_trust = _send(files, port, "--tls-ca", certs.other_ca, "--tls-cert", certs.client_cert,
                        "--tls-key", certs.client_key)  # fmt: skip
    assert wrong_trust != 0
    assert instance_count(tls_node) == 0
    # and a good sender still gets through afterwards
    good = _send(files, port, "--tls-ca", certs.ca, "--tls-cert", certs.client_cert,
                 "--tls-key", certs.client_key)  # fmt: skip
    assert good == 0
    assert instance_count(tls_node) == len(files)
