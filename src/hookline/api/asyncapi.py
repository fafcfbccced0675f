"""``GET /asyncapi.json``: an AsyncAPI 3.0 document of every channel a consumer can listen on: the
webhooks a job or an endpoint receives, a job's and a tenant's SSE streams, a job's WebSocket, and
each data sink configured in this process (its kind and target, never its URL, which may hold
credentials). The payloads' schemas are the OpenAPI spec's components (the job object, the
event), so the two documents never disagree. See docs/sinks.md."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from hookline.api.deps import GatewayDep
from hookline.api.schemas import EventOut, JobOut
from hookline.config import SinkConfig

router = APIRouter(tags=["health"])

_SCHEMAS = "#/components/schemas/"
# Each sink kind's AsyncAPI protocol and what its target names there.
_PROTOCOLS = {
    "redis": ("redis", "the Redis stream key (XADD)"),
    "nats": ("nats", "the NATS subject (JetStream)"),
    "amqp": ("amqp", "the AMQP exchange/routing key, or a queue"),
    "mqtt": ("mqtt", "the MQTT topic (QoS 1)"),
    "postgres": ("postgres", "the PostgreSQL table (a row per message)"),
    "jsonl": ("file", "the JSON Lines file in the sink's directory"),
}
_WEBHOOK_BODY = {
    "title": "WebhookBody",
    "description": "The body of a webhook, and of a data sink's message with the webhook envelope:"
    " signed with the Standard Webhooks headers (webhook-id, webhook-timestamp,"
    " webhook-signature) where the channel has headers.",
    "type": "object",
    "required": ["type", "timestamp", "data"],
    "properties": {
        "type": {"type": "string", "examples": ["job.succeeded"]},
        "timestamp": {"type": "string", "format": "date-time"},
        "data": {"description": "The job object for job.* events, the batch for batch.*",
                 "anyOf": [{"$ref": _SCHEMAS + "JobOut"}, {"type": "object"}]},
    },
}  # fmt: skip
_CLOUDEVENT = {
    "title": "CloudEvent",
    "description": "A CloudEvents 1.0 event (envelope = cloudevents): structured mode in Redis,"
    " PostgreSQL and JSONL; binary mode (the attributes as headers, data as the body) on NATS,"
    " AMQP and MQTT.",
    "type": "object",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"const": "1.0"}, "id": {"type": "string"},
        "source": {"type": "string"}, "type": {"type": "string"},
        "subject": {"type": "string"}, "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {"const": "application/json"}, "data": {"type": "object"},
    },
}  # fmt: skip
_SIGNATURE_HEADERS = {
    "type": "object",
    "properties": {
        name: {"type": "string"}
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
    },
}


def _message(name: str, payload: str, title: str, headers: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name, "title": title, "contentType": "application/json",
        "payload": {"$ref": _SCHEMAS + payload},
    }  # fmt: skip
    if headers:
        message["headers"] = _SIGNATURE_HEADERS
    return message


def _sink_channel(sink: SinkConfig) -> dict[str, Any]:
    what = _PROTOCOLS[sink.type][1]
    message = "cloudEvent" if sink.envelope == "cloudevents" else "webhookBody"
    return {
        "address": sink.target,
        "title": f"Data sink {sink.name}",
        "description": f"{what}. Events: {', '.join(sink.events)}; tenants:"
        f" {', '.join(sink.tenants)}; {'every job' if sink.all_jobs else 'jobs that name it'}.",
        "servers": [{"$ref": f"#/servers/sink-{sink.name}"}],
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "x-hookline-sink": {"name": sink.name, "type": sink.type, "envelope": sink.envelope},
    }


def document(openapi: dict[str, Any], sinks: list[SinkConfig], version: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document for an app whose OpenAPI spec is ``openapi``."""
    schemas = dict(openapi.get("components", {}).get("schemas", {}))
    for model in (EventOut, JobOut):  # the payloads' models, whether or not a route names them
        schema = model.model_json_schema(ref_template=_SCHEMAS + "{model}")
        schemas |= schema.pop("$defs", {})
        schemas.setdefault(model.__name__, schema)
    schemas |= {"WebhookBody": _WEBHOOK_BODY, "CloudEvent": _CLOUDEVENT}
    channels: dict[str, Any] = {
        "webhook": {
            "address": "{url}",
            "title": "Webhooks",
            "description": "POSTed to a job's webhook and to the tenant's webhook endpoints.",
            "parameters": {"url": {"description": "The receiver's URL"}},
            "messages": {"webhookBody": {"$ref": "#/components/messages/webhookBody"}},
        },
        "jobEvents": {
            "address": "/v1/jobs/{job_id}/events",
            "title": "A job's events (SSE)",
            "parameters": {"job_id": {"description": "The job's id"}},
            "servers": [{"$ref": "#/servers/api"}],
            "messages": {"event": {"$ref": "#/components/messages/event"}},
        },
        "tenantEvents": {
            "address": "/v1/events",
            "title": "Every event of the tenant (SSE)",
            "servers": [{"$ref": "#/servers/api"}],
            "messages": {"event": {"$ref": "#/components/messages/event"}},
        },
        "jobSocket": {
            "address": "/v1/jobs/{job_id}/ws",
            "title": "A job's events (WebSocket)",
            "parameters": {"job_id": {"description": "The job's id"}},
            "servers": [{"$ref": "#/servers/ws"}],
            "messages": {"event": {"$ref": "#/components/messages/event"}},
        },
    }
    servers: dict[str, Any] = {
        "api": {"host": "{host}", "protocol": "http", "description": "This gateway (SSE)",
                "variables": {"host": {"default": "127.0.0.1:8000"}}},
        "ws": {"host": "{host}", "protocol": "ws", "description": "This gateway (WebSocket)",
               "variables": {"host": {"default": "127.0.0.1:8000"}}},
    }  # fmt: skip
    for sink in sinks:
        channels[f"sink-{sink.name}"] = _sink_channel(sink)
        # The broker is the operator's: its kind only, never its URL (credentials).
        servers[f"sink-{sink.name}"] = {
            "host": "operator-configured", "protocol": _PROTOCOLS[sink.type][0],
            "description": f"The {sink.type} server of sink {sink.name} (its URL is not shown)",
        }  # fmt: skip
    operations = {
        f"receive-{name}": {"action": "receive", "channel": {"$ref": f"#/channels/{name}"}}
        for name in channels
    }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "hookline events", "version": version,
                 "description": "Every channel a consumer of hookline's events can listen on."},
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": {
                "webhookBody": _message("webhookBody", "WebhookBody", "A webhook body", True),
                "cloudEvent": _message("cloudEvent", "CloudEvent", "A CloudEvent"),
                "event": _message("event", "EventOut", "A job's event"),
            },
        },
    }  # fmt: skip


@router.get("/asyncapi.json", summary="An AsyncAPI 3.0 document of every event channel")
async def asyncapi(request: Request, gateway: GatewayDep) -> dict[str, Any]:
    """Webhooks, the SSE and WebSocket streams, and each configured data sink (without its URL),
    with the events' schemas."""
    from hookline._version import __version__

    return document(request.app.openapi(), list(gateway.settings.sinks), __version__)
