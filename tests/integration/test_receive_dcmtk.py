"""dcmtk's storescu and echoscu, the real sender, against the node."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomnode.app import Node
from dicomnode.db.index import list_studies
from dicomnode.phantoms.simple import SeriesSpec, ct_slices, multiframe
from dicomnode.phantoms.writer import (
    ENHANCED_CT_IMAGE_STORAGE,
    ENHANCED_MR_IMAGE_STORAGE,
    OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE,
    OPHTHALMIC_TOMOGRAPHY_STORAGE,
    write_series,
)
from dicomnode.testing import peers
from tests.helpers import assert_same_dataset, instance_count, port_of, stored_instance

# pydicom's real test files, one per transfer syntax the receiver must store as received.
REAL_FILES = {
    "CT_small.dcm": "explicit VR little endian",
    "MR_small.dcm": "explicit VR little endian",
    "MR_small_implicit.dcm": "implicit VR little endian",
    "MR_small_bigendian.dcm": "explicit VR big endian",
    "image_dfl.dcm": "deflated explicit VR little endian",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline",
    "JPGExtended.dcm": "JPEG extended",
    "SC_rgb_jpeg_gdcm.dcm": "JPEG lossless SV1",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "JPEG2000.dcm": "JPEG 2000",
    "MR_small_RLE.dcm": "RLE lossless",
    "SC_rgb_rle_2frame.dcm": "RLE lossless, multi-frame",
}


def test_echo(node: Node) -> None:
    result = peers.echoscu(port_of(node))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", sorted(REAL_FILES), ids=lambda n: REAL_FILES[n])
def test_real_file_is_stored_as_received(node: Node, name: str) -> None:
    source = Path(get_testdata_file(name))
    header = dcmread(source, stop_before_pixels=True)
    syntax = str(header.file_meta.TransferSyntaxUID)
    result = peers.storescu(port_of(node), [source], transfer_syntax=syntax)
    assert result.returncode == 0, result.stderr

    sop_uid = str(header.SOPInstanceUID)
    row = stored_instance(node, sop_uid)
    assert row is not None
    stored = node.spool.path(row.path)
    assert row.size_bytes == stored.stat().st_size
    assert_same_dataset(source, stored)
    assert not list(node.spool.incoming.iterdir()), "no temporary file may be left behind"


def test_pydicom_ct_and_mr_series(node: Node) -> None:
    folder = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and p.parent.name in ("CT2", "CT3", "MR1", "MR2", "MR700")
    ]
    result = peers.storescu(port_of(node), files)
    assert result.returncode == 0, result.stderr
    assert instance_count(node) == len(files)
    for source in files:
        row = stored_instance(node, str(dcmread(source, stop_before_pixels=True).SOPInstanceUID))
        assert row is not None, source
        assert_same_dataset(source, node.spool.path(row.path))


def test_generated_series_is_indexed(node: Node, tmp_path: Path) -> None:
    spec = SeriesSpec(slices=20, rows=128, columns=128, seed=7)
    files = write_series(ct_slices(spec), tmp_path / "ct")
    result = peers.storescu(port_of(node), files, calling_aet="CT_SCANNER")
    assert result.returncode == 0, result.stderr

    with node.database.sessions() as session:
        (study,) = list_studies(session)
    first = dcmread(files[0])
    assert study.study_instance_uid == first.StudyInstanceUID
    assert (study.patient_id, study.patient_name) == ("PHANTOM-1", "Phantom^Chest")
    assert (study.series_count, study.instance_count) == (1, 20)
    assert study.modalities == ("CT",)
    assert study.size_bytes == sum(
        node.spool.path(stored_instance(node, dcmread(f).SOPInstanceUID).path).stat().st_size
        for f in files
    )
    row = stored_instance(node, first.SOPInstanceUID)
    assert (row.calling_aet, row.calling_host) == ("CT_SCANNER", "127.0.0.1")
    assert (row.rows, row.columns, row.instance_number) == (128, 128, 1)
    assert row.series.series_instance_uid == first.SeriesInstanceUID
    assert row.series.study.accession_number == "ACC0001"


@pytest.mark.parametrize(
    "sop_class,colour",
    [
        (ENHANCED_CT_IMAGE_STORAGE, False),
        (ENHANCED_MR_IMAGE_STORAGE, False),
        (OPHTHALMIC_TOMOGRAPHY_STORAGE, False),
        (OPHTHALMIC_PHOTOGRAPHY_8BIT_STORAGE, True),
    ],
    ids=["enhanced-ct", "enhanced-mr", "oct", "fundus-photo"],
)
def test_multiframe_and_ophthalmic_classes(
    node: Node, tmp_path: Path, sop_class: str, colour: bool
) -> None:
    ds = multiframe(sop_class, frames=6, colour=colour)
    (path,) = write_series([ds], tmp_path / "mf")
    result = peers.storescu(port_of(node), [path])
    assert result.returncode == 0, result.stderr
    row = stored_instance(node, ds.SOPInstanceUID)
    assert row is not None and row.number_of_frames == 6 and row.sop_class_uid == sop_class
    assert_same_dataset(path, node.spool.path(row.path))


@pytest.mark.slow
def test_four_senders_at_once(node: Node, tmp_path: Path) -> None:
    import concurrent.futures

    batches = [
        write_series(
            ct_slices(SeriesSpec(slices=40, rows=256, columns=256, seed=s)), tmp_path / f"s{s}"
        )
        for s in range(4)
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: peers.storescu(port_of(node), files), batches))
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    assert instance_count(node) == 160
