"""Notifications to real peers on loopback: a RIS's MLLP listener, a FHIR server and a webhook
receiver, beside a PACS (dcmtk's storescp).

A CT series goes through the real node (a command model writing findings.json, so the node
writes its own SR and key images): the RIS gets an ORU^R01 that parses strictly as HL7 v2.5
and holds the findings, the FHIR server a transaction Bundle that validates as R4, the webhook
its templated body; send_if holds a negative job's results from the PACS. Then the faults,
with jobs built through the repository and the notifier delivering to the real peers: a RIS
that NAKs, one that hangs, a webhook that answers 500, a target that never takes a message
(dead letter), and a serve killed while the RIS held its ACK: each message taken exactly once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomnode.app import Node, open_database
from dicomnode.audit import list_events
from dicomnode.config import QueueSettings, Settings, load_settings
from dicomnode.db import make_engine, make_session_factory, upgrade
from dicomnode.domain import JobState
from dicomnode.notify.notifier import Notifier
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.queue import JobRepository
from dicomnode.queue.delivery import DEAD, SENT
from dicomnode.queue.notifications import NotificationQueue
from dicomnode.queue.outcomes import ReleasePolicy
from dicomnode.testing import peers
from dicomnode.testing.http_peers import FhirServer, WebhookReceiver
from dicomnode.testing.jobs import ROOT, add_study
from dicomnode.testing.mllp import MllpListener
from dicomnode.testing.process import ServeProcess
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

PROGRAM = """
import shutil, sys
from pathlib import Path
shutil.copy(sys.argv[3], Path(sys.argv[2]) / "findings.json")
"""
NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
FHIR_TOKEN = "fhir-test-token"


def nodule(x: float, diameter: float, probability: float = 0.9) -> dict[str, Any]:
    return {"label": "nodule", "finding_type": NODULE, "probability": probability,
            "centre_mm": [x, 0.0, 0.0], "diameter_mm": diameter}  # fmt: skip


def command_model(tmp_path: Path, name: str, findings: list[dict[str, Any]]) -> dict[str, Any]:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    listed = tmp_path / f"{name}.json"
    listed.write_text(json.dumps({"findings": findings}))
    return {"command": [sys.executable, str(script), "{input}", "{output}", str(listed)]}


def received_uids(folder: Path) -> set[str]:
    return {str(dcmread(p).SOPInstanceUID) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_critical_nodule_reaches_the_ris_the_fhir_server_and_the_webhook(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    commands = {
        "lung_found": command_model(tmp_path, "found", [nodule(0.0, 9.1, 0.93),
                                                        nodule(40.0, 5.0, 0.81)]),
        "lung_clear": command_model(tmp_path, "clear", []),
    }  # fmt: skip
    pacs_folder = tmp_path / "pacs"
    with (
        peers.storescp(pacs_folder, ae_title="PACS") as pacs,
        MllpListener() as ris,
        FhirServer(token=FHIR_TOKEN) as fhir,
        WebhookReceiver() as hook,
    ):
        node = start_node(
            models={"commands": commands},
            workers=[{"models": sorted(commands)}],
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                           "port": pacs}],
            routes=[
                {"name": "chest", "model": "lung_found", "match": {"rows": 32},
                 "destinations": ["pacs"], "send_if": "positive",
                 "critical": {"label": "nodule", "min_diameter_mm": 8},
                 "completion": {"quiet_s": 30, "release_grace_s": 0, "confirm_s": 0}},
                {"name": "chest-clear", "model": "lung_clear", "match": {"rows": 40},
                 "destinations": ["pacs"], "send_if": "positive",
                 "completion": {"quiet_s": 30, "release_grace_s": 0, "confirm_s": 0}},
            ],
            notifications=[
                {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port,
                 "events": ["done", "failed"], "receiving_application": "RIS"},
                {"name": "fhir", "kind": "fhir", "url": fhir.url, "token": FHIR_TOKEN,
                 "events": ["finding"]},
                {"name": "on-call", "kind": "webhook", "url": hook.url + "/hooks/ai",
                 "events": ["critical"],
                 "body": {"text": "Critical finding, accession ${accession_number}: ${summary}",
                          "job": "${job_id}", "critical": "${critical}"}},
            ],
        )  # fmt: skip
        study = "1.2.826.0.1.3680043.99.21.1"
        found = write_series(
            ct_slices(SeriesSpec(slices=6, rows=32, columns=32, seed=211, study_uid=study)),
            tmp_path / "found",
        )
        clear = write_series(
            ct_slices(SeriesSpec(slices=6, rows=40, columns=40, seed=212, study_uid=study)),
            tmp_path / "clear",
        )
        assert peers.storescu(port_of(node), found).returncode == 0
        assert peers.storescu(port_of(node), clear).returncode == 0
        wait_until(
            lambda: len(jobs := node.jobs.list()) == 2 and all(j.final for j in jobs),
            timeout=120,
            interval=0.2,
            what="both jobs to end",
            detail=lambda: [(j.route, j.state, j.error) for j in node.jobs.list()],
        )
        by_route = {job.route: job for job in node.jobs.list()}
        positive, negative = by_route["chest"], by_route["chest-clear"]
        assert positive.state is JobState.DONE and negative.state is JobState.DONE
        wait_until(lambda: len(ris.accepted) == 2 and fhir.reports() and hook.peer.taken(),
                   timeout=90, what="the RIS, the FHIR server and the webhook",
                   detail=lambda: node.notifier and node.notifier.queue.counts())  # fmt: skip

        # the PACS: the positive job's objects only (send_if = "positive")
        assert positive.result is not None and negative.result is not None
        wait_until(lambda: received_uids(pacs_folder) == {
            o["sop_instance_uid"] for o in positive.result["objects"]}, timeout=90,
            what="the positive job's objects at the PACS")  # fmt: skip
        assert negative.result["outcome"]["send"] is False and negative.sent_at is None

        # the RIS: one ORU^R01 per job, valid v2.5, with the findings
        # each names the study in its first OBX
        assert {r.segments("OBX")[0].split("|")[5] for r in ris.accepted.values()} == {study}
        oru = next(r for r in ris.accepted.values() if len(r.segments("OBX")) == 4)
        pid = oru.message.oru_r01_patient_result.oru_r01_patient.pid
        assert pid.pid_3.to_er7() == "PHANTOM-1" and pid.pid_5.to_er7() == "Phantom^Chest"
        order = oru.message.oru_r01_patient_result.oru_r01_order_observation
        assert order.obr.obr_3.to_er7() == "ACC0001"
        obx = [g.obx for g in order.oru_r01_observation]
        assert [o.obx_8.to_er7() for o in obx[2:]] == ["AA", "A"]
        assert "diameter 9.1 mm" in obx[2].obx_5.to_er7()
        assert "probability 0.93" in obx[2].obx_5.to_er7()
        clear_oru = next(r for r in ris.accepted.values() if len(r.segments("OBX")) == 2)
        assert "no findings" in clear_oru.segments("OBX")[1]
        assert ris.duplicates() == [] and all(r.answer == "AA" for r in ris.received)

        # FHIR: one DiagnosticReport with an Observation per finding, for the positive job
        from dicomnode.notify.fhir import validate

        [request] = fhir.peer.requests
        assert request.headers["authorization"] == f"Bearer {FHIR_TOKEN}"
        bundle = validate(request.body)
        report = bundle.entry[0].resource
        assert report.status == "preliminary" and len(bundle.entry) == 3
        assert report.basedOn[0].identifier.value == "ACC0001"
        assert len(fhir.observations()) == 2

        # the webhook: its template, the delivery id as the Idempotency-Key
        [posted] = hook.peer.requests
        assert posted.path == "/hooks/ai"
        assert posted.body["text"].startswith("Critical finding, accession ACC0001: ")
        assert posted.body["job"] == positive.id
        assert [f["diameter_mm"] for f in posted.body["critical"]] == [9.1]
        rows = NotificationQueue(node.database.sessions).for_job(positive.id)
        keys = {r.notification: r.delivery_key for r in rows}
        assert posted.key == keys["on-call"]
        assert report.identifier[0].value == keys["fhir"]
        assert {r.control_id for r in ris.accepted.values()} >= {keys["ris"]}

        with node.database.sessions() as session:
            events, _ = list_events(session, action="notified")
        assert sorted(e.detail.split(":")[0] for e in events if e.detail) == [
            "critical to on-call (webhook)", "done to ris (hl7)", "done to ris (hl7)",
            "finding to fhir (fhir)"]  # fmt: skip


# -- faults, with jobs built through the repository -------------------------------------------


STUDY = f"{ROOT}.{ord('f')}"  # add_study's UID of key "f"


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Callable[..., tuple[JobRepository, Notifier]]]:
    """A database with a study; ``make(targets)`` gives the repository (with the policy of
    those notifications) and a started notifier."""
    engine = make_engine(f"sqlite:///{tmp_path / 'notify.db'}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    started: list[Notifier] = []
    with sessions.begin() as session:
        from datetime import UTC, datetime

        add_study(session, "f", "PID-F", "ACC-F", "Fault^Test", datetime.now(UTC))

    def make(*targets: dict[str, Any]) -> tuple[JobRepository, Notifier]:
        settings = Settings(
            routes=[{"name": "chest", "model": "standin"}],
            notifications=[{"events": ["done"], "backoff_s": 0.2, "timeout_s": 1, **t}
                           for t in targets],
        )  # fmt: skip
        jobs = JobRepository(sessions, QueueSettings(),
                             policy=ReleasePolicy.from_settings(settings))  # fmt: skip
        notifier = Notifier(sessions, settings.notifications, poll_s=0.1)
        notifier.start()
        started.append(notifier)
        return jobs, notifier

    yield make
    for notifier in started:
        notifier.stop()
    engine.dispose()


def finish_jobs(jobs: JobRepository, n: int) -> list[int]:
    ids = []
    for _ in range(n):
        job = jobs.enqueue(dedupe_key=f"fault/{len(ids)}", route="chest", model="standin",
                           study_instance_uid=STUDY, state=JobState.QUEUED)  # fmt: skip
        assert jobs.claim("w", ["standin"]) is not None
        jobs.finish(job.id, "w", {"model": "standin", "version": "1", "demo": False,
                                  "findings": [nodule(0.0, 6.0)]})  # fmt: skip
        ids.append(job.id)
    return ids


def settled(queue: NotificationQueue, ids: list[int]) -> dict[int, tuple[str, int]]:
    states = {}
    for job_id in ids:
        [row] = queue.for_job(job_id)
        states[job_id] = (row.state, row.attempts)
    return states


@pytest.mark.slow
def test_a_ris_that_naks_then_hangs_gets_each_message_once(
    outbox: Callable[..., tuple[JobRepository, Notifier]],
) -> None:
    with MllpListener(script=["nak", "hang"]) as ris:
        jobs, notifier = outbox({"name": "ris", "kind": "hl7", "host": "127.0.0.1",
                                 "port": ris.port})  # fmt: skip
        ids = finish_jobs(jobs, 3)
        wait_until(lambda: len(ris.accepted) == 3, timeout=90, what="three messages taken",
                   detail=lambda: [(r.control_id, r.answer) for r in ris.received])  # fmt: skip
        states = wait_until(
            lambda: (s := settled(notifier.queue, ids)) and {v[0] for v in s.values()} == {SENT}
            and s, timeout=30, what="all marked sent")  # fmt: skip
    # the NAKed and the unanswered message were retried: one attempt more each
    assert sorted(attempts for _, attempts in states.values()) == [0, 1, 1]
    assert [r.answer for r in ris.received].count("AE") == 1
    assert [r.answer for r in ris.received].count("") == 1
    assert ris.duplicates() == []
    rows = [notifier.queue.for_job(i)[0] for i in ids]
    assert {r.delivery_key for r in rows} == set(ris.accepted)
    errors = {r.last_error for r in rows}  # cleared once sent
    assert errors == {None}


def test_a_webhook_that_answers_500_is_retried_and_takes_the_message_once(
    outbox: Callable[..., tuple[JobRepository, Notifier]],
) -> None:
    with WebhookReceiver(statuses=[500]) as hook:
        jobs, notifier = outbox({"name": "hook", "kind": "webhook", "url": hook.url})
        [job_id] = finish_jobs(jobs, 1)
        wait_until(lambda: settled(notifier.queue, [job_id])[job_id][0] == SENT, timeout=60,
                   what="the webhook's message sent")  # fmt: skip
    assert [r.status for r in hook.peer.requests] == [500, 200]
    assert hook.peer.requests[0].key == hook.peer.requests[1].key  # the retry is the same
    assert len(hook.peer.taken()) == 1 and hook.peer.duplicates() == []


def test_a_target_that_never_takes_it_is_given_up_after_its_attempts(
    outbox: Callable[..., tuple[JobRepository, Notifier]],
) -> None:
    with FhirServer(statuses=[503, 503, 503]) as fhir:
        jobs, notifier = outbox({"name": "fhir", "kind": "fhir", "url": fhir.url,
                                 "max_attempts": 3})  # fmt: skip
        [job_id] = finish_jobs(jobs, 1)
        wait_until(lambda: settled(notifier.queue, [job_id])[job_id] == (DEAD, 3), timeout=60,
                   what="the message given up")  # fmt: skip
        [row] = notifier.queue.for_job(job_id)
        assert "HTTP 503" in (row.last_error or "")
        assert fhir.reports() == [] and len(fhir.peer.requests) == 3
    with jobs.sessions() as session:
        events, _ = list_events(session, job_id=job_id, action="notify_failed")
    assert len(events) == 1 and "after 3 attempts" in (events[0].detail or "")


CONFIG = """
workers = []

