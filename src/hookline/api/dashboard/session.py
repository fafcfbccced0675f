"""Who is looking at the dashboard: signed in with an API key, kept in a cookie.

The sign-in form takes a key; the key is checked as every API call checks it (revoked and
expired keys are refused, within the key cache's 2 s) and kept in an ``HttpOnly``,
``SameSite=Strict`` cookie scoped to ``/dashboard`` (``Secure`` behind HTTPS), so revoking the key
signs its sessions out too. A tenant's key shows its own tenant; an admin key (``hookline keys
create --admin``) shows every tenant. Each form carries a token derived from the key, checked on
every change (on top of ``SameSite``, against cross-site requests). Tools may send the key as
``Authorization: Bearer`` instead of the cookie.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from starlette.requests import Request
from starlette.responses import Response

from hookline.errors import Unauthorized
from hookline.gateway import Gateway

COOKIE = "hookline_dashboard"
PATH = "/dashboard"
SESSION_SECONDS = 12 * 3600


@dataclasses.dataclass(frozen=True, slots=True)
class Viewer:
    tenant: str
    admin: bool
    csrf: str  # the token each form carries

    @property
    def scope(self) -> str | None:
        """The tenant whose records this viewer sees; None: every tenant's."""
        return None if self.admin else self.tenant

    def may_see(self, tenant: str) -> bool:
        return self.admin or tenant == self.tenant


def _key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.cookies.get(COOKIE) or None


def csrf_token(key: str) -> str:
    return hashlib.sha256(b"hookline-dashboard-csrf:" + key.encode()).hexdigest()[:32]


async def viewer_for(request: Request, gateway: Gateway, key: str | None = None) -> Viewer | None:
    """The viewer the request's key (or ``key``) signs in, or None without a valid one."""
    key = key or _key(request)
    if not key:
        return None
    try:
        caller = await gateway.keys.caller_for(f"Bearer {key}")
    except Unauthorized:
        return None
    return Viewer(caller.tenant, caller.admin, csrf_token(key))


def csrf_ok(viewer: Viewer, token: object) -> bool:
    return isinstance(token, str) and hmac.compare_digest(token, viewer.csrf)


def remember(response: Response, request: Request, key: str) -> None:
    response.set_cookie(
        COOKIE, key, max_age=SESSION_SECONDS, path=PATH, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def forget(response: Response) -> None:
    response.delete_cookie(COOKIE, path=PATH)
