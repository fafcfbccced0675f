"""``GET /v1/admin/upstreams``: each upstream as an operator sees it — its health, its circuit
breaker, its concurrency in use and its queue depth — what ``hookline upstreams`` prints. Admin
keys only: it counts every tenant's jobs.

The circuit is this process's (on PostgreSQL every process's circuits change together); the
health is what this process's calls saw, so an API process without a worker reports only the
circuit; the counts come from the database and hold for every process."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.responses import Response

from hookline.api.deps import GatewayDep
from hookline.api.keys import ADMIN_ONLY, AdminDep
from hookline.api.problems import json_response
from hookline.jobs import iso
from hookline.observability.health import Check

router = APIRouter(prefix="/v1/admin", tags=["admin"])

HOUR_MS = 3_600_000


class CircuitOut(BaseModel):
    state: Literal["closed", "open", "half_open"]
    consecutive_failures: int = Field(description="Retryable failures in a row, as counted here.")
    failures_to_open: int
    retry_in_seconds: float = Field(description="Until an open circuit half-opens (0 if not).")


class UpstreamOut(BaseModel):
    object: Literal["upstream"] = "upstream"
    name: str
    type: str
    models: list[str]
    routes: list[str] = Field(description="The routes that name it as a target.")
    health: Literal["ok", "failing", "unknown"]
    health_detail: str | None
    last_error: str | None = Field(description="The last failure this process's calls saw.")
    circuit: CircuitOut
    max_concurrency: int
    running: int = Field(description="Its jobs running now, in every process.")
    queued: int = Field(description="Its jobs waiting to start (the queue depth).")
    oldest_queued_at: str | None
    succeeded_last_hour: int
    failed_last_hour: int


class UpstreamList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UpstreamOut]


@router.get(
    "/upstreams",
    response_model=UpstreamList,
    summary="Every upstream's health, circuit, concurrency in use and queue depth",
    responses=ADMIN_ONLY,
)
async def list_upstreams(gateway: GatewayDep, _admin: AdminDep) -> Response:
    """The upstreams in the order of the configuration, each with its jobs of every tenant."""
    now = gateway.clock.now_ms()
    load = {u.name: u for u in await gateway.store.insights.upstream_load(None, now - HOUR_MS)}
    router_ = gateway.queue.router
    data: list[dict[str, Any]] = []
    for config in gateway.settings.upstreams:
        check = gateway.checks.get(f"upstream:{config.name}")
        health = await check() if check is not None else Check("unknown")
        circuit = router_.circuits.get(config.name)
        seen = load.get(config.name)
        data.append({
            "object": "upstream",
            "name": config.name,
            "type": config.type,
            "models": config.models,
            "routes": [r.model for r in gateway.settings.routes
                       if any(t.upstream == config.name for t in r.targets)],
            "health": health.status,
            "health_detail": health.detail,
            "last_error": health.info.get("last_error"),
            "circuit": {
                "state": router_.state(config.name).value,
                "consecutive_failures": circuit.failures if circuit else 0,
                "failures_to_open": config.circuit_failures,
                "retry_in_seconds": circuit.retry_in(now) if circuit else 0.0,
            },
            "max_concurrency": config.max_concurrency,
            "running": seen.running if seen else 0,
            "queued": seen.queued if seen else 0,
            "oldest_queued_at": iso(seen.oldest_queued_at) if seen else None,
            "succeeded_last_hour": seen.succeeded_last_hour if seen else 0,
            "failed_last_hour": seen.failed_last_hour if seen else 0,
        })  # fmt: skip
    return json_response({"object": "list", "data": data})
