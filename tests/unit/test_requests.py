"""The requests table on SQLite and PostgreSQL: a transaction id names one request per client,
due requests come most urgent first, one runner takes each, backoff doubles."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from dicomnode.config import Settings
from dicomnode.db import make_session_factory
from dicomnode.domain import Priority, RequestState
from dicomnode.errors import InvalidQuery, RequestConflict
from dicomnode.fetch.query import StudyQuery
from dicomnode.fetch.requests import RequestRepository, RequestSpec
from dicomnode.testing.jobs import Clock

UID = "1.2.826.0.1.3680043.99.3001"


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 3, 21, 0, tzinfo=UTC))


@pytest.fixture
def requests(engine: Engine, clock: Clock) -> RequestRepository:
    return RequestRepository(make_session_factory(engine), clock=clock)


def spec(**values: object) -> RequestSpec:
    return RequestSpec(**{"source": "pacs", "study_instance_uid": UID, **values})  # type: ignore[arg-type]


def test_a_transaction_id_names_one_request_per_client(requests: RequestRepository) -> None:
    first, created = requests.submit(spec(transaction_id="t"), client="token:ris", max_attempts=3)
    again, created_again = requests.submit(
        spec(transaction_id="t"), client="token:ris", max_attempts=3
    )
    assert created and not created_again and again.id == first.id
    other, made = requests.submit(spec(transaction_id="t"), client="token:pacs", max_attempts=3)
    assert made and other.id != first.id  # another client's id is its own
    with pytest.raises(RequestConflict, match=f"already names request {first.id}"):
        requests.submit(spec(transaction_id="t", route="other"), client="token:ris",
                        max_attempts=3)  # fmt: skip
    untagged = [requests.submit(spec(), client="cli", max_attempts=3)[0].id for _ in range(2)]
    assert len(set(untagged)) == 2  # without an id, each ask is a request


def test_due_requests_come_most_urgent_first_and_one_runner_takes_each(
    requests: RequestRepository, clock: Clock
) -> None:
    routine = requests.submit(spec(), client="c", max_attempts=3)[0]
    stat = requests.submit(spec(priority=Priority.STAT), client="c", max_attempts=3)[0]
    assert [r.id for r in requests.due()] == [stat.id, routine.id]
    assert requests.start(stat.id) and not requests.start(stat.id)
    taken = requests.get(stat.id)
    assert taken.state is RequestState.RETRIEVING and taken.attempts == 1
    due = requests.backoff(taken, 10, 25)
    requests.set(stat.id, state=RequestState.PARTIAL, next_attempt_at=due)
    assert [r.id for r in requests.due()] == [routine.id]  # waiting out its backoff
    clock.advance(10)
    assert [r.id for r in requests.due()] == [stat.id, routine.id]
    requests.start(stat.id)
    assert requests.backoff(requests.get(stat.id), 10, 25) == clock.now + timedelta(seconds=20)


def test_an_ask_is_checked_against_the_configuration() -> None:
    settings = Settings(
        sources=[{"name": "pacs", "url": "http://pacs/dicom-web"}],
        routes=[{"name": "chest", "model": "lung_nodule", "priority": "urgent"}],
    )
    checked = spec(route="chest").checked(settings)
    assert checked.priority is Priority.URGENT  # the route's, when the ask names none
    for bad, why in (
        (spec(accession_number="A"), "exactly one of"),
        (spec(route="chest", model="m"), "not both"),
        (spec(source="x"), "no source 'x'"),
        (spec(route="x"), "no route 'x'"),
        (spec(study_instance_uid="1.02.3"), "not digits and dots"),
        (spec(study_instance_uid=None, accession_number="A*"), "without a wildcard"),
    ):
        with pytest.raises(InvalidQuery, match=why):
            bad.checked(settings)
    with pytest.raises(InvalidQuery, match="no model 'm' is available"):
        spec(model="m").checked(settings, ["lung_nodule"])


def test_a_backfill_query_splits_study_and_series_attributes() -> None:
    query = StudyQuery.parse("Modality=CT&StudyDate=20261101-20261130&BodyPartExamined=CHEST,LUNG")
    assert dict(query.study) == {"ModalitiesInStudy": "CT", "StudyDate": "20261101-20261130"}
    assert dict(query.series) == {"Modality": ("CT",), "BodyPartExamined": ("CHEST", "LUNG")}
    for bad, why in (("", "names no attribute"), ("Modaliti=CT", "not a DICOM keyword"),
                     ("StudyDate=last-week", "not a date or range")):  # fmt: skip
        with pytest.raises(InvalidQuery, match=why):
            StudyQuery.parse(bad)
