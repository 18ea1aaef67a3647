"""The FastAPI application and the uvicorn server ``dicomnode serve`` runs it in.

This module imports neither FastAPI nor uvicorn at import time (the receiver imports it to
wire the node); they load when the app is built.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from dicomnode import __version__
from dicomnode.api.context import ApiContext, Memo, allowed_hosts, check_exposure, is_loopback

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dicomnode.config import ApiSettings

logger = logging.getLogger(__name__)

#: how long /metrics and the dashboard's throughput reuse a scan of the jobs table
SCAN_CACHE_S = 5.0
#: a 503 (a STOW-RS request over the receiver's limits) asks the client to wait this long
RETRY_AFTER_S = 5


def create_app(ctx: ApiContext) -> FastAPI:
    """The API, dashboard and /metrics over ``ctx``; the OpenAPI document at /openapi.json
    (``read`` scope). No /docs or /redoc: FastAPI loads swagger-ui and redoc from a CDN, on
    the very page an admin would paste a token into."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.staticfiles import StaticFiles

    from dicomnode.api import (
        auth,
        catalog,
        dashboard,
        dicomweb,
        health,
        jobs,
        metrics,
        previews,
        requests,
    )
    from dicomnode.api.guard import Guard
    from dicomnode.errors import DicomNodeError

    app = FastAPI(
        title="dicomnode",
        version=__version__,
        description="Jobs, studies, models, health and metrics of a dicomnode. Every route but "
        "the up/down answer of /api/health needs `Authorization: Bearer <token>` when tokens "
        "are configured, with the scope the route names: read, phi, operate, review, store "
        "(admin: all).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.context = ctx
    app.state.echo_cache = health.EchoCache(
        ctx.settings.api.health_cache_s,
        ctx.settings.api.echo_timeout_s,
        ctx.settings.node.ae_title,
    )
    app.state.metrics_registry = metrics.make_registry(ctx)
    app.state.memo = Memo(SCAN_CACHE_S)

    @app.exception_handler(DicomNodeError)
    async def _error(_request: Request, exc: DicomNodeError) -> JSONResponse:
        headers = {
            401: {"WWW-Authenticate": "Bearer"},
            503: {"Retry-After": str(RETRY_AFTER_S)},
        }.get(exc.http_status)
        return JSONResponse(
            {"error": exc.message, "type": type(exc).__name__},
            status_code=exc.http_status,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # the reasons without the values given (they may be patient IDs)
        problems = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        reason = "; ".join(
            f"{' '.join(str(part) for part in p['loc'])}: {p['msg']}" for p in problems
        )
        return JSONResponse(
            {"error": reason or "invalid request", "type": "InvalidRequest", "detail": problems},
            status_code=422,
        )

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth.needs("read"))])
    def _openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    for module in (health, jobs, previews, requests, catalog, metrics, dashboard, dicomweb):
        app.include_router(module.router)
    static = str(_static_dir())
    app.mount("/static", StaticFiles(directory=static), name="static")
    app.add_middleware(Guard, allowed_hosts=allowed_hosts(ctx.settings.api))
    return app


def _static_dir() -> Any:
    from importlib import resources

    return resources.files("dicomnode.api").joinpath("static")


def _tls_options(api: ApiSettings) -> dict[str, Any]:
    """uvicorn's HTTPS options from ``[api] tls_cert/tls_key`` (none: plain HTTP)."""
    if api.tls_cert is None or api.tls_key is None:
        return {}
    return {
        "ssl_certfile": str(api.tls_cert),
        "ssl_keyfile": str(api.tls_key),
        "ssl_keyfile_password": api.tls_key_password or None,
    }


class ApiServer:
    """uvicorn serving :func:`create_app` in a daemon thread, on ``[api] host/port``."""

    def __init__(self, ctx: ApiContext) -> None:
        check_exposure(ctx.settings.api)
        self.ctx = ctx
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is real even when 0 was configured."""
        assert self._socket is not None, "API server is not started"
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = self.ctx.settings.api.scheme
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self, timeout: float = 30.0) -> None:
        """Bind now (so a busy port fails the start), serve in a thread, wait until ready."""
        import uvicorn

        api = self.ctx.settings.api
        family = socket.AF_INET6 if ":" in api.host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then,
        # and without it every keep-alive response waits ~40 ms for a delayed ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((api.host, api.port))
        except OSError as exc:
            sock.close()
            from dicomnode.errors import ConfigError

            raise ConfigError(f"[api] {api.host}:{api.port} cannot be bound: {exc}") from exc
        sock.listen(128)
        self._socket = sock
        config = uvicorn.Config(
            create_app(self.ctx),
            log_config=None,  # the node's logging stays as configured
            access_log=False,  # an access line carries query strings: patient IDs, accessions
            lifespan="off",
            timeout_graceful_shutdown=5,
            **_tls_options(api),
        )
        try:
            config.load()  # here, not in the thread: a bad certificate or key fails the start
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            sock.close()
            self._socket = None
            if api.tls_cert is None:
                raise
            from dicomnode.errors import ConfigError

            raise ConfigError(
                f"[api] tls_cert {str(api.tls_cert)!r} / tls_key {str(api.tls_key)!r} cannot be "
                f"loaded: {exc}"
            ) from exc
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="http-api", daemon=True
        )
        self._thread.start()
        ready = threading.Event()
        while not ready.wait(0.02):
            if self._server.started or not self._thread.is_alive():
                break
            timeout -= 0.02
            if timeout <= 0:
                break
        logger.info(
            "HTTP API on %s%s",
            self.url,
            "" if self.ctx.tokens else " (no token: loopback only)",
            extra={"action": "api_listen"},
        )
        if api.tls_cert is None and not is_loopback(api.host):
            logger.warning(
                "HTTP API on %s without TLS: its tokens and answers cross the network in the "
                "clear; set [api] tls_cert and tls_key, or bind 127.0.0.1 behind a TLS proxy",
                self.url,
                extra={"action": "api_plain_http"},
            )

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None
