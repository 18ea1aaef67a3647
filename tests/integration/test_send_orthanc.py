"""Results reach real PACS peers through the send queue: Orthanc over C-STORE and STOW-RS,
dcmtk's storescp; outages, a hung destination, dead letters, resends and restarts.

Each job here is finished through the job repository with stand-in result objects (a highdicom
SEG, Comprehensive 3D SR and Secondary Capture on a small CT series) under results/<job id>/,
exactly where the results package writes them; the node's own sender delivers them.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomnode.app import Node
from dicomnode.audit import list_events
from dicomnode.domain import JobState
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.queue.listing import JobFilter
from dicomnode.queue.sends import DEAD, PENDING, SENT, SendQueue
from dicomnode.send.scu import Destination, send_files
from dicomnode.testing.orthanc import Orthanc, orthanc
from dicomnode.testing.peers import LOOPBACK, free_port, storescp, storescu
from dicomnode.testing.process import ServeProcess, cli
from dicomnode.testing.result_objects import write_result_objects
from dicomnode.testing.waiting import wait_until
from tests.helpers import assert_same_dataset, instance_count, port_of
from tests.integration.test_access import (
    Certs,
    _tls_security,
    certs,  # noqa: F401 (the fixture, by name)
)

_jobs = itertools.count()
FAST = {"backoff_s": 0.2, "max_backoff_s": 0.5, "timeout_s": 10}
LEASE = timedelta(seconds=2)  # shorter than any claim lease, longer than the crash test's backoff


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(ct_slices(SeriesSpec(slices=6)), tmp_path_factory.mktemp("ct"))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc(
        tmp_path / "orthanc", dicomweb=True, sync_storage=False, graceful_stop=False
    ) as server:
        yield server


def dimse(name: str, server: Orthanc, **values: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": server.ae_title, "host": LOOPBACK,
            "port": server.dicom_port, **FAST, **values}  # fmt: skip


def finish_job(node: Node, ct: list[Path], destinations: list[str]) -> tuple[int, list[dict]]:
    """A job on the CT series, run to its finish through the repository, with stand-in results."""
    first = dcmread(ct[0], stop_before_pixels=True)
    job = node.jobs.enqueue(
        dedupe_key=f"send-test/{next(_jobs)}",
        route="chest",
        model="standin",
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        inputs=[str(first.SeriesInstanceUID)],
        destinations=destinations,
        state=JobState.QUEUED,
    )
    objects = write_result_objects(ct, node.spool.root, job.id)
    assert node.jobs.claim("test-worker", ["standin"]) is not None
    assert node.jobs.finish(job.id, "test-worker", {"objects": objects}) is JobState.SENDING
    return job.id, objects


def state_of(node: Node, job_id: int) -> JobState:
    job = node.jobs.get(job_id)
    assert job is not None
    return job.state


def uids(objects: list[dict]) -> set[str]:
    return {o["sop_instance_uid"] for o in objects}


def in_orthanc(server: Orthanc, study: str) -> set[str]:
    return {i["SOPInstanceUID"] for i in server.study_instances(study)}


def test_orthanc_lists_the_seg_sr_and_sc_under_the_source_study(
    start_node: Callable[..., Node], pacs: Orthanc, ct: list[Path]
) -> None:
    node = start_node(destinations=[dimse("pacs", pacs)])
    job_id, objects = finish_job(node, ct, ["pacs"])
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="job done")
    study = objects[0]["study_instance_uid"]
    listed = {i["SOPInstanceUID"]: i for i in pacs.study_instances(study)}
    assert set(listed) == uids(objects)
    assert {listed[o["sop_instance_uid"]]["SOPClassUID"] for o in objects} == {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    }
    assert {r.state for r in node.sender.queue.for_job(job_id)} == {SENT}  # type: ignore[union-attr]
    with node.database.sessions() as session:
        events, _ = list_events(session, job_id=job_id, action="sent")
    assert [(e.actor, e.detail) for e in events] == [("node", "3 objects to pacs")]


def test_the_scu_sends_seg_sr_and_sc_as_stored(tmp_path: Path, ct: list[Path]) -> None:
    objects = write_result_objects(ct, tmp_path, 1)
    paths = [tmp_path / o["path"] for o in objects]
    with storescp(tmp_path / "received") as port:
        results = send_files(paths, Destination("STORESCP", LOOPBACK, port))
        assert [r.ok for r in results] == [True, True, True]
        received = {dcmread(p).SOPInstanceUID: p for p in (tmp_path / "received").iterdir()}
    for path in paths:
        assert_same_dataset(path, received[dcmread(path).SOPInstanceUID])


def test_a_stopped_orthanc_gets_them_once_it_is_back(
    start_node: Callable[..., Node], pacs: Orthanc, ct: list[Path]
) -> None:
    pacs.stop(graceful=False)  # a crash of the PACS
    node = start_node(destinations=[dimse("pacs", pacs)])
    job_id, objects = finish_job(node, ct, ["pacs"])
    queue = node.sender.queue  # type: ignore[union-attr]
    rows = wait_until(
        lambda: [r for r in queue.for_job(job_id) if r.attempts >= 2] or None, what="2 attempts"
    )
    assert "refused or did not answer" in (rows[0].last_error or "")
    assert state_of(node, job_id) is JobState.SENDING
    pacs.start()
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="job done after the outage")
    assert in_orthanc(pacs, objects[0]["study_instance_uid"]) == uids(objects)


def test_a_destination_that_hangs_never_holds_up_another(
    start_node: Callable[..., Node], pacs: Orthanc, ct: list[Path]
) -> None:
    with socket.socket() as blackhole:  # accepts TCP connections, never answers A-ASSOCIATE
        blackhole.bind((LOOPBACK, 0))
        blackhole.listen(16)
        hung = {"name": "hung", "ae_title": "HUNG", "host": LOOPBACK,
                "port": blackhole.getsockname()[1], "timeout_s": 60}  # fmt: skip
        node = start_node(destinations=[hung, dimse("pacs", pacs)])
        job_id, objects = finish_job(node, ct, ["hung", "pacs"])
        queue = node.sender.queue  # type: ignore[union-attr]
        started = time.monotonic()

        def states() -> set[tuple[str, str]]:
            return {(r.destination, r.state) for r in queue.for_job(job_id)}

        wait_until(lambda: ("pacs", SENT) in states(), timeout=10, what="pacs sent")
        elapsed = time.monotonic() - started
        assert states() == {("hung", PENDING), ("pacs", SENT)}
        assert in_orthanc(pacs, objects[0]["study_instance_uid"]) == uids(objects)
        assert state_of(node, job_id) is JobState.SENDING
    assert elapsed < 5


def test_stow_rs_to_orthanc_dicomweb(
    start_node: Callable[..., Node], pacs: Orthanc, ct: list[Path]
) -> None:
    web = {"name": "web", "url": pacs.dicomweb_url, "headers": {"X-Test": "1"}, **FAST}
    node = start_node(destinations=[web])
    job_id, objects = finish_job(node, ct, ["web"])
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="job done over STOW-RS")
    assert in_orthanc(pacs, objects[0]["study_instance_uid"]) == uids(objects)
    node.sender.queue.requeue(job_id)  # type: ignore[union-attr]
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="sent again over STOW-RS")
    assert pacs.instance_count() == len(objects)  # the same UIDs: stored once


def test_stow_rs_to_a_stopped_service_backs_off_then_delivers(
    start_node: Callable[..., Node], pacs: Orthanc, ct: list[Path]
) -> None:
    pacs.stop(graceful=False)  # a crash of the PACS
    node = start_node(destinations=[{"name": "web", "url": pacs.dicomweb_url, **FAST}])
    job_id, objects = finish_job(node, ct, ["web"])
    queue = node.sender.queue  # type: ignore[union-attr]
    rows = wait_until(lambda: [r for r in queue.for_job(job_id) if r.attempts] or None)
    assert "STOW-RS to http://127.0.0.1" in (rows[0].last_error or "")
    pacs.start()
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="job done")
    assert in_orthanc(pacs, objects[0]["study_instance_uid"]) == uids(objects)


def test_dead_letter_after_max_attempts_fails_the_job_with_the_reason(
    start_node: Callable[..., Node], ct: list[Path]
) -> None:
    nowhere = {"name": "nowhere", "ae_title": "NOBODY", "host": LOOPBACK, "port": free_port(),
               "max_attempts": 2, **FAST}  # fmt: skip
    node = start_node(destinations=[nowhere])
    job_id, _ = finish_job(node, ct, ["nowhere"])
    wait_until(lambda: state_of(node, job_id) is JobState.FAILED, what="job failed")
    job = node.jobs.get(job_id)
    assert job is not None and job.error is not None
    assert "destination 'nowhere' gave up" in job.error and "after 2 attempts" in job.error
    assert "NOBODY@127.0.0.1" in job.error and "refused or did not answer" in job.error
    rows = node.sender.queue.for_job(job_id)  # type: ignore[union-attr]
    assert {(r.state, r.attempts) for r in rows} == {(DEAD, 2)}


@pytest.mark.slow
def test_send_job_resends_without_duplicates(
    start_node: Callable[..., Node], pacs: Orthanc, ct: list[Path], tmp_path: Path
) -> None:
    storage = tmp_path / "node"
    node = start_node(storage, destinations=[dimse("pacs", pacs)])
    job_id, objects = finish_job(node, ct, ["pacs"])
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="first delivery")
    first_sent = {r.id: r.sent_at for r in node.sender.queue.for_job(job_id)}  # type: ignore[union-attr]
    count = pacs.instance_count()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\n'
        f'host = "{LOOPBACK}"\nport = {pacs.dicom_port}\n'
    )
    env = {"DICOMNODE_NODE__STORAGE_DIR": str(storage)}
    result = cli("send", "--job", str(job_id), "--config", str(config), env=_env(env))
    assert result.returncode == 0, result.stderr
    assert f"job {job_id}: results queued again for pacs" in result.stdout
    wait_until(
        lambda: (
            state_of(node, job_id) is JobState.DONE
            and all(r.state == SENT for r in node.sender.queue.for_job(job_id))
        ),  # type: ignore[union-attr]
        what="second delivery",
    )
    again = node.sender.queue.for_job(job_id)  # type: ignore[union-attr]
    assert all(r.sent_at and r.sent_at > max(first_sent.values()) for r in again)  # type: ignore[type-var]
    assert pacs.instance_count() == count == len(objects)
    assert in_orthanc(pacs, objects[0]["study_instance_uid"]) == uids(objects)
    with node.database.sessions() as session:
        (event,), _ = list_events(session, job_id=job_id, action="resend")
    assert event.actor.startswith("cli:") and event.detail == "to pacs"
    unknown = cli("send", "--job", str(job_id), "--destination", "nope", "--config",
                  str(config), env=_env(env))  # fmt: skip
    assert unknown.returncode == 2 and "no destination 'nope'" in unknown.stderr


def _env(values: dict[str, str]) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    return {**env, **values}


def test_return_to_sender_sends_to_the_ae_and_host_that_sent_the_input(
    start_node: Callable[..., Node], pacs: Orthanc, ct: list[Path]
) -> None:
    back = {"name": "back", "return_to_sender": True, "port": pacs.dicom_port, **FAST}
    node = start_node(destinations=[back])
    sent = storescu(port_of(node), ct, calling_aet="MODALITY1")
    assert sent.returncode == 0, sent.stderr
    job_id, objects = finish_job(node, ct, ["back"])
    assert node.sender.queue.origin(job_id) == ("MODALITY1", LOOPBACK)  # type: ignore[union-attr]
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="returned to sender")
    assert in_orthanc(pacs, objects[0]["study_instance_uid"]) == uids(objects)


@pytest.fixture
def tls_certs(request: pytest.FixtureRequest) -> Certs:
    """test_access's CA, server and client certificates."""
    return request.getfixturevalue("certs")  # type: ignore[no-any-return]


