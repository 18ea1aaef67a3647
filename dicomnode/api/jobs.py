"""/api/jobs: list with filters and pagination, one job in full, retry, cancel; /api/summary
(the dashboard's counts and throughput); /api/audit."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from dicomnode import admin
from dicomnode.api.auth import Actor, context
from dicomnode.api.context import Memo
from dicomnode.audit import list_events
from dicomnode.errors import JobNotFound

router = APIRouter(prefix="/api", tags=["jobs"])


@router.get("/jobs", summary="Jobs, newest first, one page at a time")
def list_jobs(
    request: Request,
    _actor: Actor,
    status: Annotated[str | None, Query(description="states, comma-separated")] = None,
    study: Annotated[str | None, Query(description="Study Instance UID")] = None,
    model: str | None = None,
    accession: Annotated[str | None, Query(description="Accession Number")] = None,
    patient_id: Annotated[str | None, Query(description="Patient ID")] = None,
    since: Annotated[str | None, Query(description="2h, 3d, or ISO 8601 (UTC)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    page, total = admin.list_jobs(
        context(request).jobs,
        state=status,
        model=model,
        study=study,
        accession=accession,
        patient_id=patient_id,
        since=since,
        limit=limit,
        offset=offset,
    )
    return {
        "total": total,
        "limit": limit,
        "offset": offset,
        "jobs": [admin.job_summary(job) for job in page],
    }


@router.get("/jobs/{job_id}", summary="One job: stages, error, attempts, sends, audit")
def get_job(request: Request, job_id: int, _actor: Actor) -> dict[str, Any]:
    ctx = context(request)
    job = ctx.jobs.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return admin.job_detail(ctx.sessions, job)


@router.post("/jobs/{job_id}/retry", summary="Queue a failed or cancelled job again")
async def retry_job(request: Request, job_id: int, actor: Actor) -> dict[str, Any]:
    job = await run_in_threadpool(context(request).jobs.retry, job_id, actor=actor)
    return admin.job_summary(job)


@router.post("/jobs/{job_id}/cancel", summary="Cancel an unfinished job")
async def cancel_job(request: Request, job_id: int, actor: Actor) -> dict[str, Any]:
    job = await run_in_threadpool(context(request).jobs.cancel, job_id, actor=actor)
    return admin.job_summary(job)


@router.get("/summary", tags=["dashboard"], summary="Queue depth by state, throughput per model")
def summary(request: Request, _actor: Actor) -> dict[str, Any]:
    ctx = context(request)
    counts = ctx.jobs.counts_by_state()
    memo: Memo = request.app.state.memo

    def rates() -> list[admin.ModelThroughput]:
        with ctx.sessions() as session:
            return admin.throughput(session)

    return {
        "states": {str(state): n for state, n in counts.items()},
        "throughput_window_h": 24,
        "throughput": [vars(rate) for rate in memo.get("throughput", rates)],
    }


@router.get("/audit", tags=["audit"], summary="Audit events, newest first")
def audit_events(
    request: Request,
    _actor: Actor,
    job_id: int | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: Annotated[str | None, Query(description="2h, 3d, or ISO 8601 (UTC)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    with context(request).sessions() as session:
        events, total = list_events(
            session,
            job_id=job_id,
            action=action,
            actor=actor,
            since=admin.parse_since(since) if since else None,
            limit=limit,
            offset=offset,
        )
    return {"total": total, "limit": limit, "offset": offset, "events": [asdict(e) for e in events]}
