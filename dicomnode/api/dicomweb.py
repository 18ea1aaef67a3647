"""STOW-RS in (PS3.18 10.5): ``POST /dicomweb/studies`` and ``/dicomweb/studies/{study}``.

The body (multipart/related; type="application/dicom") is parsed as it streams in and each part
written to the receiver's ``incoming/`` folder; once the closing boundary has come, every part
is stored as C-STORE stores an instance (:mod:`dicomnode.receive.stow`), and the answer is the
Store Instances Response Module in DICOM JSON: 200 all stored, 202 some refused, 409 none.
A request the node cannot take whole stores nothing: 400 for a malformed body (a wrong
boundary, a part cut short, a part that is no DICOM file), 413 past ``[api] stow_max_mb``,
415 for another media type, 408 when the body stops arriving, 503 at the receiver's
association limits, 507 below its disk floor. Needs the ``store`` scope.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicomnode.api.auth import Principal, Storer, context
from dicomnode.api.multipart import (
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
    media_type,
)
from dicomnode.config import Settings
from dicomnode.errors import (
    BodyInvalid,
    BodyTooLarge,
    DicomNodeError,
    InvalidQuery,
    RequestTimeout,
    ServiceBusy,
    UnsupportedMediaType,
)
from dicomnode.receive.stow import PartOutcome, Upload, stow_peer
from dicomnode.receive.validate import is_valid_uid

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
#: part data is written to disk in pieces of about this size (one thread hop each)
FLUSH_BYTES = 1 << 20
#: the responses a STOW-RS client may see, for the OpenAPI document
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored (Store Instances Response Module)"},
    202: {"description": "some stored, some refused: FailedSOPSequence says which and why"},
    400: {"description": "malformed body: nothing stored"},
    409: {"description": "no instance stored: FailedSOPSequence says why"},
    413: {"description": "body larger than [api] stow_max_mb: nothing stored"},
    415: {"description": "not multipart/related of application/dicom: nothing stored"},
}


@router.post(
    "/studies",
    summary="STOW-RS: store DICOM instances (store scope)",
    responses=RESPONSES,
    response_class=Response,
)
async def store_instances(request: Request, principal: Storer) -> Response:
    return await _store(request, principal, None)


@router.post(
    "/studies/{study}",
    summary="STOW-RS: store DICOM instances of one study (store scope)",
    responses=RESPONSES,
    response_class=Response,
)
async def store_study_instances(
    request: Request,
    study: Annotated[str, Path(max_length=64, description="Study Instance UID")],
    principal: Storer,
) -> Response:
    if not is_valid_uid(study, lenient=context(request).settings.node.lenient_uids):
        raise InvalidQuery(f"study {study[:64]!r} in the URL is not a valid UID")
    return await _store(request, principal, study)


async def _store(request: Request, principal: Principal, study: str | None) -> Response:
    ctx = context(request)
    host, port = (request.client.host, request.client.port) if request.client else ("", 0)
    ingest = ctx.stow
    try:
        if ingest is None:
            raise ServiceBusy("STOW-RS needs the node's receiver, which this API runs without")
        boundary = _check_headers(request, ctx.settings.api.stow_max_mb << 20)
        upload = ingest.admit(stow_peer(principal.name, host, port))
    except DicomNodeError as exc:
        _refused(host, exc)
        raise
    try:
        await _receive(request, upload, boundary, ctx.settings)
        parts = await run_in_threadpool(upload.parts)
        if not parts:
            raise BodyInvalid("the body holds no part")
        outcomes = await run_in_threadpool(
            functools.partial(ingest.store, upload, parts, study=study, actor=principal.actor)
        )
    except DicomNodeError as exc:
        _refused(host, exc)
        raise
    except ClientDisconnect:
        logger.warning(
            "STOW-RS request from %s: the client went away before its body ended; nothing stored",
            host,
            extra={"action": "stow_refused"},
        )
        return Response(status_code=400)
    finally:
        await run_in_threadpool(ingest.finish, upload)
    return _answer(outcomes)


def _check_headers(request: Request, limit: int) -> bytes:
    """The body's boundary, once its Content-Type and length are ones the node takes."""
    content_type = media_type(request.headers.get("content-type", ""))
    if content_type.value != "multipart/related":
        raise UnsupportedMediaType(
            f"Content-Type {content_type.value or 'none'!r}: STOW-RS takes multipart/related; "
            f'type="{DICOM}"'
        )
    root = content_type.params.get("type")
    if root is not None and media_type(root).value != DICOM:
        raise UnsupportedMediaType(
            f"multipart/related of {root[:80]!r}: this node stores {DICOM} parts only "
            "(not metadata with bulk data)"
        )
    boundary = boundary_of(content_type)
    length = request.headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise BodyInvalid(f"Content-Length {length[:40]!r} is not a number") from None
        if size > limit:
            raise BodyTooLarge(
                f"the body of {size} bytes is larger than the {limit >> 20} MB the node takes "
                "([api] stow_max_mb)"
            )
    return boundary


