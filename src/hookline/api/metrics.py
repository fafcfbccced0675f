"""``GET /metrics``: this process's Prometheus metrics and the database's gauges
(:mod:`hookline.observability.metrics`; docs/operations.md). Open like ``/healthz``: serve it on
a port of its own (``[metrics] port``) where the API port is public."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from hookline.api.deps import GatewayDep

router = APIRouter()


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text exposition (OpenMetrics when asked for).",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        503: {"description": "The database does not answer (its gauges cannot be read)."},
    },
)
async def metrics(request: Request, gateway: GatewayDep) -> Response:
    body, content_type = await gateway.scrape(request.headers.get("accept", ""))
    return Response(body, headers={"Content-Type": content_type})
