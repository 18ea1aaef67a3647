"""/api/studies (``phi``: patient names, IDs, accessions), /api/models and
/api/models/compare (``read``): what the index holds, what the node can run, and how a shadow
route's model agrees with the live one."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from dicomnode import admin
from dicomnode.api.auth import PhiReader, Reader, context
from dicomnode.api.context import Memo
from dicomnode.api.params import MAX_LIMIT, Offset, Since, since, text
from dicomnode.db.index import list_studies

router = APIRouter(prefix="/api")


@router.get("/studies", tags=["studies"], summary="Studies in the index, newest first (phi)")
def studies(
    request: Request,
    _principal: PhiReader,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    with context(request).sessions() as session:
        found = list_studies(session, limit=limit, offset=offset)
    return {"limit": limit, "offset": offset, "studies": [asdict(s) for s in found]}


@router.get(
    "/models", tags=["models"], summary="Models: kind, version, digest, demo weights, devices"
)
def models(request: Request, _principal: Reader) -> dict[str, Any]:
    ctx = context(request)
    return {"models": [asdict(m) for m in admin.model_summaries(ctx.settings, ctx.builtin_models)]}


@router.get(
    "/models/compare",
    tags=["models"],
    summary="A shadow route's agreement with a live route on the same inputs",
)
def compare(
    request: Request,
    _principal: Reader,
    live: Annotated[str, text("the live route's name", max_length=64)],
    shadow: Annotated[str, text("the shadow route's name", max_length=64)],
    since_: Since = None,
) -> dict[str, Any]:
    ctx = context(request)
    return admin.compare_routes(
        ctx.sessions, ctx.settings.node.storage_dir, live, shadow, since(since_)
    )


@router.get(
    "/models/shadows",
    tags=["models"],
    summary="Every shadow route against each live route it shares inputs with (the dashboard)",
)
def shadows(request: Request, _principal: Reader, since_: Since = "7d") -> dict[str, Any]:
    ctx = context(request)
    start = since(since_)
    memo: Memo = request.app.state.memo
    found = memo.get(
        f"shadows|{start:%Y-%m-%dT%H:%M}" if start else "shadows",
        lambda: admin.compare_shadow_routes(
            ctx.sessions, ctx.settings.node.storage_dir, ctx.settings.routes, start
        ),
    )
    return {"since": start.isoformat() if start else None, "comparisons": found}