def test_a_tls_destination_gets_them_over_dicom_tls(
    start_node: Callable[..., Node], tls_certs: Certs, ct: list[Path]
) -> None:
    """Our own receiver, requiring TLS and a client certificate from its CA, as the PACS."""
    keys = tls_certs
    pacs = start_node(security=_tls_security(keys))
    tls = {"enabled": True, "ca": keys.ca, "cert": keys.client_cert, "key": keys.client_key}
    secure = {"name": "secure", "ae_title": "DICOMNODE", "host": LOOPBACK,
              "port": port_of(pacs), "tls": tls, **FAST}  # fmt: skip
    node = start_node(destinations=[secure])
    job_id, objects = finish_job(node, ct, ["secure"])
    wait_until(lambda: state_of(node, job_id) is JobState.DONE, what="job done over TLS")
    assert instance_count(pacs) == len(objects)


@pytest.mark.postgres
def test_two_senders_on_one_postgres_deliver_every_object_once(
    start_node: Callable[..., Node], clean_postgres_url: str, pacs: Orthanc, ct: list[Path]
) -> None:
    """A second sender on the same database (as a second ``serve`` would run) shares the work:
    every row is claimed by one of them, and every job ends ``done``."""
    from dicomnode.send.sender import Sender

    node = start_node(
        node={"database_url": clean_postgres_url}, destinations=[dimse("pacs", pacs, batch=2)]
    )
    other = Sender(node.database.sessions, node.jobs, node.settings.destinations, node.spool.root)
    other.start()
    try:
        finished = [finish_job(node, ct, ["pacs"]) for _ in range(6)]
        for job_id, _ in finished:
            wait_until(lambda j=job_id: state_of(node, j) is JobState.DONE, what=f"job {job_id}")
    finally:
        other.stop()
    expected = set().union(*(uids(objects) for _, objects in finished))
    assert in_orthanc(pacs, finished[0][1][0]["study_instance_uid"]) == expected
    rows = [r for job_id, _ in finished for r in node.sender.queue.for_job(job_id)]  # type: ignore[union-attr]
    assert len(rows) == 18 and {(r.state, r.attempts) for r in rows} == {(SENT, 0)}
    with node.database.sessions() as session:
        events, total = list_events(session, action="sent")
    assert total == 6 and sorted(e.job_id for e in events) == sorted(j for j, _ in finished)


