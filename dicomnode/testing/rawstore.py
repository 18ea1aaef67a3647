"""Send arbitrary bytes as a C-STORE dataset, to prove the receiver refuses bad input cleanly."""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
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
    """One association, one C-STORE of ``payload``; return the response status (None: no reply)."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, [transfer_syntax])
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        return None
    try:
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = sop_class
        request.AffectedSOPInstanceUID = sop_instance
        request.Priority = 2
        request.DataSet = BytesIO(payload)
        context = assoc.accepted_contexts[0]
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
        return None if response is None else int(response.Status)
    finally:
        if assoc.is_established:
            assoc.release()
