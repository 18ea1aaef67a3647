"""The API's outer guard, one ASGI middleware: the Host check (DNS rebinding), headers that
keep browsers and caches from keeping or framing what the API answers, and the last resort
for an unexpected exception: one log line and a generic 500, never a traceback at INFO."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from dicomnode.api.context import host_allowed
from dicomnode.errors import HostNotAllowed

logger = logging.getLogger(__name__)

#: on every response
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
#: on every response but the dashboard's script and style: answers may hold patient data
NO_STORE = (b"cache-control", b"no-store")


class Guard:
    def __init__(self, app: Any, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if not host_allowed(host, self.allowed_hosts):
            shown = host if len(host) <= 100 else host[:100] + "..."
            await _json(
                send,
                HostNotAllowed.http_status,
                {
                    "error": f"Host {shown!r} is not one this API answers to "
                    "(set [api] allowed_hosts)",
                    "type": HostNotAllowed.__name__,
                },
            )
            return
        cache = not scope["path"].startswith("/static/")
        started = False

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                headers += SECURITY_HEADERS
                if cache:
                    headers.append(NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:  # the last resort: one line, no traceback, no values
            logger.error(
                "API %s %s failed: %s (traceback at DEBUG)",
                scope.get("method"),
                scope.get("path"),
                type(exc).__name__,
                extra={"action": "api_error"},
            )
            logger.debug("API %s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            if not started:
                await _json(
                    send,
                    500,
                    {"error": "internal error; the node's log says more", "type": "InternalError"},
                )


async def _json(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        NO_STORE,
        *SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
