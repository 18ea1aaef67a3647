"""Small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import joinedload

from dicomnode.app import Node
from dicomnode.db.models import Instance, Series, Study

TRAILING_PADDING = 0xFFFCFFFC


def port_of(node: Node) -> int:
    return node.receiver.address[1]


def instance_count(node: Node) -> int:
    with node.database.sessions() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def stored_instance(node: Node, sop_instance_uid: str) -> Instance | None:
    with node.database.sessions() as session:
        return session.scalar(
            select(Instance)
            .options(joinedload(Instance.series).joinedload(Series.study).joinedload(Study.patient))
            .where(Instance.sop_instance_uid == sop_instance_uid)
        )


def assert_same_dataset(sent: Path, stored: Path) -> None:
    """The stored file holds the sent dataset element for element, pixel data included."""
    original, received = dcmread(sent), dcmread(stored)
    # A deflated dataset is stored inflated (receive.inflate): the same elements, unpacked.
    sent_syntax = original.file_meta.TransferSyntaxUID
    expected = ExplicitVRLittleEndian if sent_syntax.is_deflated else sent_syntax
    assert received.file_meta.TransferSyntaxUID == expected
    # The sender may drop group lengths and the trailing padding (dcmtk does); nothing else.
    sent_tags = {t for t in original.keys() if t.element != 0 and t != TRAILING_PADDING}  # noqa: SIM118 (a Dataset yields elements)
    stored_tags = {t for t in received.keys() if t.element != 0 and t != TRAILING_PADDING}  # noqa: SIM118
    assert stored_tags == sent_tags
    for tag in sent_tags:
        assert received[tag].value == original[tag].value, f"{tag} differs"
