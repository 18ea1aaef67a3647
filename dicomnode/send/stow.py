"""DICOMweb STOW-RS (PS3.18 10.5) with dicomweb-client: a batch of files in one request."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom import dcmread

from dicomnode.errors import DestinationUnavailable

logger = logging.getLogger(__name__)


def store_files(
    url: str,
    paths: Sequence[Path],
    *,
    headers: Mapping[str, str] | None = None,
    token: str = "",
    timeout: float = 60.0,
) -> list[str | None]:
    """POST the files to ``{url}/studies`` in one multipart request; per file, None when the
    service stored it, else why not. Raises DestinationUnavailable when the service could not
    be reached or refused the whole request (the queue retries those later)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    errors: list[str | None] = [None] * len(paths)
    datasets = []
    readable = []
    for index, path in enumerate(paths):
        try:
            datasets.append(dcmread(path))
            readable.append(index)
        except Exception as exc:  # a missing or damaged file fails alone
            errors[index] = f"not readable: {exc or type(exc).__name__}"
    if not datasets:
        return errors
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(url, headers=all_headers, timeout=timeout)
    client.set_http_retry_params(retry=False)  # the send queue retries, with its backoff
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DestinationUnavailable(f"STOW-RS to {url} answered HTTP {status}: {exc}") from exc
    except (requests.RequestException, OSError) as exc:
        raise DestinationUnavailable(f"STOW-RS to {url} failed: {exc}") from exc
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): item.get("FailureReason")
        for item in response.get("FailedSOPSequence", [])
    }
    stored = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in response.get("ReferencedSOPSequence", [])
    }
    for index, dataset in zip(readable, datasets, strict=True):
        uid = str(dataset.SOPInstanceUID)
        if uid in failed:
            errors[index] = f"STOW-RS failure reason 0x{int(failed[uid] or 0):04X}"
        elif stored and uid not in stored:
            errors[index] = "STOW-RS response does not list the instance as stored"
    return errors
