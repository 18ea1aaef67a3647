"""STOW-RS in, with real clients: dicomweb-client and curl post to a running node's HTTP API,
the instances go through the C-STORE path into the spool and the index, the request counts as
a released association (its series complete at once, no quiet time), and every bad request
gets its HTTP status and reason, stores nothing, and leaves the node serving."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from dicomnode.app import Node, build_node
from dicomnode.db.models import Association, AuditEvent, Instance
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import uid_from, write_series
from dicomnode.queue.listing import JobFilter
from dicomnode.testing.models import MODELS
from dicomnode.testing.waiting import wait_until
from tests.conftest import make_settings
from tests.helpers import assert_same_dataset, instance_count

ADMIN = "stow-admin-token"
SCANNER = "stow-scanner-token"  # scope store only
READER = "stow-reader-token"  # scope read only
TOKENS = {
    "scanner": {"secret": SCANNER, "scopes": ["store"]},
    "reader": {"secret": READER, "scopes": ["read"]},
}
BOUNDARY = "dicomnode-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
#: long enough that a job queued within seconds cannot have waited for either
QUIET_S = 120
ROUTES = [
    {
        "name": "scanner-ct",
        "model": "echo",
        "match": {"Modality": "CT", "calling_aet": "scanner"},
        "completion": {"quiet_s": QUIET_S, "release_grace_s": QUIET_S, "confirm_s": 0},
    }
]


def series(seed: int, folder: Path, slices: int = 3, study_uid: str = "") -> list[Path]:
    spec = SeriesSpec(slices=slices, rows=32, columns=32, seed=seed, study_uid=study_uid)
    return write_series(ct_slices(spec), folder / f"series-{seed}")


def multipart(
    *parts: bytes, boundary: str = BOUNDARY, part_type: str = "application/dicom"
) -> bytes:
    """A body as the standard writes it: each part a DICOM file (PS3.10)."""
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def body_of(files: Sequence[Path]) -> bytes:
    return multipart(*(path.read_bytes() for path in files))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(
    node: Node,
    body: bytes | Iterator[bytes],
    *,
    path: str = "/dicomweb/studies",
    token: str | None = SCANNER,
    content_type: str = MULTIPART,
    **kwargs: Any,
) -> httpx.Response:
    assert node.api is not None
    headers = {"Content-Type": content_type, **(auth(token) if token else {})}
    return httpx.post(node.api.url + path, content=body, headers=headers, timeout=60, **kwargs)


def failures(response: httpx.Response) -> dict[str, int]:
    """SOP Instance UID -> Failure Reason of the response's Failed SOP Sequence."""
    ds = pydicom.Dataset.from_json(response.json())
    return {
        str(item.ReferencedSOPInstanceUID): int(item.FailureReason)
        for item in ds.get("FailedSOPSequence", [])
    }


def stored(response: httpx.Response) -> list[str]:
    ds = pydicom.Dataset.from_json(response.json())
    return [str(item.ReferencedSOPInstanceUID) for item in ds.get("ReferencedSOPSequence", [])]


