"""GET /: the dashboard page, rendered here; its script (static/dashboard.js) polls the API.
``/#/jobs/ID`` is one job's page: stages, inputs, findings, key images, sends, its log, and
the actions the token may take (retry, cancel, resend; approve and reject a job in review).

The page itself carries no job or patient data (a browser cannot send a bearer token with a
page load): the script asks for the token once, keeps it in sessionStorage, and fetches
everything it shows from the token-guarded JSON API. No CDN: the script and style ship in
the package, so the page works offline. With a token that lacks ``operate`` it hides the
retry and cancel buttons (it asks /api/me for the token's scopes), without ``review`` the
approve and reject buttons; it shows no patient data with any token but the key images, which
a ``phi`` token fetches with its bearer header and shows as ``blob:`` images (an ``<img src>``
cannot send the header).
"""

from __future__ import annotations

from html import escape
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dicomnode import __version__
from dicomnode.api.auth import context
from dicomnode.domain import JobState

router = APIRouter(tags=["dashboard"])

#: only our own script and style; nothing inline, nothing from elsewhere, in no frame
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@router.get("/", response_class=HTMLResponse, summary="The dashboard page")
def dashboard(request: Request) -> HTMLResponse:
    ctx = context(request)
    template = resources.files("dicomnode.api").joinpath("static/dashboard.html").read_text()
    states = "".join(
        f'<div class="state" data-state="{s.value}"><span class="n" id="count-{s.value}">-'
        f"</span><span>{s.value}</span></div>"
        for s in JobState
    )
    page = (
        template.replace("{{ae_title}}", escape(ctx.settings.node.ae_title))
        .replace("{{version}}", escape(__version__))
        .replace("{{states}}", states)
        .replace("{{token_required}}", "true" if ctx.tokens else "false")
    )
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP})
