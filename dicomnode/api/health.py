"""/api/health: database, free disk, live workers, reachable destinations. No patient data in
it. Without a token (where tokens are configured) only up or down: ``{"status": "ok"}``, or
503 ``{"status": "down"}``, and no destination is C-ECHOed for it; the details (destination
AE titles, hosts and ports, worker ids, free disk, models) need a token with ``read``.

Destinations are C-ECHOed (DIMSE ones; STOW-RS and return-to-sender are listed unchecked) with
a short timeout, in parallel, and each answer is kept for ``[api] health_cache_s`` so a
monitor polling health never floods a PACS with associations.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text

from dicomnode.api.auth import OptionalPrincipal, context
from dicomnode.db.models import Job
from dicomnode.domain import JobState

router = APIRouter(prefix="/api", tags=["health"])


@dataclass(frozen=True)
class EchoResult:
    name: str
    kind: str
    checked: bool
    reachable: bool | None
    error: str | None
    checked_at: str


class EchoCache:
    """C-ECHO answers per destination, each kept ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, timeout_s: float, calling_aet: str) -> None:
        self.ttl_s, self.timeout_s, self.calling_aet = ttl_s, timeout_s, calling_aet
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, EchoResult]] = {}

    def check(self, destinations: Sequence[Any]) -> list[EchoResult]:
        now = time.monotonic()
        with self._lock:
            fresh = {
                name: result
                for name, (at, result) in self._answers.items()
                if now - at < self.ttl_s
            }
        stale = [d for d in destinations if d.name not in fresh]
        if stale:
            with ThreadPoolExecutor(max_workers=min(8, len(stale))) as pool:
                for result in pool.map(self._echo, stale):
                    fresh[result.name] = result
                    with self._lock:
                        self._answers[result.name] = (time.monotonic(), result)
        return [fresh[d.name] for d in destinations]

    def _echo(self, destination: Any) -> EchoResult:
        kind = getattr(destination, "kind", "dimse")
        at = datetime.now(UTC).isoformat(timespec="seconds")
        if kind != "dimse":
            return EchoResult(destination.name, kind, False, None, None, at)
        reachable, error = echo(
            destination.host,
            destination.port,
            destination.ae_title,
            calling_aet=destination.calling_aet or self.calling_aet,
            timeout_s=self.timeout_s,
            tls=destination.tls,
        )
        return EchoResult(destination.name, kind, True, reachable, error, at)


def echo(
    host: str, port: int, ae_title: str, *, calling_aet: str, timeout_s: float, tls: Any = None
) -> tuple[bool, str | None]:
    """One C-ECHO: (True, None) on Success, else (False, why)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # set via globals()

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    tls_args = None
    if tls is not None and tls.enabled:
        from dicomnode.receive.tls import peer_context

        tls_args = (peer_context(tls), None)
    # server_hostname None (no SNI) is what ssl's wrap_socket allows; pynetdicom types it str
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "no association"
        return False, f"{why} by {ae_title}@{host}:{port}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return True, None
    return False, "no C-ECHO response" if code is None else f"C-ECHO status 0x{code:04X}"


@router.get(
    "/health", summary="Up or down without a token; database, disk, workers, destinations with one"
)
def health(request: Request, principal: OptionalPrincipal) -> JSONResponse:
    ctx = context(request)
    settings = ctx.settings
    now = datetime.now(UTC)
    database: dict[str, Any] = {"ok": True, "error": None}
    leases: list[dict[str, Any]] = []
    try:
        with ctx.sessions() as session:
            session.execute(text("SELECT 1"))
            if principal is not None:
                leases = [
                    {"worker_id": owner, "running": int(n)}
                    for owner, n in session.execute(
                        select(Job.lease_owner, func.count())
                        .where(Job.state == JobState.RUNNING.value, Job.lease_expires_at > now)
                        .group_by(Job.lease_owner)
                    )
                ]
    except Exception as exc:  # the point of health: say so rather than fail
        database = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    floor = settings.node.min_free_disk_mb * 2**20
    try:
        free: int | None = shutil.disk_usage(settings.node.storage_dir).free
    except OSError:  # the storage folder is gone or unreadable: down, not a 500
        free = None
    disk = {"free_bytes": free, "min_free_bytes": floor, "ok": free is not None and free >= floor}
    embedded = [
        {
            "worker_id": worker.worker_id,
            "device": worker.device,
            "models": sorted(worker.models),
            "alive": worker.alive,
            "jobs_run": worker.jobs_run,
        }
        for worker in ctx.workers
    ]
    workers_ok = all(w["alive"] for w in embedded)
    ok = database["ok"] and disk["ok"] and workers_ok
    if principal is None:  # anonymous: up or down, nothing about the node's surroundings
        return JSONResponse({"status": "ok" if ok else "down"}, status_code=200 if ok else 503)
    principal.require("read", "the details of /api/health")
    cache: EchoCache = request.app.state.echo_cache
    destinations = [asdict(r) for r in cache.check(getattr(settings, "destinations", ()))]
    reachable = all(d["reachable"] is not False for d in destinations)
    status = "ok" if ok and reachable else "degraded" if ok else "failing"
    body = {
        "status": status,
        "checked_at": now.isoformat(),
        "started_at": ctx.started_at.isoformat(),
        "database": database,
        "disk": disk,
        "workers": {"embedded": embedded, "leases": leases},
        "destinations": destinations,
    }
    return JSONResponse(body, status_code=200 if ok else 503)
