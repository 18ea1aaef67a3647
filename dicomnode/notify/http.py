"""The one HTTP POST of the webhook and FHIR notifications: the target's token, headers, TLS
and timeout, the delivery id as ``Idempotency-Key``; an answer outside 2xx is a refusal."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from dicomnode.errors import NotificationRefused, NotifyError

if TYPE_CHECKING:
    import httpx

    from dicomnode.config import NotificationSettings

#: the most of a refusal's body an error quotes
QUOTED_CHARS = 300
#: one client (its TLS context and connection pool) per target's TLS and timeout: making one
#: costs tens of milliseconds, which a notification should not pay each time
_clients: dict[tuple[str, ...], httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(settings: NotificationSettings) -> httpx.Client:
    import httpx

    tls = settings.tls
    key = (settings.name, str(tls.ca), str(tls.cert), str(tls.key), str(settings.timeout_s))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            verify: Any = str(tls.ca) if tls.ca is not None else True
            cert = (str(tls.cert), str(tls.key)) if tls.cert and tls.key else None
            client = httpx.Client(verify=verify, cert=cert, timeout=settings.timeout_s)
            _clients[key] = client
        return client


def post_json(
    settings: NotificationSettings,
    url: str,
    payload: Any,
    *,
    delivery_id: str,
    event: str,
    content_type: str = "application/json",
) -> httpx.Response:
    """POST ``payload`` as JSON to ``url``; the response when its status is 2xx.
    NotificationRefused for another status (naming it and quoting the body), NotifyError
    when the server was not reached or did not answer within the timeout."""
    import httpx

    headers = {
        "Content-Type": content_type,
        "Accept": content_type,
        "User-Agent": "dicomnode",
        "Idempotency-Key": delivery_id,
        "X-Dicomnode-Delivery": delivery_id,
        "X-Dicomnode-Event": event,
        **settings.headers,
    }
    if settings.token:
        headers["Authorization"] = f"Bearer {settings.token}"
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    try:
        response = _client(settings).post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise NotifyError(f"{url} not reached: {type(exc).__name__}: {exc}") from exc
    if not 200 <= response.status_code < 300:
        quoted = response.text[:QUOTED_CHARS].strip()
        raise NotificationRefused(
            f"{url} answered HTTP {response.status_code}" + (f": {quoted}" if quoted else "")
        )
    return response