[node]
storage_dir = "{storage}"

[[routes]]
name = "chest"
model = "lung_nodule"

[[notifications]]
name = "ris"
kind = "hl7"
host = "127.0.0.1"
port = {ris}
events = ["done"]
timeout_s = 1
backoff_s = 0.2
"""


@pytest.mark.slow
def test_a_serve_killed_while_the_ris_held_its_ack_sends_the_same_message_again(
    tmp_path: Path,
) -> None:
    """The RIS took the message but the serve died before its ACK came: after the restart the
    same message goes again, under the same control id, which the RIS files once."""
    storage = tmp_path / "node"
    with MllpListener(script=["hang"]) as ris:
        config = tmp_path / "node.toml"
        config.write_text(CONFIG.format(storage=storage, ris=ris.port))
        settings = load_settings(config)
        serve = ServeProcess(storage, config=config).start()
        database = open_database(settings, migrate=False)
        jobs = JobRepository(database.sessions, settings.queue,
                             policy=ReleasePolicy.from_settings(settings))  # fmt: skip
        try:
            with database.sessions.begin() as session:
                from datetime import UTC, datetime

                study = add_study(session, "k", "PID-K", "ACC-K", "Kill^Test", datetime.now(UTC))
            job = jobs.enqueue(dedupe_key="killed", route="chest", model="lung_nodule",
                               study_instance_uid=study, state=JobState.QUEUED)  # fmt: skip
            assert jobs.claim("test", ["lung_nodule"]) is not None
            jobs.finish(job.id, "test", {"model": "standin", "version": "1", "demo": False,
                                         "findings": []})  # fmt: skip
            wait_until(lambda: ris.received, timeout=90, what="the ORU at the RIS (unanswered)")
            serve.kill()
            [row] = NotificationQueue(database.sessions).for_job(job.id)
            assert row.state == "pending" and row.attempts == 0  # claimed, never marked
            serve.start()
            wait_until(lambda: NotificationQueue(database.sessions).for_job(job.id)[0].state
                       == SENT, timeout=60, what="the message sent after the restart")  # fmt: skip
        finally:
            serve.stop()
            database.engine.dispose()
    assert [r.control_id for r in ris.received] == [row.delivery_key] * 2
    assert list(ris.accepted) == [row.delivery_key] and ris.duplicates() == []
