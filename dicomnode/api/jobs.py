"""/api/jobs: list with filters and pagination, one job in full, retry, cancel, resend,
approve, reject; /api/summary (the dashboard's counts and throughput); /api/audit; /api/me (the
token's scopes).

Reading needs ``read`` (patient and study attributes blanked without ``phi``), acting
``operate``, approving and rejecting a review route's results ``review``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomnode import admin, audit
from dicomnode.api.auth import Operator, Principal, Reader, Reviewer, context
from dicomnode.api.context import Memo
from dicomnode.api.params import MAX_LIMIT, JobId, Offset, OptionalJobId, Since, since, text
from dicomnode.api.phi import PHI_FILTERS, redact
from dicomnode.errors import (
    ConfigError,
    InvalidQuery,
    JobNotFound,
    JobStateError,
    NoResults,
    SendError,
)

router = APIRouter(prefix="/api", tags=["jobs"])


def shown(principal: Principal, value: Any) -> Any:
    """``value`` as ``principal`` may see it: whole with ``phi``, redacted without."""
    return value if principal.phi else redact(value)


@router.get("/me", tags=["auth"], summary="The token's name and scopes")
def me(principal: Reader) -> dict[str, Any]:
    return {"name": principal.name, "actor": principal.actor, "scopes": sorted(principal.scopes)}


@router.get("/jobs", summary="Jobs, newest first, one page at a time")
def list_jobs(
    request: Request,
    principal: Reader,
    status: Annotated[str | None, text("states, comma-separated")] = None,
    study: Annotated[str | None, text("Study Instance UID (phi scope)", 64)] = None,
    model: Annotated[str | None, text()] = None,
    accession: Annotated[str | None, text("Accession Number (phi scope)", 64)] = None,
    patient_id: Annotated[str | None, text("Patient ID (phi scope)", 64)] = None,
    since_: Since = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    filters = {"study": study, "accession": accession, "patient_id": patient_id}
    for name in PHI_FILTERS:
        if filters[name]:
            principal.require("phi", f"the {name} filter")
    page, total = admin.list_jobs(
        context(request).jobs,
        state=status,
        model=model,
        study=study,
        accession=accession,
        patient_id=patient_id,
        since=since(since_),
        limit=limit,
        offset=offset,
    )
    return {
        "total": total,
        "limit": limit,
        "offset": offset,
        "jobs": [shown(principal, admin.job_summary(job)) for job in page],
    }


@router.get("/jobs/{job_id}", summary="One job: stages, error, attempts, sends, audit")
def get_job(request: Request, job_id: JobId, principal: Reader) -> dict[str, Any]:
    ctx = context(request)
    job = ctx.jobs.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return shown(principal, admin.job_detail(ctx.sessions, job))


@router.post("/jobs/{job_id}/retry", summary="Queue a failed or cancelled job again (operate)")
async def retry_job(request: Request, job_id: JobId, principal: Operator) -> dict[str, Any]:
    job = await run_in_threadpool(context(request).jobs.retry, job_id, actor=principal.actor)
    return shown(principal, admin.job_summary(job))


@router.post("/jobs/{job_id}/cancel", summary="Cancel an unfinished job (operate)")
async def cancel_job(request: Request, job_id: JobId, principal: Operator) -> dict[str, Any]:
    job = await run_in_threadpool(context(request).jobs.cancel, job_id, actor=principal.actor)
    return shown(principal, admin.job_summary(job))


class Approval(BaseModel):
    """A reviewer's approval; the note (optional) is audited with it."""

    note: str | None = Field(None, max_length=1000)


class Rejection(BaseModel):
    """A reviewer's rejection: why (required), audited and kept as the job's error."""

    reason: str = Field(min_length=1, max_length=1000)


@router.post("/jobs/{job_id}/approve", summary="Release a job's results held for review (review)")
async def approve_job(
    request: Request,
    job_id: JobId,
    principal: Reviewer,
    approval: Annotated[Approval | None, Body()] = None,
) -> dict[str, Any]:
    """Sends and notifications are written as its release would have written them; 409 for a
    job not in review (approved already, rejected, or never held)."""
    note = approval.note if approval is not None else None
    job = await run_in_threadpool(
        context(request).jobs.approve, job_id, actor=principal.actor, note=note
    )
    return shown(principal, admin.job_summary(job))


@router.post("/jobs/{job_id}/reject", summary="Refuse a job's results held for review (review)")
async def reject_job(
    request: Request, job_id: JobId, principal: Reviewer, rejection: Rejection
) -> dict[str, Any]:
    """The job becomes ``rejected`` with the reason, and sends nothing; 409 for a job not in
    review."""
    try:
        job = await run_in_threadpool(
            context(request).jobs.reject, job_id, actor=principal.actor, reason=rejection.reason
        )
    except ValueError as exc:  # a reason of blanks only
        raise InvalidQuery(f"reason {rejection.reason!r}: {exc}") from None
    return shown(principal, admin.job_summary(job))


@router.post("/jobs/{job_id}/resend", summary="Send a job's result objects again (operate)")
def resend_job(
    request: Request,
    job_id: JobId,
    principal: Operator,
    destination: Annotated[list[str] | None, Query(max_length=32)] = None,
) -> dict[str, Any]:
    """To the job's own destinations, or to each ``destination`` named (configured ones)."""
    from dicomnode.queue.sends import SendQueue

    ctx = context(request)
    for name in destination or ():
        try:
            ctx.settings.destination(name)
        except ConfigError as exc:
            raise InvalidQuery(exc.message) from None
    try:
        targets = SendQueue(ctx.sessions).requeue(job_id, destination)
    except (JobNotFound, JobStateError, NoResults):
        raise
    except SendError as exc:  # no destination to send to: the request, not the node
        raise JobStateError(exc.message) from None
    audit.record_event(
        ctx.sessions, principal.actor, "resend", job_id=job_id, detail=f"to {', '.join(targets)}"
    )
    return {"id": job_id, "destinations": targets}


@router.get("/summary", tags=["dashboard"], summary="Queue depth by state, throughput per model")
def summary(request: Request, _principal: Reader) -> dict[str, Any]:
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
    principal: Reader,
    job_id: OptionalJobId = None,
    action: Annotated[str | None, text(max_length=32)] = None,
    actor: Annotated[str | None, text(max_length=128)] = None,
    since_: Since = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    after = since(since_)
    with context(request).sessions() as session:
        events, total = audit.list_events(
            session,
            job_id=job_id,
            action=action,
            actor=actor,
            since=after,
            limit=limit,
            offset=offset,
        )
    return {
        "total": total,
        "limit": limit,
        "offset": offset,
        "events": [shown(principal, asdict(e)) for e in events],
    }