def leftovers(node: Node) -> list[Path]:
    """What requests left in the receiver's incoming folder (nothing, once each has ended)."""
    return list(node.spool.incoming.iterdir())


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the bad requests: each must leave it as it was, and serving."""
    storage = tmp_path_factory.mktemp("stow-node")
    settings = make_settings(
        storage,
        api={"token": ADMIN, "tokens": TOKENS, "stow_max_mb": 1},
        workers=[],
    )
    node = build_node(settings, builtin_models=MODELS)
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return series(7, tmp_path_factory.mktemp("stow-files"))


# -- real clients ----------------------------------------------------------------------------


@pytest.mark.slow
def test_dicomweb_client_stores_a_series_and_its_job_waits_for_no_quiet_time(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(api={"token": ADMIN, "tokens": TOKENS}, routes=ROUTES)
    assert node.api is not None
    sent = series(21, tmp_path, slices=30)
    client = DICOMwebClient(f"{node.api.url}/dicomweb", headers=auth(SCANNER))
    client.set_http_retry_params(retry=False)
    started = time.monotonic()
    response = client.store_instances([pydicom.dcmread(path) for path in sent])
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence) == (
        sorted(uid(path) for path in sent)
    )
    assert "FailedSOPSequence" not in response
    # in the spool as sent, in the index under the client that sent them
    assert instance_count(node) == 30
    with node.database.sessions() as session:
        rows = session.scalars(select(Instance)).all()
        assert {(r.calling_aet, r.calling_host) for r in rows} == {("scanner", "127.0.0.1")}
        (transfer,) = session.scalars(select(Association)).all()
        assert (transfer.called_aet, transfer.outcome) == ("STOW-RS", "released")
        assert (transfer.stored, transfer.refused) == (30, 0)
        assert {r.association_pk for r in rows} == {transfer.id}
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "received")).all()
        assert [(e.actor, e.detail) for e in events] == [
            ("token:scanner", "30 instances by STOW-RS from 127.0.0.1")
        ]
    first = next(r for r in rows if r.sop_instance_uid == uid(sent[0]))
    assert_same_dataset(sent[0], node.spool.path(first.path))
    assert leftovers(node) == []
    # the route matched the token's name as calling AE title, and the series was complete at
    # once: the job ran long before quiet_s or release_grace_s
    (job,) = wait_until(
        lambda: [j for j in node.jobs.list(JobFilter()) if j.state is JobState.DONE],
        timeout=30,
        what="the STOW-RS series' job done",
        detail=lambda: node.jobs.list(JobFilter()),
    )
    assert time.monotonic() - started < QUIET_S / 4
    assert job.route == "scanner-ct" and job.series_instance_uid == str(
        pydicom.dcmread(sent[0], stop_before_pixels=True).SeriesInstanceUID
    )


@pytest.mark.slow
def test_curl_posts_a_body_built_by_hand(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node(api={"token": ADMIN, "tokens": TOKENS})
    assert node.api is not None
    study = uid_from("curl", "study")
    sent = series(22, tmp_path, slices=4, study_uid=study)
    other = series(23, tmp_path, slices=1)  # another study
    body = tmp_path / "body"

    def curl(path: str, files: Sequence[Path]) -> tuple[int, dict[str, Any]]:
        body.write_bytes(body_of(files))
        result = subprocess.run(
            ["curl", "-sS", "-X", "POST", "--data-binary", f"@{body}",
             "-H", f"Content-Type: {MULTIPART}", "-H", f"Authorization: Bearer {SCANNER}",
             "-w", "\n%{http_code}", f"{node.api.url}{path}"],  # type: ignore[union-attr]
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        answer, _, code = result.stdout.rpartition("\n")
        return int(code), json.loads(answer)

    code, answer = curl(f"/dicomweb/studies/{study}", [*sent, *other])
    assert code == 202  # stored some, refused others
    ds = pydicom.Dataset.from_json(answer)
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence) == sorted(
        uid(path) for path in sent
    )
    ((failed_uid, reason),) = (
        (str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in ds.FailedSOPSequence
    )
    assert failed_uid == uid(other[0]) and reason == 0xC409  # not of the study in the URL
    assert instance_count(node) == 4
    code, answer = curl(f"/dicomweb/studies/{study}", other)
    assert code == 409 and instance_count(node) == 4  # nothing of it stored
    code, answer = curl("/dicomweb/studies", other)
    assert code == 200 and instance_count(node) == 5
    assert leftovers(node) == []


# -- bad requests: each a status and a reason, nothing stored, the node serving ------------------


def _truncated_body(files: list[Path]) -> bytes:
    whole = body_of(files)
    return whole[: len(whole) // 2]  # the multipart body ends inside a part


def _not_dicom(files: list[Path]) -> bytes:
    return multipart(files[0].read_bytes(), b"this is not a DICOM file\r\n")


BAD_BODIES: dict[str, tuple[Callable[[list[Path]], bytes], dict[str, Any], int, str]] = {
    "no token": (body_of, {"token": None}, 401, "missing bearer token"),
    "wrong token": (body_of, {"token": "not-a-token-of-this-node"}, 401, "not valid"),
    "read scope only": (body_of, {"token": READER}, 403, "lacks the 'store' scope"),
    "not multipart": (body_of, {"content_type": "application/dicom"}, 415, "multipart/related"),
    "metadata and bulk data": (
        body_of,
        {"content_type": f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'},
        415,
        "application/dicom parts only",
    ),
    "a part of another type": (
        lambda f: multipart(f[0].read_bytes(), part_type="text/plain"),
        {},
        415,
        "part 1 is 'text/plain'",
    ),
    "no boundary": (
        body_of,
        {"content_type": 'multipart/related; type="application/dicom"'},
        400,
        "no boundary parameter",
    ),
    "wrong boundary": (
        lambda f: multipart(f[0].read_bytes(), boundary="another-boundary"),
        {},
        400,
        "no boundary line",
    ),
    "truncated body": (_truncated_body, {}, 400, "truncated (no boundary after it)"),
    "no closing boundary": (
        lambda f: body_of(f)[: -len("--\r\n")],
        {},
        400,
        "without its closing boundary",
    ),
    "a part that is not DICOM": (_not_dicom, {}, 400, "part 2 is not a DICOM file (PS3.10)"),
    "no part": (lambda f: multipart(), {}, 400, "holds no part"),
    "study UID in the URL not a UID": (
        body_of,
        {"path": "/dicomweb/studies/1.02.x"},
        400,
        "not a valid UID",
    ),
    "over stow_max_mb": (lambda f: multipart(b"\0" * (1 << 20)), {}, 413, "stow_max_mb"),
    "over stow_max_mb, chunked": (
        lambda f: multipart(b"\0" * (1 << 20)),
        {"chunked": True},
        413,
        "stow_max_mb",
    ),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_requests_store_nothing(node: Node, files: list[Path], case: str) -> None:
    make, options, status, reason = BAD_BODIES[case]
    before = instance_count(node)
    body: bytes | Iterator[bytes] = make(files)
    options = dict(options)
    if options.pop("chunked", False):  # no Content-Length: the limit holds as the body comes
        whole = body
        body = (whole[i : i + 65536] for i in range(0, len(whole), 65536))
    response = post(node, body, **options)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]
    assert instance_count(node) == before
    assert leftovers(node) == []
    # and the node serves the next request
    good = post(node, body_of(files))
    assert good.status_code == 200 and sorted(stored(good)) == sorted(map(uid, files))


def test_each_instance_is_refused_alone_for_what_c_store_refuses(
    node: Node, tmp_path: Path
) -> None:
    """Well-formed parts whose instances the receiver refuses fail one by one in the Failed
    SOP Sequence, with C-STORE's status; the others are stored (202)."""
    good = series(31, tmp_path, slices=2)

    def changed_meta(path: Path, **meta: str) -> bytes:
        ds = pydicom.dcmread(path)
        for keyword, value in meta.items():
            setattr(ds.file_meta, keyword, value)
        out = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}.dcm"
        ds.save_as(out)  # as it is: enforce_file_format would take the meta from the dataset
        return out.read_bytes()

    bad = series(32, tmp_path, slices=4)
    parts = {
        uid(bad[0]): (bad[0].read_bytes()[:-700], 0xC001),  # the dataset is cut short
        "1.2.826.0.1.3680043.8.498.1": (  # the meta names another instance than the dataset
            changed_meta(bad[1], MediaStorageSOPInstanceUID="1.2.826.0.1.3680043.8.498.1"),
            0xA900,
        ),
        uid(bad[2]): (changed_meta(bad[2], TransferSyntaxUID="1.2.3.4.5.6"), 0xC122),
        uid(bad[3]): (changed_meta(bad[3], MediaStorageSOPClassUID="1.2.840.10008.1.1"), 0x0122),
    }
    before = instance_count(node)
    response = post(
        node, multipart(*(data for data, _ in parts.values()), *map(Path.read_bytes, good))
    )
    assert response.status_code == 202, response.text
    assert failures(response) == {key: status for key, (_, status) in parts.items()}
    assert sorted(stored(response)) == sorted(map(uid, good))
    assert instance_count(node) == before + 2
    # all refused: 409; sent again: a duplicate, kept first, answered as stored (200)
    assert post(node, multipart(parts[uid(bad[0])][0])).status_code == 409
    again = post(node, body_of(good))
    assert again.status_code == 200 and instance_count(node) == before + 2
    assert leftovers(node) == []


