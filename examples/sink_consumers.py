"""Consumers of hookline's data sinks (docs/sinks.md), one per kind: each reads what a sink wrote,
checks the Standard Webhooks signature where the broker carries headers, and yields the event
(``{"type", "timestamp", "data"}``). ``SECRET`` is the tenant's (``GET /v1/webhook-secret``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook


async def from_redis(url: str, stream: str, secret: str) -> AsyncGenerator[dict[str, Any]]:
    import redis.asyncio as redis

    async with redis.from_url(url, decode_responses=True) as client:
        last = "0"
        while True:
            found: Any = await client.xread({stream: last}, block=5000)  # [(stream, entries)]
            for _, entries in found:
                for entry_id, fields in entries:
                    last = entry_id
                    headers = {k: v for k, v in fields.items() if k.startswith("webhook-")}
                    event: dict[str, Any] = Webhook(secret).verify(fields["body"], headers)
                    yield event


async def from_nats(url: str, subject: str, secret: str) -> AsyncGenerator[dict[str, Any]]:
    import nats

    nc = await nats.connect(url)
    subscription = await nc.jetstream().subscribe(subject, durable="my-consumer")
    async for message in subscription.messages:
        event: dict[str, Any] = Webhook(secret).verify(message.data, dict(message.headers or {}))
        yield event
        await message.ack()  # redelivered unless acked: at least once


async def from_rabbitmq(url: str, queue_name: str, secret: str) -> AsyncGenerator[dict[str, Any]]:
    import aio_pika

    connection = await aio_pika.connect(url)
    queue = await (await connection.channel()).declare_queue(queue_name, durable=True)
    async with queue.iterator() as messages:
        async for message in messages:
            async with message.process():  # acked once the block ends without an error
                headers = {k: str(v) for k, v in message.headers.items()}
                event: dict[str, Any] = Webhook(secret).verify(message.body, headers)
                yield event


async def from_mqtt(host: str, topic: str, secret: str) -> AsyncGenerator[dict[str, Any]]:
    import aiomqtt

    async with aiomqtt.Client(host, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            headers = dict(getattr(message.properties, "UserProperty", None) or [])
            payload = message.payload if isinstance(message.payload, bytes) else b""
            event: dict[str, Any] = Webhook(secret).verify(payload, headers)
            yield event


async def from_postgres(url: str, table: str) -> AsyncGenerator[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    while True:  # a work queue: each row handled once, then gone (the table keeps the rest)
        async with conn.transaction():
            rows = await conn.fetch(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY received_at,"
                " id LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING body, received_at, id"
            )
            for row in sorted(rows, key=lambda r: (r["received_at"], r["id"])):
                event: dict[str, Any] = json.loads(row["body"])
                yield event
        if not rows:
            await asyncio.sleep(1)


def from_jsonl(path: Path, secret: str) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        message_id, headers = entry.pop("id"), entry.pop("headers")
        assert headers["webhook-id"] == message_id
        events.append(
            Webhook(secret).verify(
                json.dumps(entry, separators=(",", ":"), ensure_ascii=False), headers
            )
        )
    return events
