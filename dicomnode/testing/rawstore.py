"""Send arbitrary bytes as a C-STORE dataset, to prove the receiver refuses bad input cleanly."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode


def encode_dataset(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> bytes:
    """Encode a dataset (without file meta) as it would travel in P-DATA."""
    data = encode(ds, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    assert data is not None, "dataset could not be encoded"
    return data


def send_raw(
    host: str,
    port: int,
    *,
    called_aet: str,
    sop_class: str,
    sop_instance: str,
    payload: bytes,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    calling_aet: str = "RAWSCU",
) -> int | None:
    """One association, one C-STORE of ``payload`` as it is; return the status (None: no reply).

    pynetdicom sends a file's bytes after its File Meta untouched when sending chunked, so the
    payload is wrapped in a File Meta naming the command's SOP class and instance.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "payload.dcm"
        with path.open("wb") as fp:
            fp.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(fp, meta, enforce_standard=True)
            fp.write(payload)
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(sop_class, [transfer_syntax])
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
    return int(status.Status) if "Status" in status else None
