"""Webhook endpoints, signing secrets and deliveries: ``/v1/webhook-endpoints``,
``/v1/webhook-secret``, ``/v1/deliveries``."""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from hookline.api.deps import GatewayDep, TenantDep
from hookline.api.problems import json_response
from hookline.api.schemas import check_event_filters, page_cursor
from hookline.deliveries import DEFAULT_JOB_EVENTS
from hookline.delivery.webhooks.ssrf import check_url
from hookline.errors import InvalidRequest, NotFound

router = APIRouter(prefix="/v1", tags=["webhooks"])
_MAX_PAGE = 200


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[str] = Field(default_factory=lambda: list(DEFAULT_JOB_EVENTS), max_length=32)
    description: str | None = Field(default=None, max_length=512)
    rate_limit_per_second: float | None = Field(
        default=None, gt=0, le=10_000, strict=True, allow_inf_nan=False
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> EndpointCreate:
        check_event_filters(self.events)
        return self


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    events: list[str] | None = Field(default=None, max_length=32)
    description: str | None = Field(default=None, max_length=512)
    rate_limit_per_second: float | None = Field(
        default=None, gt=0, le=10_000, strict=True, allow_inf_nan=False
    )
    enabled: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> EndpointUpdate:
        check_event_filters(self.events)
        return self


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: float | None = Field(
        default=None,
        ge=0,
        le=30 * 86400,
        strict=True,
        allow_inf_nan=False,
        description="How long the old secret keeps signing.",
    )


class Recovery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime.datetime = Field(description="Re-send failed messages created since then.")


def _ms(moment: datetime.datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


async def _endpoint_or_404(gateway: GatewayDep, tenant: str, endpoint_id: str) -> Any:
    endpoint = await gateway.store.webhooks.get_endpoint(tenant, endpoint_id)
    if endpoint is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    return endpoint


@router.post("/webhook-endpoints", status_code=201, summary="Register a webhook endpoint")
async def create_endpoint(body: EndpointCreate, gateway: GatewayDep, tenant: TenantDep) -> Response:
    """Every event of the tenant that matches ``events`` is sent to ``url``, signed with the
    endpoint's own secret (``GET /v1/webhook-endpoints/{id}/secret``)."""
    await check_url(body.url, gateway.address_policy)
    fields = body.model_dump()
    fields["disabled_reason"] = None if body.enabled else "disabled by the caller"
    endpoint = await gateway.store.webhooks.create_endpoint(tenant, fields, gateway.clock.now_ms())
    return json_response(endpoint.as_json(), 201)


@router.get("/webhook-endpoints", summary="List webhook endpoints")
async def list_endpoints(gateway: GatewayDep, tenant: TenantDep) -> Response:
    endpoints = await gateway.store.webhooks.list_endpoints(tenant)
    return json_response({"object": "list", "data": [e.as_json() for e in endpoints]})


@router.get("/webhook-endpoints/{endpoint_id}", summary="Get a webhook endpoint")
async def get_endpoint(endpoint_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    return json_response((await _endpoint_or_404(gateway, tenant, endpoint_id)).as_json())


@router.patch("/webhook-endpoints/{endpoint_id}", summary="Update a webhook endpoint")
async def update_endpoint(
    endpoint_id: str, body: EndpointUpdate, gateway: GatewayDep, tenant: TenantDep
) -> Response:
    """Change fields; ``enabled: true`` re-enables a disabled endpoint and resumes its queue."""
    fields = body.model_dump(exclude_unset=True)
    if "url" in fields:
        if fields["url"] is None:
            raise InvalidRequest("url cannot be null")
        await check_url(fields["url"], gateway.address_policy)
    if fields.get("events", []) is None:
        raise InvalidRequest("events cannot be null")
    if "enabled" in fields:
        if fields["enabled"] is None:
            raise InvalidRequest("enabled cannot be null")
        fields["disabled_reason"] = None if fields["enabled"] else "disabled by the caller"
        if fields["enabled"]:
            fields["failing_since"] = None
    endpoint = await gateway.store.webhooks.update_endpoint(
        tenant, endpoint_id, fields, gateway.clock.now_ms()
    )
    if endpoint is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    if gateway.sender is not None:
        gateway.sender.wake()
    return json_response(endpoint.as_json())


@router.delete("/webhook-endpoints/{endpoint_id}", status_code=204, summary="Delete an endpoint")
async def delete_endpoint(endpoint_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    """Delete it; its pending messages are marked failed."""
    if not await gateway.store.webhooks.delete_endpoint(
        tenant, endpoint_id, gateway.clock.now_ms()
    ):
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    return Response(status_code=204)


async def _secret_json(gateway: GatewayDep, tenant: str, endpoint_id: str | None) -> Response:
    secrets = await gateway.store.webhooks.signing_secrets(
        tenant, endpoint_id, gateway.clock.now_ms()
    )
    return json_response(
        {"object": "webhook_secret", "secret": secrets[0], "signing": len(secrets)}
    )


@router.get("/webhook-endpoints/{endpoint_id}/secret", summary="An endpoint's signing secret")
async def endpoint_secret(endpoint_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    """The current ``whsec_`` secret (``signing``: how many secrets sign while rotating)."""
    await _endpoint_or_404(gateway, tenant, endpoint_id)
    return await _secret_json(gateway, tenant, endpoint_id)


async def _rotate(
    gateway: GatewayDep, tenant: str, endpoint_id: str | None, body: Rotation
) -> Response:
    overlap = body.overlap_seconds
    if overlap is None:
        overlap = gateway.settings.webhooks.secret_overlap_seconds
    await gateway.store.webhooks.rotate_secret(
        tenant, endpoint_id, int(overlap * 1000), gateway.clock.now_ms()
    )
    return await _secret_json(gateway, tenant, endpoint_id)


@router.post(
    "/webhook-endpoints/{endpoint_id}/secret/rotate", summary="Rotate an endpoint's secret"
)
async def rotate_endpoint_secret(
    endpoint_id: str,
    gateway: GatewayDep,
    tenant: TenantDep,
    body: Annotated[Rotation, Body()] = Rotation(),
) -> Response:
    """A new secret; the old one keeps signing beside it for ``overlap_seconds`` (default 24 h)."""
    await _endpoint_or_404(gateway, tenant, endpoint_id)
    return await _rotate(gateway, tenant, endpoint_id, body)


@router.get("/webhook-secret", summary="The tenant's secret for per-job webhook URLs")
async def tenant_secret(gateway: GatewayDep, tenant: TenantDep) -> Response:
    return await _secret_json(gateway, tenant, None)


@router.post("/webhook-secret/rotate", summary="Rotate the tenant's per-job webhook secret")
async def rotate_tenant_secret(
    gateway: GatewayDep, tenant: TenantDep, body: Annotated[Rotation, Body()] = Rotation()
) -> Response:
    return await _rotate(gateway, tenant, None, body)


@router.post(
    "/webhook-endpoints/{endpoint_id}/recover", status_code=202, summary="Re-send failed messages"
)
async def recover_endpoint(
    endpoint_id: str, body: Recovery, gateway: GatewayDep, tenant: TenantDep
) -> Response:
    """Queue every failed message of this endpoint created since ``since`` to be sent again."""
    await _endpoint_or_404(gateway, tenant, endpoint_id)
    count = await gateway.store.webhooks.resend(
        tenant, gateway.clock.now_ms(), endpoint_id=endpoint_id, since=_ms(body.since)
    )
    if gateway.sender is not None:
        gateway.sender.wake()
    return json_response({"object": "recovery", "queued": count}, 202)


@router.get(
    "/deliveries",
    summary="List deliveries (webhooks and data sinks), newest first",
    responses={400: {"description": "A cursor this list did not give."}},
)
async def list_deliveries(
    gateway: GatewayDep,
    tenant: TenantDep,
    endpoint_id: Annotated[str | None, Query(max_length=64)] = None,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    sink: Annotated[str | None, Query(max_length=64, description="A data sink's name.")] = None,
    status: Literal["pending", "succeeded", "failed"] | None = None,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    found = await gateway.store.webhooks.list_deliveries(
        tenant,
        endpoint_id=endpoint_id,
        job_id=job_id,
        sink=sink,
        status=status,
        since=_ms(since) if since else None,
        until=_ms(until) if until else None,
        before_id=page_cursor(cursor, "msg"),
        limit=limit + 1,
    )
    page, has_more = found[:limit], len(found) > limit
    return json_response(
        {
            "object": "list",
            "data": [d.as_json() for d in page],
            "has_more": has_more,
            "next_cursor": page[-1].id if has_more else None,
        }
    )


@router.get("/deliveries/{delivery_id}", summary="A delivery with every attempt")
async def get_delivery(delivery_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    found = await gateway.store.webhooks.get_delivery(tenant, delivery_id)
    if found is None:
        raise NotFound(f"no delivery {delivery_id!r}")
    delivery, attempts = found
    return json_response({**delivery.as_json(), "attempts_log": [a.as_json() for a in attempts]})


@router.post("/deliveries/{delivery_id}/retry", status_code=202, summary="Send a message again now")
async def retry_delivery(delivery_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    if not await gateway.store.webhooks.resend(
        tenant, gateway.clock.now_ms(), delivery_id=delivery_id
    ):
        raise NotFound(f"no delivery {delivery_id!r}")
    if gateway.sender is not None:
        gateway.sender.wake()
    found = await gateway.store.webhooks.get_delivery(tenant, delivery_id)
    assert found is not None
    return json_response(found[0].as_json(), 202)
