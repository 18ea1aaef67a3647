"""What the fetch tests share: a node whose source is Orthanc (which knows the node, so it can
C-MOVE to it), phantom studies to put in the PACS, and waiting on a request."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, select

from dicomnode.app import Node
from dicomnode.db.models import Instance, Job, Series, Study
from dicomnode.domain import RequestState
from dicomnode.fetch.requests import RequestRecord, RequestRepository
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.peers import LOOPBACK, storescu
from dicomnode.testing.waiting import wait_until
from tests.helpers import port_of

TOKEN = "test-token-operate-0123456789"
READER = "test-token-read-0123456789ab"
FAST = {"backoff_s": 0.3, "max_backoff_s": 1.0, "timeout_s": 10}
#: a route for the tests' echo model: CT series of at least 5 slices
CHEST = {"name": "chest", "model": "echo", "match": {"Modality": "CT", "slices": {"min": 5}}}


def write_study(
    folder: Path,
    study_uid: str,
    slices: Sequence[int],
    *,
    rows: int = 64,
    attributes: Mapping[str, str] | None = None,
    **spec: Any,
) -> list[Path]:
    """A CT study of one series per entry of ``slices`` (``<study>.<n>``), accession ACC0001
    unless ``attributes`` (keyword -> value, set on every instance) say otherwise."""
    paths: list[Path] = []
    for number, count in enumerate(slices, start=1):
        series = SeriesSpec(slices=count, study_uid=study_uid, series_uid=f"{study_uid}.{number}",
                            seed=number, rows=rows, columns=rows, **spec)  # fmt: skip

        def edited(datasets: Iterable[Dataset]) -> Iterator[Dataset]:
            for ds in datasets:
                for keyword, value in (attributes or {}).items():
                    setattr(ds, keyword, value)
                yield ds

        paths += write_series(edited(ct_slices(series)), folder / str(number))
    return paths


def start_with_pacs(
    start_node: Callable[..., Node],
    pacs: Orthanc,
    retrieve: str,
    files: Sequence[Path] = (),
    **sections: Any,
) -> Node:
    """A node with ``pacs`` as its source "pacs" (quick retries), the chest route and an API
    (operate token ``TOKEN``, read-only ``READER``); the PACS started knowing the node, holding
    ``files``."""
    sections.setdefault("routes", [CHEST])
    sections.setdefault(
        "api", {"token": TOKEN, "tokens": {"monitor": {"secret": READER, "scopes": ["read"]}}}
    )
    source = pacs.source("pacs", retrieve, **FAST, **sections.pop("source", {}))
    node = start_node(sources=[source], **sections)
    pacs.modalities = {"node": (node.settings.node.ae_title, LOOPBACK, port_of(node))}
    pacs.start()
    if files:
        assert storescu(pacs.dicom_port, list(files), called_aet=pacs.ae_title).returncode == 0
    return node


def wait_request(
    node: Node, request_id: int, *states: RequestState, timeout: float = 60.0
) -> RequestRecord:
    """The request once it is in one of ``states`` (default: done or failed)."""
    wanted = states or (RequestState.DONE, RequestState.FAILED)
    requests = RequestRepository(node.database.sessions)

    def reached() -> RequestRecord | None:
        record = requests.get(request_id)
        return record if record.state in wanted else None

    return wait_until(
        reached, timeout=timeout, what=f"request {request_id} {'/'.join(wanted)}",
        detail=lambda: requests.get(request_id),
    )  # fmt: skip


def study_instances(node: Node, study_uid: str) -> int:
    with node.database.sessions() as session:
        return int(session.scalar(
            select(func.count(Instance.id)).join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id).where(Study.study_instance_uid == study_uid)
        ) or 0)  # fmt: skip


def study_jobs(node: Node, study_uid: str) -> list[Job]:
    with node.database.sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.study_instance_uid == study_uid)))
        session.expunge_all()
    return jobs
