"""``POST /v1/inbound/{upstream}``: webhooks from an upstream (OpenAI's ``batch.*`` and
``response.*`` events), signed per Standard Webhooks with the ``whsec_`` secret of the
upstream's ``webhook_secret``. No API key: the signature is the credential. The signature and
the timestamp (within ``webhook_tolerance_seconds``) are checked, a replayed ``webhook-id`` is
refused, and the body is only a trigger: the object it names is fetched from the provider, never
taken from the webhook (docs/async-upstreams.md)."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from hookline.api.deps import GatewayDep
from hookline.api.problems import json_response
from hookline.batches.service import BATCHES_CHANGED
from hookline.delivery.webhooks.signing import verify
from hookline.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from hookline.live.notify import UPSTREAM_RESPONSE

router = APIRouter(prefix="/v1", tags=["inbound"])

_BODY = {
    "type": "object",
    "required": ["type", "data"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "description": "e.g. batch.completed, response.completed"},
        "created_at": {"type": "integer"},
        "data": {"type": "object", "properties": {"id": {"type": "string"}}},
    },
}


@router.post(
    "/inbound/{upstream}",
    summary="A webhook from an upstream (its batch or background response changed)",
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": _BODY}}}
    },
    responses={
        401: {"description": "The signature or the timestamp is not right."},
        404: {"description": "No upstream of that name takes webhooks (no webhook_secret)."},
        409: {"description": "This webhook-id was received before (a replay)."},
    },
)
async def inbound(upstream: str, request: Request, gateway: GatewayDep) -> Response:
    config = next((u for u in gateway.settings.upstreams if u.name == upstream), None)
    secret = config.resolved_webhook_secret() if config is not None else None
    if config is None or not secret:
        raise NotFound(f"no upstream {upstream!r} takes webhooks")
    body = await request.body()
    message_id = request.headers.get("webhook-id", "")
    timestamp = request.headers.get("webhook-timestamp", "")
    signature = request.headers.get("webhook-signature", "")
    if not (message_id and timestamp and signature) or len(message_id) > 256:
        raise Unauthorized("send webhook-id, webhook-timestamp and webhook-signature")
    if not verify(secret, message_id, timestamp, body, signature):
        raise Unauthorized("the webhook's signature is not right")
    now = time.time()
    try:
        sent = int(timestamp)
    except ValueError as exc:
        raise Unauthorized("webhook-timestamp is not a number of seconds") from exc
    if abs(now - sent) > config.webhook_tolerance_seconds:
        raise Unauthorized("webhook-timestamp is too far from now (a replay?)")
    now_ms = gateway.clock.now_ms()
    forget = now_ms - int(2 * config.webhook_tolerance_seconds * 1000)
    if not await gateway.store.batches.record_inbound(upstream, message_id, now_ms, forget):
        raise Conflict(f"webhook {message_id!r} was received before")
    try:
        event = orjson.loads(body)
        kind, object_id = str(event["type"]), str(event["data"]["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidRequest("the webhook is not an event {type, data: {id}}") from exc
    known = False
    if kind.startswith("batch."):
        batch_id = await gateway.store.batches.poke_part(upstream, object_id, now_ms)
        if batch_id is not None:
            known = True
            gateway.notifier.publish(BATCHES_CHANGED)  # the runner looks at it now
    elif kind.startswith("response."):  # a background response: its worker looks at it now
        gateway.notifier.publish(UPSTREAM_RESPONSE, object_id)
    return json_response({"received": True, "known": known})
