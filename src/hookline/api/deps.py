"""Request-scoped dependencies: the gateway and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from hookline.gateway import Gateway


async def get_gateway(request: Request) -> Gateway:  # async: a sync dependency costs a thread hop
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_tenant(request: Request) -> str:
    """The tenant of the request's API key; 401 problem otherwise."""
    gateway: Gateway = request.app.state.gateway
    return await gateway.keys.tenant_for(request.headers.get("authorization"))


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
TenantDep = Annotated[str, Depends(get_tenant)]
