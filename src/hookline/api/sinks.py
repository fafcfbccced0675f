"""``GET /v1/sinks``: the data sinks a tenant's jobs may name (``"sinks": [...]`` on a job or a
batch), and those that receive its jobs anyway. The operator configures them (docs/sinks.md); a
sink's URL, which may hold credentials, is never shown."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from hookline.api.deps import GatewayDep, TenantDep
from hookline.api.problems import json_response
from hookline.errors import InvalidRequest, NotFound
from hookline.gateway import Gateway

router = APIRouter(prefix="/v1", tags=["sinks"])


def with_sinks(
    gateway: Gateway, tenant: str, webhook: dict[str, Any] | None, names: Sequence[str] | None
) -> dict[str, Any] | None:
    """A job's (or batch's) own deliveries with the sinks it named, refused (400) when one is no
    sink this tenant may use."""
    if not names:
        return webhook
    unknown = gateway.sink_routes.unknown(tenant, names)
    if unknown:
        available = ", ".join(r.name for r in gateway.sink_routes.available(tenant)) or "none"
        raise InvalidRequest(f"no such sink: {', '.join(unknown)} (available: {available})")
    return {**(webhook or {}), "sinks": list(dict.fromkeys(names))}


@router.get("/sinks", summary="The data sinks this tenant's jobs may name")
async def list_sinks(tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    """Each sink available to the tenant: its name, kind, target, the events it takes, and
    whether every job goes there (``all_jobs``) or only the jobs and batches that name it."""
    by_name = {sink.name: sink for sink in gateway.settings.sinks}
    data = []
    for route in gateway.sink_routes.available(tenant):
        sink = by_name[route.name]
        data.append(
            {
                "object": "sink",
                "name": sink.name,
                "type": sink.type,
                "target": sink.target,
                "events": sink.events,
                "all_jobs": sink.all_jobs,
                "envelope": sink.envelope,
            }
        )
    return {"object": "list", "data": data}


@router.post("/sinks/{name}/recover", status_code=202, summary="Re-send a sink's failed messages")
async def recover_sink(
    name: str, tenant: TenantDep, gateway: GatewayDep, since: datetime.datetime | None = None
) -> Response:
    """The tenant's dead letters of this sink (created since ``since``, default all) are made
    pending again, in their order; the number queued."""
    if gateway.sink_routes.unknown(tenant, [name]):
        raise NotFound(f"no sink {name!r}")
    since_ms = int(since.timestamp() * 1000) if since else None
    count = await gateway.store.webhooks.resend_sink(
        name, gateway.clock.now_ms(), tenant=tenant, since=since_ms
    )
    if gateway.sender is not None:
        gateway.sender.wake()
    return json_response({"object": "recovery", "queued": count}, 202)