@pytest.mark.slow
def test_sends_survive_a_crash_of_the_node(tmp_path: Path, pacs: Orthanc, ct: list[Path]) -> None:
    """Rows made before a SIGKILL are delivered by the restarted node."""
    from dicomnode.app import open_database
    from dicomnode.config import load_settings
    from dicomnode.queue import JobRepository

    pacs.stop(graceful=False)  # a crash of the PACS
    storage = tmp_path / "node"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{storage}"\n[[workers]]\nmodels = ["echo"]\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.ae_title}"\nhost = "{LOOPBACK}"\n'
        f"port = {pacs.dicom_port}\nbackoff_s = 1\nmax_backoff_s = 1\ntimeout_s = 5\n"
    )
    serve = ServeProcess(storage, config=config).start()
    try:
        settings = load_settings(config)
        database = open_database(settings, migrate=False)
        jobs = JobRepository(database.sessions, settings.queue)
        first = dcmread(ct[0], stop_before_pixels=True)
        job = jobs.enqueue(
            dedupe_key="crash/1",
            route="chest",
            model="standin",
            study_instance_uid=str(first.StudyInstanceUID),
            inputs=[str(first.SeriesInstanceUID)],
            destinations=["pacs"],
            state=JobState.QUEUED,
        )
        objects = write_result_objects(ct, storage, job.id)
        assert jobs.claim("test-worker", ["standin"]) is not None
        jobs.finish(job.id, "test-worker", {"objects": objects})
        queue = SendQueue(database.sessions)

        def backing_off() -> bool:  # failed at least once, and not claimed at this moment
            soon = datetime.now(UTC) + timedelta(seconds=0.3)
            return all(
                r.attempts >= 1 and r.next_attempt_at and soon < r.next_attempt_at < soon + LEASE
                for r in queue.for_job(job.id)
            )

        wait_until(backing_off, what="attempted, between two attempts")
        serve.kill()
        assert {r.state for r in queue.for_job(job.id)} == {PENDING}
        pacs.start()
        serve.start()
        wait_until(lambda: jobs.get(job.id).state is JobState.DONE, timeout=60, what="delivered")  # type: ignore[union-attr]
        assert in_orthanc(pacs, objects[0]["study_instance_uid"]) == uids(objects)
        database.engine.dispose()
    finally:
        serve.stop()


