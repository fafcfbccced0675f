"""The web dashboard at ``/dashboard``: jobs (filtered, each with its request, output, attempts and
its events live), webhook deliveries with their attempts and replay, endpoints (enable, disable,
rotate a secret, send a test event), batches with live progress, upstreams with their health,
and an overview of the last hour as charts.

Server-rendered (Jinja2, ``templates/``), with a little plain JavaScript (``assets/``) for what is
live: no build step. ``session.py`` signs a viewer in with an API key: a tenant's key sees its
own tenant, an admin key every tenant. ``pages.py`` holds the routes, ``charts.py`` draws the
charts as SVG. The pages are not part of the API: they are left out of the OpenAPI spec.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from hookline.api.dashboard.pages import NotSignedIn, router

__all__ = ["install", "router"]


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``."""
    app.router.routes.extend(router.routes)
    app.add_exception_handler(NotSignedIn, _sign_in_first)


async def _sign_in_first(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotSignedIn)
    target = "/dashboard/login?next=" + quote(exc.back_to, safe="")
    if request.headers.get("accept", "").startswith("text/event-stream"):
        return Response(status_code=401)
    return RedirectResponse(target, status_code=303)
