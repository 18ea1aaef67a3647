"""Every bad input is refused with its DICOM status and reason, and good senders keep going."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

from dicomnode.app import Node
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import CT_IMAGE_STORAGE, write_series
from dicomnode.testing import peers
from dicomnode.testing.fuzz import lenient_pydicom
from dicomnode.testing.rawstore import encode_dataset, send_raw
from tests.helpers import instance_count, port_of

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _slice(seed: int = 3) -> Dataset:
    return next(ct_slices(SeriesSpec(slices=1, rows=32, columns=32, seed=seed)))


def _without(keyword: str) -> tuple[Dataset, bytes]:
    ds = _slice()
    delattr(ds, keyword)
    return ds, encode_dataset(ds)


def _changed(**values: object) -> tuple[Dataset, bytes]:
    ds = _slice()
    with lenient_pydicom():  # bad values on purpose
        for keyword, value in values.items():
            delattr(ds, keyword)  # a new element takes the lenient mode; the old one keeps RAISE
            setattr(ds, keyword, value)
        return ds, encode_dataset(ds)


def _truncated() -> tuple[Dataset, bytes]:
    ds = _slice()
    return ds, encode_dataset(ds)[:-700]


def _garbage() -> tuple[Dataset, bytes]:
    return _slice(), bytes(range(256)) * 8


def _empty_pixels() -> tuple[Dataset, bytes]:
    return _changed(PixelData=b"")


def _short_pixels() -> tuple[Dataset, bytes]:
    return _changed(PixelData=b"\0" * 100)


BAD_INPUTS = {
    "truncated": (_truncated, 0xC001),
    "garbage": (_garbage, 0xC001),
    "no-study-uid": (lambda: _without("StudyInstanceUID"), 0xC002),
    "no-series-uid": (lambda: _without("SeriesInstanceUID"), 0xC002),
    "no-sop-instance-uid": (lambda: _without("SOPInstanceUID"), 0xC002),
    "bad-uid": (lambda: _changed(SeriesInstanceUID="1.2.3/../../etc"), 0xC003),
    "sop-class-mismatch": (lambda: _changed(SOPClassUID=MR_IMAGE_STORAGE), 0xA900),
    "zero-length-pixel-data": (_empty_pixels, 0xC004),
    "short-pixel-data": (_short_pixels, 0xC005),
    "zero-rows": (lambda: _changed(Rows=0), 0xC006),
    "bits-allocated-13": (lambda: _changed(BitsAllocated=13), 0xC006),
    "samples-per-pixel-2": (lambda: _changed(SamplesPerPixel=2), 0xC006),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_its_status(
    node: Node, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    build, expected = BAD_INPUTS[case]
    ds, payload = build()
    instance_uid = str(getattr(ds, "SOPInstanceUID", "") or generate_uid())
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        status = send_raw(
            "127.0.0.1",
            port_of(node),
            called_aet="DICOMNODE",
            sop_class=CT_IMAGE_STORAGE,
            sop_instance=instance_uid,
            payload=payload,
        )
    assert status == expected, f"0x{status or 0:04X}"
    refusals = [r for r in caplog.records if getattr(r, "action", "") == "store_refused"]
    assert len(refusals) == 1 and f"0x{expected:04X}" in refusals[0].getMessage()
    assert instance_count(node) == 0
    assert not list(node.spool.data.rglob("*.dcm")) and not list(node.spool.incoming.iterdir())


def test_sop_instance_differing_from_request_is_refused(node: Node) -> None:
    ds = _slice()
    status = send_raw(
        "127.0.0.1",
        port_of(node),
        called_aet="DICOMNODE",
        sop_class=CT_IMAGE_STORAGE,
        sop_instance=generate_uid(),
        payload=encode_dataset(ds),
    )
    assert status == 0xA900
    assert instance_count(node) == 0


def test_encapsulated_pixel_data_with_only_empty_fragments_is_refused(node: Node) -> None:
    ds = _slice()
    item = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty item: offset table, then a fragment
    ds.PixelData = item + item
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    status = send_raw(
        "127.0.0.1",
        port_of(node),
        called_aet="DICOMNODE",
        sop_class=CT_IMAGE_STORAGE,
        sop_instance=ds.SOPInstanceUID,
        payload=encode_dataset(ds),
        transfer_syntax=RLELossless,
    )
    assert status == 0xC004


@pytest.mark.slow
def test_good_sender_succeeds_while_bad_input_is_refused(node: Node, tmp_path: Path) -> None:
    files = write_series(
        ct_slices(SeriesSpec(slices=60, rows=256, columns=256, seed=11)), tmp_path / "good"
    )
    outcome: dict[str, object] = {}

    def good_sender() -> None:
        outcome["result"] = peers.storescu(port_of(node), files)

    sender = threading.Thread(target=good_sender)
    sender.start()
    statuses = []
    for round_ in range(3):
        for case in sorted(BAD_INPUTS):
            build, expected = BAD_INPUTS[case]
            ds, payload = build()
            uid = str(getattr(ds, "SOPInstanceUID", "") or generate_uid())
            statuses.append(
                (
                    case,
                    round_,
                    expected,
                    send_raw(
                        "127.0.0.1",
                        port_of(node),
                        called_aet="DICOMNODE",
                        sop_class=CT_IMAGE_STORAGE,
                        sop_instance=uid,
                        payload=payload,
                    ),
                )
            )
    sender.join(timeout=300)
    assert [s for s in statuses if s[2] != s[3]] == []
    result = outcome["result"]
    assert result.returncode == 0, result.stderr  # type: ignore[attr-defined]
    assert instance_count(node) == 60
    assert peers.echoscu(port_of(node)).returncode == 0
