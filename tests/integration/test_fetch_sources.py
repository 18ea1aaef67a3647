"""The sources against a real PACS, Orthanc on loopback: C-FIND at each level, C-MOVE to the
node's receiver, C-GET and QIDO-RS/WADO-RS stored through the node's store; what each brings
is indexed as coming from that source; a source that is down or lacks the study says so."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomnode.app import Node
from dicomnode.db.models import Instance, Series
from dicomnode.errors import SourceUnavailable
from dicomnode.fetch.sources import open_source
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.peers import LOOPBACK, storescu
from tests.helpers import port_of

STUDY = "1.2.826.0.1.3680043.99.2001"
SERIES = [f"{STUDY}.1", f"{STUDY}.2"]
RETRIEVES = ["move", "get", "dicomweb"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("study")
    paths = []
    for number, (series, slices) in enumerate(zip(SERIES, (8, 3), strict=True)):
        spec = SeriesSpec(slices=slices, study_uid=STUDY, series_uid=series, seed=number)
        paths += write_series(ct_slices(spec), folder / str(number))
    return paths


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", dicomweb=True, sync_storage=False)
    yield server
    server.stop(graceful=False)


def node_and_pacs(
    start_node: Callable[..., Node], pacs: Orthanc, retrieve: str, files: list[Path]
) -> Node:
    """A node with ``pacs`` as source "pacs"; the PACS knows the node (to C-MOVE to it) and
    holds ``files``."""
    node = start_node(sources=[pacs.source("pacs", retrieve)])
    pacs.modalities = {"node": (node.settings.node.ae_title, LOOPBACK, port_of(node))}
    pacs.start()
    assert storescu(pacs.dicom_port, files, called_aet=pacs.ae_title).returncode == 0
    return node


def indexed(node: Node) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID -> (series, calling AE, calling host) of what the node holds."""
    with node.database.sessions() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Series.series_instance_uid, Instance.calling_aet,
                   Instance.calling_host).join(Series, Instance.series_pk == Series.id)
        ).all()  # fmt: skip
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


@pytest.mark.parametrize("retrieve", RETRIEVES)
def test_a_source_finds_and_retrieves_a_study_whole_or_in_part(
    start_node: Callable[..., Node], pacs: Orthanc, study: list[Path], retrieve: str
) -> None:
    node = node_and_pacs(start_node, pacs, retrieve, study)
    source = open_source(node.settings, "pacs", node.store)

    found = source.find_studies({"AccessionNumber": "ACC0001"})
    assert [s.study_instance_uid for s in found] == [STUDY]
    assert found[0].patient_id == "PHANTOM-1" and found[0].modalities == ("CT",)
    assert source.find_studies({"AccessionNumber": "NO-SUCH"}) == []
    series = {s.series_instance_uid: s for s in source.find_series(STUDY)}
    assert {uid: s.expected for uid, s in series.items()} == {SERIES[0]: 8, SERIES[1]: 3}
    assert series[SERIES[0]].modality == "CT"
    assert source.find_series("1.2.3.4.5.6") == []
    sops = source.find_instances(STUDY, SERIES[0])
    assert len(sops) == 8

    # two instances of the first series, then the second series, then the whole study
    outcome = source.retrieve(STUDY, SERIES[0], sops[:2])
    assert not outcome.error
    assert set(indexed(node)) == set(sops[:2])
    assert not source.retrieve(STUDY, SERIES[1]).error
    assert {v[0] for v in indexed(node).values()} == set(SERIES)
    assert len(indexed(node)) == 5
    assert not source.retrieve(STUDY).error
    held = indexed(node)
    assert len(held) == 11
    # each instance names where it came from: the source's AE title and host (DICOMweb: its
    # name and the URL's host)
    expected = ("pacs", LOOPBACK) if retrieve == "dicomweb" else (pacs.ae_title, LOOPBACK)
    assert {(aet, host) for _, aet, host in held.values()} == {expected}


@pytest.mark.parametrize("retrieve", RETRIEVES)
def test_a_source_that_is_down_says_so(
    start_node: Callable[..., Node], pacs: Orthanc, retrieve: str
) -> None:
    node = start_node(sources=[pacs.source("pacs", retrieve, timeout_s=5)])
    source = open_source(node.settings, "pacs", node.store)
    with pytest.raises(SourceUnavailable, match="pacs"):
        source.find_studies({"AccessionNumber": "ACC0001"})
