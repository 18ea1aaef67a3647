"""/api/jobs/{id}/previews: a job's key images (the summary's RGB Secondary Captures) as PNG,
for the dashboard's job page and its reviewer.

Both need the ``phi`` scope. A key image draws no name, ID or date, but it is a slice of the
patient's own images (a face in a head CT, a body's outline, an implant can identify someone),
and so is patient data like the studies it came from; a ``read`` token sees the job without it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from dicomnode.api.auth import PhiReader, context
from dicomnode.api.params import JobId
from dicomnode.errors import JobNotFound
from dicomnode.queue.records import JobRecord
from dicomnode.results import preview

router = APIRouter(prefix="/api", tags=["jobs"])


def _job(request: Request, job_id: int) -> JobRecord:
    job = context(request).jobs.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


@router.get("/jobs/{job_id}/previews", summary="A job's key images, listed (phi)")
def list_previews(request: Request, job_id: JobId, _principal: PhiReader) -> dict[str, Any]:
    """Each key image: its number, PNG address, size, and SOP Instance UID (empty list for
    a job without results, or whose results have no key image)."""
    job = _job(request, job_id)
    storage = context(request).settings.node.storage_dir
    listed = []
    for key in preview.key_images(job.result):
        try:
            columns, rows = preview.size(storage / key.object.path)
        except FileNotFoundError:
            continue  # removed by retention: nothing to show
        listed.append(
            {
                "n": key.n,
                "url": f"/api/jobs/{job_id}/previews/{key.n}.png",
                "columns": columns,
                "rows": rows,
                "sop_instance_uid": key.object.sop_instance_uid,
            }
        )
    return {"id": job_id, "previews": listed}


@router.get(
    "/jobs/{job_id}/previews/{n}.png",
    summary="One key image of a job as PNG (phi)",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def preview_png(request: Request, job_id: JobId, n: int, _principal: PhiReader) -> Response:
    job = _job(request, job_id)
    key = preview.find(job.result, n, job_id)
    path = context(request).settings.node.storage_dir / key.object.path
    data = await run_in_threadpool(preview.png, path)
    return Response(data, media_type="image/png")  # no-store: the Guard says so for every answer
