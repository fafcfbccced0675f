"""``envelope = "cloudevents"``: each kind's messages as CloudEvents 1.0, read back from the real
brokers as a CloudEvents consumer would: binary mode with each binding's attribute names on NATS
(``ce-*`` headers), AMQP (``cloudEvents_*`` headers) and MQTT 5 (user properties named as the
attributes, the content type as the PUBLISH's), structured mode (``application/cloudevents+json``)
in Redis, PostgreSQL and JSONL. Skipped when a broker is absent (failed under
``HOOKLINE_REQUIRE_SERVICES=1``)."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from hookline.config import SinkConfig
from tests.conftest import serve
from tests.scripted_upstream import ScriptedUpstream
from tests.test_sinks import EVENTS, _settings, _submit, kind, sink_database

__all__ = ["kind", "sink_database"]  # the fixtures, shared

JOBS = 5
# One message as a CloudEvents consumer sees it: its context attributes and its data.
Event = tuple[dict[str, str], Any]
Reader = Callable[[], Awaitable[list[Event]]]


def _structured(body: bytes) -> Event:
    event = orjson.loads(body)
    data = event.pop("data")
    return event, data


@contextlib.asynccontextmanager
async def _redis(name: str) -> AsyncIterator[tuple[SinkConfig, Reader]]:
    import redis.asyncio as redis

    key = f"hookline:test:{name}"
    client = redis.from_url("redis://127.0.0.1:6379/0")

    async def read() -> list[Event]:
        entries: Any = await client.xrange(key)
        found = []
        for _, raw in entries:
            fields = {k.decode(): v for k, v in raw.items()}
            assert fields["content-type"] == b"application/cloudevents+json"
            found.append(_structured(fields["body"]))
        return found

    try:
        yield SinkConfig(name=name, type="redis", url="redis://127.0.0.1:6379/0", target=key,
                         events=EVENTS, envelope="cloudevents"), read  # fmt: skip
    finally:
        await client.delete(key)
        await client.aclose()


@contextlib.asynccontextmanager
async def _nats(name: str) -> AsyncIterator[tuple[SinkConfig, Reader]]:
    import nats

    subject, stream = f"hookline.test.{name}", f"HLTEST_{name}"
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    sub: Any = None
    got: list[Event] = []

    async def read() -> list[Event]:
        nonlocal sub
        if sub is None:
            try:
                sub = await js.pull_subscribe(subject, stream=stream)
            except nats.js.errors.NotFoundError:  # the sink creates it on its first publish
                return got
        # An empty fetch ends in nats-py's TimeoutError, or in asyncio's when its wait for the
        # first message runs out.
        with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
            for msg in await sub.fetch(1000, timeout=0.5):
                headers = dict(msg.headers or {})
                assert headers["Nats-Msg-Id"] == urllib.parse.unquote(headers["ce-id"])
                attributes = {
                    k[3:]: urllib.parse.unquote(v)
                    for k, v in headers.items()
                    if k.startswith("ce-")
                }
                got.append((attributes, orjson.loads(msg.data)))
                await msg.ack()
        return got

    try:
        yield SinkConfig(name=name, type="nats", url="nats://127.0.0.1:4222", target=subject,
                         stream=stream, events=EVENTS, envelope="cloudevents"), read  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()


@contextlib.asynccontextmanager
async def _amqp(name: str) -> AsyncIterator[tuple[SinkConfig, Reader]]:
    import aio_pika

    url = "amqp://guest:guest@127.0.0.1:5672/"
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    queue = await channel.declare_queue(f"hookline-test-{name}", durable=True)
    got: list[Event] = []

    async def read() -> list[Event]:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            headers = {k: str(v) for k, v in (message.headers or {}).items()}
            attributes = {
                k.removeprefix("cloudEvents_"): v
                for k, v in headers.items()
                if k.startswith("cloudEvents_")
            }
            assert message.content_type == "application/json"
            attributes["datacontenttype"] = message.content_type
            assert message.message_id == attributes["id"]
            got.append((attributes, orjson.loads(message.body)))
        return got

    try:
        yield SinkConfig(name=name, type="amqp", url=url, target=queue.name, events=EVENTS,
                         envelope="cloudevents"), read  # fmt: skip
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


@contextlib.asynccontextmanager
async def _mqtt(name: str) -> AsyncIterator[tuple[SinkConfig, Reader]]:
    import aiomqtt

    topic = f"hookline/test/{name}"
    got: list[Event] = []
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                attributes = dict(getattr(message.properties, "UserProperty", None) or [])
                attributes["datacontenttype"] = message.properties.ContentType  # type: ignore[union-attr]
                assert isinstance(message.payload, bytes)
                got.append((attributes, orjson.loads(message.payload)))

        task = asyncio.create_task(collect())

        async def read() -> list[Event]:
            return got

        try:
            yield SinkConfig(name=name, type="mqtt", url="mqtt://127.0.0.1:1883", target=topic,
                             events=EVENTS, envelope="cloudevents"), read  # fmt: skip
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def _postgres(name: str, url: str) -> AsyncIterator[tuple[SinkConfig, Reader]]:
    table = f"hookline_events_{name}"

    async def read() -> list[Event]:
        conn = await asyncpg.connect(url)
        try:
            if await conn.fetchval("SELECT to_regclass($1)", table) is None:
                return []
            rows = await conn.fetch(f"SELECT id, body FROM {table} ORDER BY received_at, id")
        finally:
            await conn.close()
        events = [_structured(row["body"].encode()) for row in rows]
        assert [row["id"] for row in rows] == [attributes["id"] for attributes, _ in events]
        return events

    yield SinkConfig(name=name, type="postgres", url=url, target=table, events=EVENTS,
                     envelope="cloudevents"), read  # fmt: skip


@contextlib.asynccontextmanager
async def _jsonl(name: str, directory: Path) -> AsyncIterator[tuple[SinkConfig, Reader]]:
    path = directory / f"{name}.jsonl"

    async def read() -> list[Event]:
        return (
            [_structured(line) for line in path.read_bytes().splitlines()] if path.exists() else []
        )

    yield SinkConfig(name=name, type="jsonl", url=directory.as_uri(), target=path.name,
                     events=EVENTS, envelope="cloudevents"), read  # fmt: skip


async def test_each_kind_carries_cloudevents_as_its_binding_says(
    kind: str, sink_database: str | None, tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    name = "ce" + uuid.uuid4().hex[:10]
    reader: contextlib.AbstractAsyncContextManager[tuple[SinkConfig, Reader]]
    if sink_database is not None:
        reader = _postgres(name, sink_database)
    elif kind == "jsonl":
        reader = _jsonl(name, tmp_path / "sinks")
    else:
        reader = {"redis": _redis, "nats": _nats, "amqp": _amqp, "mqtt": _mqtt}[kind](name)
    async with reader as (sink, read), serve(_settings(tmp_path, upstream, sink)) as live:
        job_ids = await _submit(live, JOBS)
        deadline = asyncio.get_running_loop().time() + 30
        while len(events := await read()) < 3 * JOBS:
            assert asyncio.get_running_loop().time() < deadline, events
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)
        events = await read()
    assert len({attributes["id"] for attributes, _ in events}) == len(events) == 3 * JOBS
    per_job: dict[str, list[str]] = {}
    for attributes, data in events:
        # The required context attributes, and what hookline puts in the optional ones.
        assert attributes["specversion"] == "1.0"
        assert attributes["id"].startswith("msg_")
        assert attributes["source"] == "hookline/acme"
        assert attributes["datacontenttype"] == "application/json"
        assert attributes["subject"] == data["id"]
        assert attributes["time"].endswith("Z") or "+" in attributes["time"]
        assert "traceparent" not in attributes or attributes["traceparent"].startswith("00-")
        per_job.setdefault(data["id"], []).append(attributes["type"])
    assert per_job == {j: ["job.queued", "job.started", "job.succeeded"] for j in job_ids}
