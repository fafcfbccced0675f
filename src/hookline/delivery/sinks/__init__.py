"""Data sinks: destinations beside webhook endpoints (Redis Streams, NATS JetStream, AMQP, MQTT, a
PostgreSQL table, a JSONL file), fed from the same outbox by the same sender
(:class:`~hookline.delivery.webhooks.sender.WebhookSender`): a message's row names its sink, and
the sender hands it to :meth:`Sinks.publish` instead of POSTing it. So a sink gets what a webhook
gets: the message written with its event, at least once under a stable id, in order per job,
retried with backoff, dead-lettered, replayable.

One module per kind, each on its ecosystem's client, imported only when a sink of that kind is
configured (the ``redis``, ``nats``, ``amqp``, ``mqtt`` extras; PostgreSQL and files need none).
:class:`Sinks` holds this process's sinks, their health (``/readyz``) and a circuit breaker: a
sink failing again and again is left alone for a while (its messages wait, due), so it never
holds sends that other destinations could use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Iterable

import orjson

from hookline.config import SinkConfig
from hookline.delivery.sinks.base import Sink, SinkError, SinkMessage
from hookline.observability.health import Check, HealthCheck

__all__ = ["Sink", "SinkError", "SinkHealth", "SinkMessage", "Sinks", "build_sink", "sink_message"]

log = logging.getLogger("hookline.sinks")
# Failures in a row before a sink is left alone: first for FIRST_PAUSE_SECONDS, twice as long
# each time it fails again after a pause, up to MAX_PAUSE_SECONDS; a success closes it.
BREAK_AFTER = 5
FIRST_PAUSE_SECONDS = 0.5
MAX_PAUSE_SECONDS = 30.0
HEADERS_KINDS = frozenset({"nats", "amqp", "mqtt"})  # brokers whose messages carry headers


def build_sink(config: SinkConfig) -> Sink:
    """The sink of ``config``'s kind (its client library imported now)."""
    if config.type == "redis":
        from hookline.delivery.sinks.redis_streams import RedisSink

        return RedisSink(config)
    if config.type == "nats":
        from hookline.delivery.sinks.nats_jetstream import NatsSink

        return NatsSink(config)
    if config.type == "amqp":
        from hookline.delivery.sinks.amqp import AmqpSink

        return AmqpSink(config)
    if config.type == "mqtt":
        from hookline.delivery.sinks.mqtt import MqttSink

        return MqttSink(config)
    if config.type == "postgres":
        from hookline.delivery.sinks.postgres import PostgresSink

        return PostgresSink(config)
    from hookline.delivery.sinks.jsonl import JsonlSink

    return JsonlSink(config)


def sink_message(
    config: SinkConfig,
    message_id: str,
    tenant: str,
    job_id: str | None,
    payload: dict[str, object],
    signed: dict[str, str],
) -> SinkMessage:
    """The message a sink publishes for an outbox row: the webhook body with the Standard
    Webhooks headers (``signed``), or with ``envelope = "cloudevents"`` a CloudEvents 1.0 event:
    binary mode where the broker has headers, mapped as that broker's CloudEvents binding says
    (NATS ``ce-*`` headers, AMQP ``cloudEvents_*`` application properties, MQTT 5 user
    properties named as the attributes), structured mode (``application/cloudevents+json``)
    elsewhere. A ``traceparent`` goes along as the distributed tracing extension's attribute."""
    event_type = str(payload.get("type"))
    timestamp = str(payload.get("timestamp"))
    headers = {k: v for k, v in signed.items() if k != "user-agent"}
    if config.envelope != "cloudevents":
        return SinkMessage(
            message_id, event_type, job_id, tenant, timestamp, payload, orjson.dumps(payload),
            headers,
        )  # fmt: skip
    attributes = cloudevent_attributes(message_id, tenant, job_id, event_type, timestamp)
    if "traceparent" in signed:
        attributes["traceparent"] = signed["traceparent"]
    if config.type in HEADERS_KINDS:
        body = orjson.dumps(payload.get("data"))
        headers = binary_headers(config.type, attributes)
    else:
        body = orjson.dumps({**attributes, "data": payload.get("data")})
        headers = {"content-type": STRUCTURED}
    return SinkMessage(message_id, event_type, job_id, tenant, timestamp, payload, body, headers)


STRUCTURED = "application/cloudevents+json"
# Each binding's names for the attributes in binary mode: NATS and HTTP prefix ``ce-``; AMQP
# ``cloudEvents_`` (the binding's preferred prefix; ``cloudEvents:`` is the older one); MQTT 5
# uses the attribute names as they are. ``datacontenttype`` is the message's content type (NATS
# has no such property: a ``ce-datacontenttype`` header and ``content-type``).
_PREFIX = {"nats": "ce-", "amqp": "cloudEvents_", "mqtt": ""}


