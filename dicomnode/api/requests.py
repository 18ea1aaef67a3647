"""/api/requests: ask for a study on a source to be retrieved and analysed (``operate``), and
follow it: retrieve progress per series, what is missing, the jobs it made (``read``; study
and instance UIDs need ``phi``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from dicomnode import admin
from dicomnode.api.auth import Operator, Reader, context
from dicomnode.api.jobs import shown
from dicomnode.api.params import MAX_ID
from dicomnode.fetch.requests import (
    RequestRecord,
    RequestRepository,
    RequestSpec,
    default_source,
    known_models,
    parse_priority,
)

router = APIRouter(prefix="/api", tags=["requests"])

_UID = r"^[0-9]+(\.[0-9]+)*$"
_PRINTABLE = r"^[^\x00-\x1f\x7f\\]*$"
RequestId = Annotated[int, Path(ge=0, le=MAX_ID, description="request id")]


class NewRequest(BaseModel):
    """``POST /api/requests``: a study by UID or accession number, on a source (default: the
    only one), analysed by a route, a model, or the node's routes (neither)."""

    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str | None = Field(None, max_length=64, pattern=_UID)
    accession_number: str | None = Field(None, min_length=1, max_length=64, pattern=_PRINTABLE)
    source: str | None = Field(None, min_length=1, max_length=64)
    route: str | None = Field(None, min_length=1, max_length=64)
    model: str | None = Field(None, min_length=1, max_length=64)
    priority: Literal["routine", "urgent", "stat"] | None = None
    #: the client's id of this ask: the same id again is the same request (200, not 202)
    transaction_id: str | None = Field(None, min_length=1, max_length=128, pattern=_PRINTABLE)


@router.post(
    "/requests",
    status_code=202,
    summary="Retrieve a study from a source and analyse it (operate)",
    responses={200: {"description": "the transaction id names a request made before"}},
)
async def submit(request: Request, body: NewRequest, principal: Operator) -> JSONResponse:
    ctx = context(request)

    def ask() -> tuple[RequestRecord, bool]:
        spec = RequestSpec(
            source=body.source or default_source(ctx.settings),
            study_instance_uid=body.study_instance_uid,
            accession_number=body.accession_number,
            route=body.route,
            model=body.model,
            priority=parse_priority(body.priority) if body.priority else None,
            transaction_id=body.transaction_id,
        )
        models = known_models(ctx.settings, ctx.builtin_models) if body.model else None
        spec = spec.checked(ctx.settings, models)
        source = ctx.settings.source(spec.source)
        return RequestRepository(ctx.sessions).submit(
            spec, client=principal.actor, max_attempts=source.max_attempts
        )

    record, created = await run_in_threadpool(ask)
    if created and ctx.on_request is not None:
        ctx.on_request()
    return JSONResponse(
        {"id": record.id, "state": record.state.value, "url": f"/api/requests/{record.id}"},
        status_code=202 if created else 200,
    )


@router.get("/requests/{request_id}", summary="One request: progress, missing, its jobs")
def get_request(request: Request, request_id: RequestId, principal: Reader) -> dict[str, Any]:
    ctx = context(request)
    record = RequestRepository(ctx.sessions).get(request_id)
    return shown(principal, admin.request_detail(ctx.jobs, record))


@router.post("/requests/{request_id}/retry", summary="Try a failed request again (operate)")
async def retry_request(
    request: Request, request_id: RequestId, principal: Operator
) -> dict[str, Any]:
    ctx = context(request)
    record = await run_in_threadpool(
        RequestRepository(ctx.sessions).retry, request_id, actor=principal.actor
    )
    if ctx.on_request is not None:
        ctx.on_request()
    return shown(principal, admin.request_detail(ctx.jobs, record))
