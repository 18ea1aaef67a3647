"""Bearer tokens and their scopes: each route names the scope it needs.

``read``: jobs, models, summary, audit, metrics, health details, the OpenAPI document, with no
patient or study attribute in them (see :mod:`dicomnode.api.phi`); ``phi``: those attributes,
/api/studies and the study, accession and patient filters; ``operate``: retry, cancel, resend;
``store``: STOW-RS (and nothing else); ``review``: approve or reject the results a review
route holds (a clinical decision, kept apart from operating the queue); ``admin``:
everything. ``phi``, ``operate`` and ``review`` imply
``read``. A missing token is 401, a token
without the scope 403 naming it. An API without tokens (loopback only) grants every scope.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dicomnode.api.context import IMPLIED_SCOPES, ApiContext
from dicomnode.audit import token_actor
from dicomnode.errors import Forbidden, Unauthorized

#: the name audited for requests to an API configured without tokens (loopback only)
OPEN_NAME = "none"
#: the actor of those requests
OPEN_ACTOR = token_actor(OPEN_NAME)

bearer = HTTPBearer(
    auto_error=False,
    description="The [api] token, or one of the named [api] tokens, as `Bearer <token>`.",
)


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's name and the scopes it has (implied ones included)."""

    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        """The audit actor: ``token:<name>``."""
        return token_actor(self.name)

    @property
    def phi(self) -> bool:
        """Whether patient and study attributes may be shown to it."""
        return "phi" in self.scopes

    def require(self, scope: str, what: str) -> None:
        """Forbidden (403) naming ``scope`` unless the token has it."""
        if scope not in self.scopes:
            raise Forbidden(
                f"token {self.name!r} lacks the {scope!r} scope, which {what} needs "
                f"(it has: {', '.join(sorted(self.scopes)) or 'none'})"
            )


OPEN = Principal(OPEN_NAME, IMPLIED_SCOPES["admin"])


def context(request: Request) -> ApiContext:
    return request.app.state.context


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal | None:
    """The principal of the request's token; None without an Authorization header (when
    tokens are configured); 401 for a token that is not valid."""
    tokens = context(request).tokens
    if not tokens:
        return OPEN
    if request.headers.get("authorization") is None:
        return None
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    given = credentials.credentials.encode()
    found = None
    for credential in tokens.values():  # compare with every token: time says nothing
        if hmac.compare_digest(given, credential.secret.encode()):
            found = credential
    if found is None:
        raise Unauthorized("the bearer token is not valid")
    return Principal(found.name, found.scopes)


OptionalPrincipal = Annotated[Principal | None, Depends(authenticate)]


def needs(scope: str) -> Callable[..., Principal]:
    """A dependency: the request's principal, which must have ``scope`` (401, then 403)."""

    def dependency(request: Request, principal: OptionalPrincipal) -> Principal:
        if principal is None:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        principal.require(scope, f"{request.method} {request.url.path}")
        return principal

    return dependency


Reader = Annotated[Principal, Depends(needs("read"))]
PhiReader = Annotated[Principal, Depends(needs("phi"))]
Operator = Annotated[Principal, Depends(needs("operate"))]
Storer = Annotated[Principal, Depends(needs("store"))]
Reviewer = Annotated[Principal, Depends(needs("review"))]
