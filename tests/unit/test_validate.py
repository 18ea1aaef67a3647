"""The structure walk finds truncation anywhere, in every encoding; good files pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.errors import EmptyPixelData, MalformedDataset, SOPClassMismatch
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.receive.validate import read_header, scan


def _nested_slice(syntax: str) -> Dataset:
    ds = next(ct_slices(SeriesSpec(slices=1, rows=16, columns=16)))
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D3000", "SRT", "Chest"
    item = Dataset()
    item.AnatomicRegionSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _save(ds: Dataset, path: Path, undefined_lengths: bool) -> Path:
    if undefined_lengths:
        ds.ReferencedImageSequence.is_undefined_length = True  # type: ignore[attr-defined]
        ds["ReferencedImageSequence"].is_undefined_length = True
        for item in ds.ReferencedImageSequence:
            item.is_undefined_length_sequence_item = True
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined-lengths"])
def test_every_cut_is_found(tmp_path: Path, syntax: str, undefined: bool) -> None:
    path = _save(_nested_slice(syntax), tmp_path / "whole.dcm", undefined)
    whole = path.read_bytes()
    assert scan(path).pixel.length == 16 * 16 * 2
    meta_end = len(whole) - len(dcmread(path).PixelData) - 200  # well inside the dataset
    ds = dcmread(path, stop_before_pixels=True)
    for cut in range(meta_end, len(whole), 7):
        cut_path = tmp_path / "cut.dcm"
        cut_path.write_bytes(whole[:cut])
        # Mid-element cuts break the structure; a cut at an element boundary drops Pixel Data.
        with pytest.raises((MalformedDataset, EmptyPixelData)):
            read_header(
                cut_path, expected_sop_class=ds.SOPClassUID, expected_sop_instance=ds.SOPInstanceUID
            )


def test_sop_class_mismatch_names_both() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = dcmread(path, stop_before_pixels=True)
    with pytest.raises(SOPClassMismatch, match=r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.4"):
        read_header(
            path,
            expected_sop_class="1.2.840.10008.5.1.4.1.1.4",
            expected_sop_instance=ds.SOPInstanceUID,
        )


HEADER_FIELDS = {
    "patient_id": "PatientID", "patient_name": "PatientName", "patient_sex": "PatientSex",
    "patient_birth_date": "PatientBirthDate", "study_date": "StudyDate",
    "study_description": "StudyDescription", "accession_number": "AccessionNumber",
    "modality": "Modality", "series_number": "SeriesNumber",
    "series_description": "SeriesDescription", "instance_number": "InstanceNumber",
    "rows": "Rows", "columns": "Columns", "frame_of_reference_uid": "FrameOfReferenceUID",
}  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "rtdose.dcm",
        "SC_rgb_rle_2frame.dcm",
        "JPEG2000.dcm",
    ],
)
def test_header_matches_pydicom(name: str) -> None:
    path = Path(get_testdata_file(name))
    ds = dcmread(path, stop_before_pixels=True)
    header = read_header(
        path, expected_sop_class=ds.SOPClassUID, expected_sop_instance=ds.SOPInstanceUID
    )
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    for field, keyword in HEADER_FIELDS.items():
        expected = ds.get(keyword)
        if expected is None or expected == "":
            continue
        value = getattr(header, field)
        assert value == (int(expected) if isinstance(value, int) else str(expected)), field


@pytest.mark.parametrize(
    "charset,name",
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Иванов^Пётр"),
        ("ISO_IR 144", "Иванов^Пётр"),
    ],
)
def test_patient_name_in_character_sets(tmp_path: Path, charset: str, name: str) -> None:
    ds = next(ct_slices(SeriesSpec(slices=1, rows=8, columns=8)))
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    path = tmp_path / "named.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = read_header(
        path, expected_sop_class=ds.SOPClassUID, expected_sop_instance=ds.SOPInstanceUID
    )
    assert header.patient_name == name


def test_file_meta_matches_pydicom() -> None:
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from dicomnode.receive.spool import file_meta

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "DICOMNODE_010"
    meta.SourceApplicationEntityTitle = "CT1"
    expected = io.BytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    assert file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4.5",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        implementation_class_uid="1.2.826.0.1.3680043.8.498.1",
        implementation_version="DICOMNODE_010", source_aet="CT1",
    ) == expected.getvalue()  # fmt: skip
