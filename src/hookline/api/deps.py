"""Who is calling: the API key is checked first, by :class:`AuthMiddleware`, before a route or its
body is looked at; the routes then take the gateway and the caller's tenant (or the caller: the
key with its tenant and its own limits) as dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from hookline.api.problems import OPENAI_PATHS, error_response
from hookline.auth import Caller
from hookline.errors import HooklineError
from hookline.gateway import Gateway

_SCOPE_KEY = "hookline.caller"
API_PREFIX = "/v1/"
# Webhooks from the upstreams (hookline.api.inbound): signed with the upstream's secret instead.
INBOUND = "/v1/inbound/"


class AuthMiddleware:
    """Every HTTP request under ``/v1/`` needs a valid key: without one it is answered 401 before
    its body is read, so a caller without a key learns nothing about what it sent. (WebSockets
    check the key themselves: they answer by closing the socket.)"""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(API_PREFIX) or path.startswith(INBOUND):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
            if name == b"x-api-key" and authorization is None:  # as Anthropic's SDK sends it
                authorization = "Bearer " + value.decode("latin-1")
        try:
            scope[_SCOPE_KEY] = await self.gateway.keys.caller_for(authorization)
        except HooklineError as exc:  # 401, or 503 when the database cannot say
            where = f"{scope['method']} {path}"
            response = error_response(exc, where, openai=path in OPENAI_PATHS)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def get_gateway(request: Request) -> Gateway:  # async: a sync dependency costs a thread hop
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_caller(request: Request) -> Caller:
    """Who the request's API key speaks for; 401 problem otherwise."""
    caller: Caller | None = request.scope.get(_SCOPE_KEY)
    if caller is None:  # an app built without the middleware
        gateway: Gateway = request.app.state.gateway
        given = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization") or (given and f"Bearer {given}")
        caller = await gateway.keys.caller_for(authorization)
    return caller


async def get_tenant(request: Request) -> str:
    """The tenant of the request's API key; 401 problem otherwise."""
    return (await get_caller(request)).tenant


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
TenantDep = Annotated[str, Depends(get_tenant)]
