"""Deflated datasets are inflated on receipt within a hard cap; UIDs and pixel sizes are bounded.

A deflate bomb (a small image padded with a large element of zeros) is refused with its status
once it inflates past the limit, never held in memory; a real deflated file becomes the same
dataset in explicit VR little endian.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomnode.errors import (
    DatasetTooLarge,
    InvalidIdentifier,
    MalformedDataset,
    OutOfResources,
)
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.receive.inflate import inflate_in_place
from dicomnode.receive.validate import Limits, is_valid_uid, read_header, scan
from dicomnode.testing.bombs import bomb, deflate_bomb
from dicomnode.testing.fuzz import lenient_pydicom
from tests.helpers import assert_same_dataset


def _never_full() -> None:
    pass


def test_real_deflated_file_becomes_the_same_dataset(tmp_path: Path) -> None:
    source = Path(get_testdata_file("image_dfl.dcm"))
    copy = tmp_path / "in.dcm"
    copy.write_bytes(source.read_bytes())
    assert dcmread(copy, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_deflated
    size = inflate_in_place(copy, limit=1 << 30, check_disk=_never_full)
    assert dcmread(copy).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert size == copy.stat().st_size - _meta_length(copy)
    assert_same_dataset(source, copy)
    assert scan(copy).transfer_syntax == ExplicitVRLittleEndian
    ds = dcmread(source, stop_before_pixels=True)
    header = read_header(
        copy, expected_sop_class=ds.SOPClassUID, expected_sop_instance=ds.SOPInstanceUID
    )
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert list(tmp_path.iterdir()) == [copy], "no temporary file is left beside it"


def _meta_length(path: Path) -> int:
    from dicomnode.receive.inflate import meta_end

    with path.open("rb") as fp:
        return meta_end(fp)


def test_bomb_is_refused_past_the_limit_and_leaves_nothing(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb(64 << 20))
    assert bomb.stat().st_size < 200_000  # 64 MB of zeros deflate to about 64 kB
    with pytest.raises(DatasetTooLarge, match="max_inflated_mb") as refused:
        inflate_in_place(bomb, limit=8 << 20, check_disk=_never_full)
    assert refused.value.dicom_status == 0xC007
    assert list(tmp_path.iterdir()) == [bomb], "the partial inflated copy is removed"


def test_bomb_under_the_limit_is_an_ordinary_file(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb(4 << 20))
    inflate_in_place(bomb, limit=8 << 20, check_disk=_never_full)
    assert bomb.stat().st_size > 4 << 20
    ds = dcmread(bomb, stop_before_pixels=True, defer_size=1 << 20)
    assert ds.Modality == "CT"


def test_disk_floor_is_checked_while_inflating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflate_bomb(200 << 20))
    calls = []

    def filling_up() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise OutOfResources("free disk space is below the floor")

    with pytest.raises(OutOfResources):
        inflate_in_place(bomb, limit=1 << 30, check_disk=filling_up)
    assert len(calls) == 3  # at the start, after 64 MB and after 128 MB
    assert list(tmp_path.iterdir()) == [bomb]


@pytest.mark.parametrize("cut", [50, 2000])
def test_truncated_deflate_is_found(tmp_path: Path, cut: int) -> None:
    whole = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole[:-cut])
    with pytest.raises(MalformedDataset, match=r"truncated|inflated"):
        inflate_in_place(path, limit=1 << 30, check_disk=_never_full)


def test_garbage_after_the_meta_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(deflate_bomb(1 << 20)[:400] + b"\xff" * 300)
    with pytest.raises(MalformedDataset):
        inflate_in_place(path, limit=1 << 30, check_disk=_never_full)


def test_scan_refuses_a_deflated_file_not_inflated_first(tmp_path: Path) -> None:
    with pytest.raises(MalformedDataset, match="inflated"):
        scan(Path(get_testdata_file("image_dfl.dcm")))


@pytest.mark.parametrize(
    ("uid", "strict", "lenient"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True, True),
        ("0.1.2", True, True),
        ("1.2.3\n", False, False),
        ("1.2.3\n4", False, False),
        ("1.02.003", False, True),
        ("01.2", False, True),
        ("1..2", False, False),
        ("1.2.", False, False),
        ("", False, False),
        ("1." * 32 + "1", False, False),  # 65 characters
    ],
)
def test_uids_are_matched_whole(uid: str, strict: bool, lenient: bool) -> None:
    assert is_valid_uid(uid) is strict
    assert is_valid_uid(uid, lenient=True) is lenient


def _ct(tmp_path: Path, **changes: object) -> tuple[Path, Dataset]:
    ds = next(ct_slices(SeriesSpec(slices=1, rows=16, columns=16)))
    path = tmp_path / "ct.dcm"
    with lenient_pydicom():
        for keyword, value in changes.items():
            ds.add_new(keyword, dictionary_VR(keyword), value)
        ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_study_uid_with_a_newline_or_leading_zeros_is_refused(tmp_path: Path) -> None:
    for bad in ("1.2.3.4\n", "1.02.3"):
        path, ds = _ct(tmp_path, StudyInstanceUID="1.2.3.45")
        # pydicom strips the newline when it writes: put the sender's bytes in by hand
        path.write_bytes(path.read_bytes().replace(b"1.2.3.45", bad.encode().ljust(8, b"\0")))
        with pytest.raises(InvalidIdentifier, match="StudyInstanceUID"):
            read_header(
                path, expected_sop_class=ds.SOPClassUID, expected_sop_instance=ds.SOPInstanceUID
            )
    header = read_header(
        path,
        expected_sop_class=ds.SOPClassUID,
        expected_sop_instance=ds.SOPInstanceUID,
        limits=Limits(lenient_uids=True),
    )
    assert header.study_instance_uid == "1.02.3"


def test_declared_pixel_size_is_bounded(tmp_path: Path) -> None:
    path, ds = _ct(tmp_path)
    limits = Limits(max_pixel_bytes=16 * 16 * 2 - 1)
    with pytest.raises(DatasetTooLarge, match="max_pixel_data_mb"):
        read_header(
            path,
            expected_sop_class=ds.SOPClassUID,
            expected_sop_instance=ds.SOPInstanceUID,
            limits=limits,
        )


def test_deflate_bomb_helper_is_a_valid_deflated_image(tmp_path: Path) -> None:
    data = deflate_bomb(1 << 20)
    path = tmp_path / "b.dcm"
    path.write_bytes(data)
    meta = dcmread(path, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert len(data) < (1 << 20) // 200
    inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(
        data[len(data) - len(bomb(1 << 20).payload) :]
    )
    assert len(inflated) == bomb(1 << 20).inflated > 1 << 20
