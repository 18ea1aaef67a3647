"""Retention removes old studies' files and rows, never those an unfinished job still needs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select, update

from dicomnode.app import Node
from dicomnode.db.models import Instance, Patient, Study
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.queue.repository import JobRepository
from dicomnode.retention import purge_studies
from dicomnode.testing import peers
from tests.helpers import port_of


def _send(node: Node, tmp_path: Path, seed: int, patient: str) -> str:
    files = write_series(ct_slices(SeriesSpec(slices=3, seed=seed, patient_id=patient)),
                         tmp_path / str(seed))  # fmt: skip
    assert peers.storescu(port_of(node), files).returncode == 0
    return str(dcmread(files[0]).StudyInstanceUID)


def _age(node: Node, study_uid: str, days: float) -> None:
    with node.database.sessions.begin() as session:
        session.execute(
            update(Study).where(Study.study_instance_uid == study_uid)
            .values(last_received_at=datetime.now(UTC) - timedelta(days=days))
        )  # fmt: skip


def test_old_studies_go_unless_a_job_needs_them(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(background=False)
    old, busy, recent = (_send(node, tmp_path, seed, f"P{seed}") for seed in (61, 62, 63))
    _age(node, old, 40)
    _age(node, busy, 40)
    JobRepository(node.database.sessions).enqueue(
        dedupe_key="busy", route="r", model="echo", study_instance_uid=busy, state="queued"
    )
    removed = purge_studies(node.database.sessions, node.spool,
                            datetime.now(UTC) - timedelta(days=30))  # fmt: skip
    assert removed == 1
    with node.database.sessions() as session:
        studies = set(session.scalars(select(Study.study_instance_uid)))
        patients = set(session.scalars(select(Patient.patient_id)))
        instances = session.scalar(select(func.count(Instance.id)))
    assert studies == {busy, recent}
    assert patients == {"P62", "P63"}  # the old study's patient had nothing else
    assert instances == 6
    assert not (node.spool.data / old).exists()
    assert len(list((node.spool.data / busy).rglob("*.dcm"))) == 3
    assert purge_studies(node.database.sessions, node.spool, datetime.now(UTC)
                         - timedelta(days=30)) == 0  # fmt: skip