@pytest.mark.slow
def test_a_lung_job_end_to_end_reaches_orthanc_under_the_source_study(
    start_node: Callable[..., Node], pacs: Orthanc, tmp_path: Path
) -> None:
    """A chest phantom in over C-STORE, the real lung_nodule model, the results package's SEG and
    SR out through the send queue: Orthanc files them under the phantom's study."""
    pytest.importorskip("torch")
    from dicomnode.phantoms.chest import chest_ct

    phantom = chest_ct((64, 256, 256), (1.2, 1.2, 2.0), nodules=2, seed=4201, sizes=(8.0, 14.0))
    series = phantom.write(tmp_path / "chest")
    node = start_node(
        workers=[{"models": ["lung_nodule"]}],
        routes=[{"name": "chest", "model": "lung_nodule", "destinations": ["pacs"],
                 "match": {"Modality": "CT"}}],
        destinations=[dimse("pacs", pacs)],
    )  # fmt: skip
    sent = storescu(port_of(node), series)
    assert sent.returncode == 0, sent.stderr
    job = wait_until(
        lambda: next(iter(node.jobs.list(JobFilter(state=["done", "failed"]))), None),
        timeout=300,
        what="the lung job's end",
    )
    assert job.state is JobState.DONE, job.error
    objects = job.result["objects"]
    assert {o["kind"] for o in objects} >= {"SEG", "SR"}
    study = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    listed = {i["SOPInstanceUID"]: i for i in pacs.study_instances(study)}
    assert uids(objects) <= set(listed)
    assert {listed[o["sop_instance_uid"]]["Modality"] for o in objects} >= {"SEG", "SR"}
