"""``GET /v1/usage``: a tenant's own use of the gateway: its jobs and tokens per day and model,
its limits, and what it uses of them now (docs/fairness.md)."""

from __future__ import annotations

import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from hookline.api.deps import GatewayDep, get_caller
from hookline.api.problems import json_response
from hookline.fairness import WINDOW_MS, budget_periods, key_scope, tenant_scope

DAY_MS = 86_400_000
router = APIRouter(prefix="/v1", tags=["usage"])


class UsageDay(BaseModel):
    date: str = Field(description="The UTC day the jobs were submitted (YYYY-MM-DD).")
    model: str
    jobs: int
    succeeded: int
    input_tokens: int
    output_tokens: int


class UsageLimits(BaseModel):
    weight: float
    max_concurrency: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    daily_token_budget: int | None
    monthly_token_budget: int | None


class UsageNow(BaseModel):
    running: int = Field(description="Jobs running now, on every upstream.")
    requests_last_minute: int = Field(description="Calls started in the last minute (counted "
                                      "when a per-minute limit applies).")  # fmt: skip
    tokens_last_minute: int = Field(description="Their tokens: reserved, then as used.")
    tokens_today: int
    tokens_this_month: int


class KeyUsageLimits(BaseModel):
    max_concurrency: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    daily_token_budget: int | None
    monthly_token_budget: int | None


class KeyUsage(BaseModel):
    id: str = Field(description="The API key of the request.")
    limits: KeyUsageLimits = Field(description="Its own limits, within the tenant's.")
    in_use: UsageNow = Field(description="What the jobs it submitted use of them now.")


class Usage(BaseModel):
    object: str = "usage"
    tenant: str
    limits: UsageLimits
    in_use: UsageNow
    key: KeyUsage | None = Field(
        default=None, description="The request's key, when it has limits of its own."
    )
    days: list[UsageDay]


@router.get("/usage", response_model=Usage, summary="Your usage, limits and what is in use now")
async def usage(
    gateway: GatewayDep,
    request: Request,
    days: Annotated[
        int, Query(ge=1, le=93, description="How many UTC days back, today included")
    ] = 31,
) -> Response:
    """The tenant's jobs and tokens per UTC day and model (of the jobs submitted on that day),
    its share and limits, and what it uses of them now; and the same of the request's key, when
    it has limits of its own. Tokens are as the upstreams reported them."""
    caller = await get_caller(request)
    tenant = caller.tenant
    queue, store = gateway.queue, gateway.store
    now = queue.clock.now_ms()
    today, _, month, _ = budget_periods(now)
    limits = queue.fair.limits(tenant)
    weight = queue.fair.weight(tenant, (await store.keys.weights([tenant])).get(tenant))
    own = caller.limits if caller.limits.as_json() else None
    state = await store.limit_state(tenant, (), now, caller.key_id if own else None)
    starts, tokens, _ = state.window.get(tenant_scope(tenant), (0, 0, now - WINDOW_MS))
    rows = await store.usage_by_day(tenant, min(today - (days - 1) * DAY_MS, month))
    first_day = today - (days - 1) * DAY_MS
    body: dict[str, Any] = {
        "object": "usage",
        "tenant": tenant,
        "limits": {
            "weight": weight,
            "max_concurrency": limits.max_concurrency,
            "requests_per_minute": limits.requests_per_minute,
            "tokens_per_minute": limits.tokens_per_minute,
            "daily_token_budget": limits.daily_token_budget,
            "monthly_token_budget": limits.monthly_token_budget,
        },
        "in_use": {
            "running": state.running,
            "requests_last_minute": starts,
            "tokens_last_minute": tokens,
            "tokens_today": sum(r.input_tokens + r.output_tokens for r in rows if r.day >= today),
            "tokens_this_month": sum(
                r.input_tokens + r.output_tokens for r in rows if r.day >= month
            ),
        },
        "key": None,
        "days": [
            {
                "date": datetime.datetime.fromtimestamp(row.day / 1000, tz=datetime.UTC)
                .date()
                .isoformat(),
                "model": row.model,
                "jobs": row.jobs,
                "succeeded": row.succeeded,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
            }
            for row in rows
            if row.day >= first_day
        ],
    }
    if own is not None:
        key_starts, key_tokens, _ = state.window.get(key_scope(caller.key_id), (0, 0, now))
        body["key"] = {
            "id": caller.key_id,
            "limits": {**dict.fromkeys(KeyUsageLimits.model_fields), **own.as_json()},
            "in_use": {
                "running": state.key_running,
                "requests_last_minute": key_starts,
                "tokens_last_minute": key_tokens,
                "tokens_today": await store.tokens_spent(tenant, today, caller.key_id),
                "tokens_this_month": await store.tokens_spent(tenant, month, caller.key_id),
            },
        }
    return json_response(body)