def cloudevent_attributes(
    message_id: str, tenant: str, job_id: str | None, event_type: str, timestamp: str
) -> dict[str, str]:
    """The CloudEvents 1.0 context attributes of one message (the id is the message id, stable
    across retries, so CloudEvents consumers dedupe on ``source`` + ``id`` as the spec says)."""
    return {
        "specversion": "1.0", "id": message_id, "source": f"hookline/{tenant}",
        "type": event_type, "time": timestamp, "datacontenttype": "application/json",
        **({"subject": job_id} if job_id else {}),
    }  # fmt: skip


def binary_headers(kind: str, attributes: dict[str, str]) -> dict[str, str]:
    """The headers of a binary-mode CloudEvent on broker ``kind`` (``content-type`` is the
    message's content type, which each sink sets where its broker has one)."""
    prefix = _PREFIX[kind]
    headers = {"content-type": attributes["datacontenttype"]}
    for name, value in attributes.items():
        if name == "datacontenttype" and kind != "nats":
            continue
        # NATS header values are percent-encoded beyond printable ASCII (the binding's rule).
        headers[prefix + name] = _percent(value) if kind == "nats" else value
    return headers


_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '%"')


def _percent(value: str) -> str:
    return urllib.parse.quote(value, safe=_HEADER_SAFE)


class SinkHealth:
    """What this process's publishes to one sink saw lately."""

    __slots__ = (
        "failures", "last_error", "last_failure_at", "last_success_at", "paused_until", "trips",
    )  # fmt: skip

    def __init__(self) -> None:
        self.failures = 0  # in a row
        self.last_error: str | None = None
        self.last_success_at: float | None = None
        self.last_failure_at: float | None = None
        self.paused_until = 0.0  # monotonic: the circuit breaker's
        self.trips = 0  # pauses since the last success

    def check(self) -> Check:
        info: dict[str, object] = {"consecutive_failures": self.failures}
        if self.last_success_at is not None:
            info["last_success_at"] = _iso(self.last_success_at)
        if self.last_error is not None:
            info["last_error"] = self.last_error
            info["last_failure_at"] = _iso(self.last_failure_at)
        if self.failures:
            return Check("failing", required=False, detail=self.last_error, info=info)
        if self.last_success_at is None:
            return Check("unknown", required=False, detail="nothing published yet", info=info)
        return Check("ok", required=False, info=info)


class Sinks:
    """This process's configured sinks, connected on first use."""

    def __init__(self, configs: Iterable[SinkConfig]) -> None:
        self.configs = {config.name: config for config in configs}
        self.health = {name: SinkHealth() for name in self.configs}
        # Built now: a missing extra or a bad target stops the process at start, not at send.
        self._sinks: dict[str, Sink] = {n: build_sink(c) for n, c in self.configs.items()}
        self._paused: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.configs)

    def kind(self, name: str) -> str:
        config = self.configs.get(name)
        return config.type if config is not None else "sink"

    def paused(self) -> set[str]:
        """The sinks (as destinations, ``sink:<name>``) whose circuit breaker is open now."""
        if not self._paused:
            return set()
        now = time.monotonic()
        self._paused = {n for n in self._paused if self.health[n].paused_until > now}
        return {"sink:" + name for name in self._paused}

    def check(self, name: str) -> HealthCheck:
        health = self.health[name]

        async def check() -> Check:
            return health.check()

        return check

    async def publish(self, name: str, message: SinkMessage) -> str | None:
        """Publish ``message`` to sink ``name``: None once the sink confirmed it, else what went
        wrong (the connection is dropped, to be made anew on the next try)."""
        config = self.configs.get(name)
        if config is None:
            return f"no sink {name!r} is configured in this process"
        error: str | None = None
        sink = self._sinks[name]
        try:
            async with asyncio.timeout(config.timeout_seconds):
                await sink.publish(message)
        except TimeoutError:
            error = f"no confirmation within {config.timeout_seconds:g} s"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:1024] if str(exc) else type(exc).__name__
        health = self.health[name]
        if error is None:
            health.failures = health.trips = 0
            health.last_success_at = time.time()
            return None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(config.timeout_seconds):
                await sink.reset()
        health.failures += 1
        health.last_error = error
        health.last_failure_at = time.time()
        now = time.monotonic()
        # Sends already under way when it paused do not pause it again.
        if health.failures >= BREAK_AFTER and health.paused_until <= now:
            pause = min(MAX_PAUSE_SECONDS, FIRST_PAUSE_SECONDS * 2.0**health.trips)
            health.trips += 1
            health.paused_until = now + pause
            self._paused.add(name)
            if health.trips == 1:
                log.warning("sink %s failing (%s): paused, retried with backoff", name, error)
        return error

    async def close(self) -> None:
        for sink in self._sinks.values():
            try:
                await sink.close()
            except Exception as exc:
                log.warning("closing sink %s: %s", sink.config.name, exc)


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
