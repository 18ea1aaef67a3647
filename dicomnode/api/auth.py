"""Bearer-token authentication: every route but /api/health depends on :func:`require_actor`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dicomnode.api.context import ApiContext
from dicomnode.audit import token_actor
from dicomnode.errors import Unauthorized

#: the actor of requests to an API configured without tokens (loopback only)
OPEN_ACTOR = "token:none"

bearer = HTTPBearer(
    auto_error=False,
    description="The [api] token, or one of the named [api] tokens, as `Bearer <token>`.",
)


def context(request: Request) -> ApiContext:
    return request.app.state.context


def require_actor(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The audit actor of a request with a valid token (``token:<name>``); 401 otherwise."""
    tokens = context(request).tokens
    if not tokens:
        return OPEN_ACTOR
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    given = credentials.credentials.encode()
    found = None
    for name, secret in tokens.items():  # compare with every token: time says nothing
        if hmac.compare_digest(given, secret.encode()):
            found = name
    if found is None:
        raise Unauthorized("the bearer token is not valid")
    return token_actor(found)


Actor = Annotated[str, Depends(require_actor)]