async def _receive(request: Request, upload: Upload, boundary: bytes, settings: Settings) -> None:
    """Read the whole body into ``upload``'s files, part by part."""
    limit = settings.api.stow_max_mb << 20
    idle = settings.node.idle_timeout_s or None
    deadline = time.monotonic() + (settings.node.max_association_s or float("inf"))
    parser = MultipartParser(boundary)
    writer = _PartWriter(upload)
    received = 0
    chunks = request.stream().__aiter__()

    while True:
        left = deadline - time.monotonic()
        wait = min(idle or left, left)
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), None if math.isinf(wait) else wait)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestTimeout(
                "the body stopped arriving for [node] idle_timeout_s"
                if idle and idle <= left
                else "the request took longer than [node] max_association_s"
            ) from None
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(
                f"the body is larger than the {limit >> 20} MB the node takes ([api] stow_max_mb)"
            )
        for event in parser.feed(chunk):
            if isinstance(event, PartData):
                await writer.add(event.data)
            elif isinstance(event, PartStart):
                _check_part(event)
                writer.begin = True
            elif isinstance(event, PartEnd):
                await writer.flush(end=True)
    parser.finish()


class _PartWriter:
    """Part data gathered in one reused buffer and written a megabyte at a time: one thread
    hop per megabyte, and no fresh memory (page faults) per chunk."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.buffer = bytearray(FLUSH_BYTES)
        self.used = 0
        #: a part has begun, and its file is opened with the first write
        self.begin = False

    async def add(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = view[: FLUSH_BYTES - self.used]
            self.buffer[self.used : self.used + len(take)] = take
            self.used += len(take)
            view = view[len(take) :]
            if self.used == FLUSH_BYTES:
                await self.flush()

    async def flush(self, *, end: bool = False) -> None:
        """Write what is gathered (``end``: and close the part), in one thread hop."""
        if self.used or end:
            data = memoryview(self.buffer)[: self.used]
            await run_in_threadpool(
                functools.partial(self.upload.write, data, begin=self.begin, end=end)
            )
            self.used, self.begin = 0, False


def _check_part(part: PartStart) -> None:
    declared = part.headers.get("content-type")
    if declared is not None and media_type(declared).value != DICOM:
        raise UnsupportedMediaType(
            f"part {part.number} is {declared[:80]!r}: this node stores {DICOM} parts only"
        )


def _answer(outcomes: list[PartOutcome]) -> Response:
    """The Store Instances Response Module (PS3.18 Annex I) in DICOM JSON; 200, 202 or 409."""
    stored = [outcome for outcome in outcomes if outcome.ok]
    failed = [outcome for outcome in outcomes if not outcome.ok]
    body: dict[str, Any] = {"00081190": {"vr": "UR"}}  # Retrieve URL: none (no WADO-RS here)
    if failed:
        body["00081198"] = {  # Failed SOP Sequence
            "vr": "SQ",
            "Value": [
                {**_reference(outcome), "00081197": {"vr": "US", "Value": [outcome.status]}}
                for outcome in failed
            ],
        }
    if stored:
        body["00081199"] = {  # Referenced SOP Sequence
            "vr": "SQ",
            "Value": [{**_reference(outcome), "00081190": {"vr": "UR"}} for outcome in stored],
        }
    status = 200 if not failed else 202 if stored else 409
    return Response(json.dumps(body), status_code=status, media_type=DICOM_JSON)


def _reference(outcome: PartOutcome) -> dict[str, Any]:
    """The SOP Instance Reference Macro (PS3.3 Table 10-11) of a part."""
    return {
        "00081150": {"vr": "UI", "Value": [outcome.part.sop_class_uid]},
        "00081155": {"vr": "UI", "Value": [outcome.part.sop_instance_uid]},
    }


def _refused(host: str, exc: DicomNodeError) -> None:
    logger.warning(
        "STOW-RS request from %s refused (HTTP %d), nothing stored: %s",
        host,
        exc.http_status,
        exc.message,
        extra={"action": "stow_refused"},
    )