def _raw_request(port: int, body: bytes, sent: int) -> socket.socket:
    """A STOW-RS request whose body stops after ``sent`` bytes (the socket stays open)."""
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        f"{SCANNER}\r\nContent-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + body[:sent])
    return sock


def _answer_of(sock: socket.socket) -> str:
    """The whole HTTP answer on ``sock``: its head and its Content-Length of body."""
    data = b""
    while True:
        head, blank, body = data.partition(b"\r\n\r\n")
        if blank:
            lengths = [
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if len(body) >= sum(lengths):
                return data.decode("latin-1")
        more = sock.recv(4096)
        if not more:
            return data.decode("latin-1")
        data += more


@pytest.mark.slow
def test_requests_hold_association_slots_and_time_out(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """A request holds one of the receiver's association slots while it runs (503 over the
    limit), one whose body stalls ends after idle_timeout_s (408), one whose client goes away
    stores nothing; and the node goes on serving."""
    node = start_node(
        api={"token": ADMIN, "tokens": TOKENS}, node={"max_associations": 1, "idle_timeout_s": 1}
    )
    assert node.api is not None
    port = node.api.address[1]
    files = series(41, tmp_path)
    body = body_of(files)
    slots = node.receiver.slots

    stalled = _raw_request(port, body, len(body) // 2)
    wait_until(lambda: slots.associations == 1, timeout=10, what="the request's slot")
    busy = post(node, body)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert "max_associations" in busy.json()["error"]
    answer = _answer_of(stalled)
    stalled.close()
    assert answer.startswith("HTTP/1.1 408") and "idle_timeout_s" in answer
    assert slots.associations == 0

    gone = _raw_request(port, body, len(body) // 2)
    wait_until(lambda: slots.associations == 1, timeout=10, what="the request's slot")
    gone.close()
    wait_until(lambda: slots.associations == 0, timeout=10, what="the slot given back")
    assert instance_count(node) == 0 and leftovers(node) == []

    assert post(node, body).status_code == 200 and instance_count(node) == 3
