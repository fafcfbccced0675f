"""``/healthz`` (the process is alive) and ``/readyz`` (it can serve: every dependency's check,
run together, in one JSON body that says which is failing; :mod:`hookline.observability.health`).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from hookline.api.deps import GatewayDep
from hookline.api.problems import problem
from hookline.gateway import Gateway
from hookline.observability.health import Check, HealthCheck, run_checks
from hookline.store.migrate import head_revision, schema_state

router = APIRouter(tags=["health"])

_READY_EXAMPLE = {
    "status": "ready",
    "database": "ok",
    "schema": "current",
    "revision": "0009",
    "checks": {
        "database": {"status": "ok", "required": True},
        "schema": {"status": "ok", "required": True, "state": "current", "revision": "0009"},
        "notify": {"status": "ok", "required": False},
        "upstream:openai": {
            "status": "ok",
            "required": False,
            "circuit": "closed",
            "consecutive_failures": 0,
        },
    },
}


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: every dependency's health; ready while the database and its schema are",
    responses={
        200: {"content": {"application/json": {"example": _READY_EXAMPLE}}},
        503: {
            "description": "A required dependency fails: the database does not answer, is "
            "full, or its schema is behind. `checks` says which."
        },
    },
)
async def readyz(gateway: GatewayDep) -> Response:
    """``checks`` holds each dependency: the database, its schema, the wake-up connection between
    processes on PostgreSQL (``notify``), each upstream's circuit breaker (failing while open or
    half-open), and whatever else registered one (sinks). Only a failing required check makes
    the answer ``503``."""
    schema: dict[str, Any] = {}
    checks: dict[str, HealthCheck] = {
        "database": lambda: _database(gateway),
        "schema": lambda: _schema(gateway, schema),
        **gateway.checks,
    }
    results = await run_checks(checks)
    body = {name: check.as_json() for name, check in results.items()}
    failing = [(name, check) for name, check in results.items() if check.failing and check.required]
    if failing:
        name, check = failing[0]
        storage_full = name == "database" and gateway.store.database.storage_problem() is not None
        return problem(
            503, f"{name}: {check.detail}", slug="not-ready", checks=body,
            headers={"Retry-After": "5"} if storage_full else None,
        )  # fmt: skip
    ready = {"status": "ready", "database": "ok", **schema, "checks": body}
    return Response(orjson.dumps(ready), media_type="application/json")


async def _database(gateway: Gateway) -> Check:
    database = gateway.store.database
    await gateway.store.ping()
    storage = database.storage_problem()
    if storage is not None:
        return Check("failing", detail=storage)
    return Check("ok")


async def _schema(gateway: Gateway, found: dict[str, Any]) -> Check:
    state, revision = await schema_state(gateway.store.database)
    found.update(schema=state, revision=revision)
    info = {"state": state, "revision": revision}
    if state in ("behind", "empty"):
        detail = (f"the database schema is at {revision or 'nothing'}, this hookline needs "
                  f"{head_revision()}: run hookline migrate")  # fmt: skip
        return Check("failing", detail=detail, info=info)
    return Check("ok", info=info)
