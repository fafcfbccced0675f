"""The admin API for API keys, ``/v1/admin/keys``: what ``hookline keys`` does, over HTTP, for a
dashboard. Only a key with the admin role (``hookline keys create --admin``) may call it, and it
sees the keys of every tenant. A key is shown once, in the answer that creates it; only its hash
is stored. (``ADMIN_ONLY`` and ``AdminDep`` guard the other admin routes too.)"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from hookline.api.deps import GatewayDep
from hookline.api.problems import RequestProblem, json_response
from hookline.auth import MAX_LIMIT, MAX_NAME_LENGTH, TENANT_PATTERN, Caller
from hookline.errors import NotFound
from hookline.fairness import KeyLimits

router = APIRouter(prefix="/v1/admin", tags=["admin"])
ADMIN_ONLY: dict[int | str, dict[str, Any]] = {403: {"description": "The key is not an admin key."}}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=TENANT_PATTERN.pattern, description="The tenant the key acts for.")
    name: str | None = Field(
        default=None, min_length=1, max_length=MAX_NAME_LENGTH, description="What it is for."
    )
    expires_in_seconds: float | None = Field(
        default=None, gt=0, le=100 * 365 * 86400, allow_inf_nan=False,
        description="Refused after this long (default: never).",
    )  # fmt: skip
    admin: bool = Field(default=False, description="The key may call the admin API too.")
    # The key's own limits, within its tenant's (docs/fairness.md); none by default.
    max_concurrency: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="Its jobs running at once."
    )
    requests_per_minute: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="Calls its jobs start in a rolling minute."
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="Their tokens in a rolling minute."
    )
    daily_token_budget: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="Tokens of its jobs per UTC day."
    )
    monthly_token_budget: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="Tokens of its jobs per calendar month."
    )

    def limits(self) -> KeyLimits:
        return KeyLimits(
            self.max_concurrency, self.requests_per_minute, self.tokens_per_minute,
            self.daily_token_budget, self.monthly_token_budget,
        )  # fmt: skip


async def admin_caller(request: Request, gateway: GatewayDep) -> Caller:
    """The caller, if its key has the admin role; 403 otherwise."""
    caller = await gateway.keys.caller_for(request.headers.get("authorization"))
    if not caller.admin:
        detail = "only an admin key may call the admin API (hookline keys create --admin)"
        raise RequestProblem(403, detail, slug="forbidden")
    return caller


AdminDep = Annotated[Caller, Depends(admin_caller)]


@router.get("/keys", summary="List API keys, oldest first", responses=ADMIN_ONLY)
async def list_keys(
    gateway: GatewayDep,
    _admin: AdminDep,
    tenant: Annotated[str | None, Query(max_length=64, description="Only this tenant's.")] = None,
    include_all: Annotated[
        bool, Query(alias="all", description="Revoked and expired keys too.")
    ] = False,
) -> Response:
    now = gateway.clock.now_ms()
    found = await gateway.keys.list(tenant, include_unusable=include_all)
    return json_response({"object": "list", "data": [key.as_json(now) for key in found]})


@router.post("/keys", status_code=201, summary="Create an API key", responses=ADMIN_ONLY)
async def create_key(body: KeyCreate, gateway: GatewayDep, _admin: AdminDep) -> Response:
    """The new key (``key``, shown this once) and its record."""
    now = gateway.clock.now_ms()
    expires_at = None
    if body.expires_in_seconds is not None:
        expires_at = now + int(body.expires_in_seconds * 1000)
    key, record = await gateway.keys.issue(
        body.tenant, name=body.name, expires_at=expires_at, admin=body.admin, limits=body.limits()
    )
    return json_response({**record.as_json(now), "key": key}, 201)


@router.get("/keys/{key_id}", summary="An API key", responses=ADMIN_ONLY)
async def get_key(key_id: str, gateway: GatewayDep, _admin: AdminDep) -> Response:
    found = await gateway.keys.keys.get(key_id)
    if found is None:
        raise NotFound(f"no API key {key_id!r}")
    return json_response(found.as_json(gateway.clock.now_ms()))


@router.post(
    "/keys/{key_id}/revoke",
    summary="Revoke an API key: every API process refuses it at once",
    responses=ADMIN_ONLY,
)
async def revoke_key(key_id: str, gateway: GatewayDep, _admin: AdminDep) -> Response:
    """The key, revoked (revoking it again changes nothing)."""
    if not key_id.startswith("key_") or (await gateway.keys.keys.get(key_id)) is None:
        raise NotFound(f"no API key {key_id!r}")
    await gateway.keys.revoke(key_id)
    found = await gateway.keys.keys.get(key_id)
    assert found is not None
    return json_response(found.as_json(gateway.clock.now_ms()))
