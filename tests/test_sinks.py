"""Data sinks against the real brokers on loopback: Redis 6379, NATS with JetStream 4222, RabbitMQ
5672 (guest/guest), Mosquitto 1883, PostgreSQL 5432, and a JSONL file. Each kind gets every event
of many jobs, whole, once each, in order per job, signed as webhooks are. A kind whose server is
absent is skipped, or fails under ``HOOKLINE_REQUIRE_SERVICES=1``. No mocks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from hookline.config import SinkConfig
from hookline.delivery.sinks import BREAK_AFTER
from tests.conftest import LiveGateway, _service_missing, gateway_settings, serve
from tests.scripted_upstream import ScriptedUpstream

JOBS = int(os.environ.get("HOOKLINE_SINK_TEST_JOBS", "200"))
EVENTS = ["job.queued", "job.started", "job.succeeded", "job.failed"]
PORTS = {"redis": 6379, "nats": 4222, "amqp": 5672, "mqtt": 1883, "postgres": 5432}
# A received message: its id, its body (the webhook body) and its headers (None: the kind has none).
Received = tuple[str, dict[str, Any], dict[str, str] | None]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _require(kind: str) -> None:
    port = PORTS.get(kind)
    if port is not None and not _listening(port):
        _service_missing(f"no {kind} server on 127.0.0.1:{port}")


def _chat(**extra: Any) -> dict[str, Any]:
    return {
        "operation": "chat.completions",
        "model": "m",
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        **extra,
    }


def _settings(
    tmp_path: Path, upstream: ScriptedUpstream, *sinks: SinkConfig, **changes: Any
) -> Any:
    return gateway_settings(
        f"sqlite:///{tmp_path / 'sinks.db'}", upstream.base_url, sinks=list(sinks),
        upstream={"max_concurrency": 32}, **changes,
    )  # fmt: skip


async def _submit(live: LiveGateway, n: int, **extra: Any) -> list[str]:
    async def one(i: int) -> str:
        response = await live.client.post("/v1/jobs", json=_chat(metadata={"i": str(i)}, **extra))
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    ids: list[str] = []
    for start in range(0, n, 50):
        ids += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 50))))
    return ids


def _check(received: list[Received], job_ids: list[str], secret: str) -> None:
    """Every job's events, each once, in order; signed where the kind carries headers."""
    ids = [message_id for message_id, _, _ in received]
    assert len(ids) == len(set(ids)), "a message came twice"
    per_job: defaultdict[str, list[str]] = defaultdict(list)
    for message_id, body, headers in received:
        per_job[body["data"]["id"]].append(body["type"])
        if headers is not None:
            signed = Webhook(secret).verify(orjson.dumps(body), headers)
            assert signed == body and headers["webhook-id"] == message_id
    assert set(per_job) == set(job_ids)
    for job_id in job_ids:
        assert per_job[job_id] == ["job.queued", "job.started", "job.succeeded"], job_id


async def _until(
    read: Callable[[], Awaitable[list[Received]]], count: int, timeout: float = 60
) -> list[Received]:
    """Read the sink until it holds ``count`` messages (then a little longer: no more come)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        received = await read()
        if len(received) >= count:
            await asyncio.sleep(0.5)
            return await read()
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{len(received)} of {count} messages after {timeout} s")
        await asyncio.sleep(0.2)


# --- one reader per kind: it gets ready before the jobs run, and reads what has come


@contextlib.asynccontextmanager
async def _redis(
    name: str,
) -> AsyncIterator[tuple[SinkConfig, Callable[[], Awaitable[list[Received]]]]]:
    import redis.asyncio as redis

    key = f"hookline:test:{name}"
    client = redis.from_url("redis://127.0.0.1:6379/0")

    async def read() -> list[Received]:
        entries: Any = await client.xrange(key)
        found: list[Received] = []
        for _, raw in entries:
            fields: dict[str, str] = {k.decode(): v.decode() for k, v in raw.items()}
            headers = {k: v for k, v in fields.items() if k.startswith("webhook-")}
            found.append((fields["id"], orjson.loads(fields["body"]), headers))
        return found

    try:
        yield SinkConfig(name=name, type="redis", url="redis://127.0.0.1:6379/0", target=key,
                         events=EVENTS, maxlen=100_000), read  # fmt: skip
    finally:
        await client.delete(key)
        await client.aclose()


@contextlib.asynccontextmanager
async def _nats(
    name: str,
) -> AsyncIterator[tuple[SinkConfig, Callable[[], Awaitable[list[Received]]]]]:
    import nats

    subject = f"hookline.test.{name}"
    stream = f"HLTEST_{name}"
    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    sub: Any = None
    got: list[Received] = []

    async def read() -> list[Received]:
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
                got.append((headers["Nats-Msg-Id"], orjson.loads(msg.data), headers))
                await msg.ack()
        return got

    try:
        yield SinkConfig(name=name, type="nats", url="nats://127.0.0.1:4222", target=subject,
                         stream=stream, events=EVENTS), read  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()


@contextlib.asynccontextmanager
async def _amqp(
    name: str,
) -> AsyncIterator[tuple[SinkConfig, Callable[[], Awaitable[list[Received]]]]]:
    import aio_pika

    url = "amqp://guest:guest@127.0.0.1:5672/"
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    queue = await channel.declare_queue(f"hookline-test-{name}", durable=True)
    got: list[Received] = []

    async def read() -> list[Received]:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            headers = {k: str(v) for k, v in (message.headers or {}).items()}
            assert message.message_id is not None
            got.append((message.message_id, orjson.loads(message.body), headers))
        return got

    try:
        yield SinkConfig(name=name, type="amqp", url=url, target=queue.name, events=EVENTS), read
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


@contextlib.asynccontextmanager
async def _mqtt(
    name: str,
) -> AsyncIterator[tuple[SinkConfig, Callable[[], Awaitable[list[Received]]]]]:
    import aiomqtt

    topic = f"hookline/test/{name}"
    got: list[Received] = []
    client = aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5)
    async with client:
        await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                properties = message.properties
                pairs = getattr(properties, "UserProperty", None) or []
                headers = dict(pairs)
                assert isinstance(message.payload, bytes)
                got.append((headers["webhook-id"], orjson.loads(message.payload), headers))

        task = asyncio.create_task(collect())

        async def read() -> list[Received]:
            return got

        try:
            yield SinkConfig(name=name, type="mqtt", url="mqtt://127.0.0.1:1883", target=topic,
                             events=EVENTS), read  # fmt: skip
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def _postgres(
    name: str, url: str
) -> AsyncIterator[tuple[SinkConfig, Callable[[], Awaitable[list[Received]]]]]:
    table = f"hookline_events_{name}"

    async def read() -> list[Received]:
        conn = await asyncpg.connect(url)
        try:
            exists = await conn.fetchval("SELECT to_regclass($1)", table)
            if exists is None:
                return []
            rows = await conn.fetch(f"SELECT id, body FROM {table} ORDER BY received_at, id")
        finally:
            await conn.close()
        return [(row["id"], orjson.loads(row["body"]), None) for row in rows]

    yield SinkConfig(name=name, type="postgres", url=url, target=table, events=EVENTS), read


@contextlib.asynccontextmanager
async def _jsonl(
    name: str, directory: Path
) -> AsyncIterator[tuple[SinkConfig, Callable[[], Awaitable[list[Received]]]]]:
    path = directory / f"{name}.jsonl"

    async def read() -> list[Received]:
        if not path.exists():
            return []
        found: list[Received] = []
        for line in path.read_bytes().splitlines():
            entry = orjson.loads(line)
            message_id, headers = entry.pop("id"), entry.pop("headers")
            found.append((message_id, entry, headers))
        return found

    yield SinkConfig(name=name, type="jsonl", url=directory.as_uri(), target=path.name,
                     events=EVENTS), read  # fmt: skip


@pytest.fixture(params=["redis", "nats", "amqp", "mqtt", "postgres", "jsonl"])
def kind(request: pytest.FixtureRequest) -> str:
    _require(request.param)
    return str(request.param)


@pytest.fixture
def sink_database(kind: str, request: pytest.FixtureRequest) -> str | None:
    """The PostgreSQL sink's own database (cloned from the template, dropped after)."""
    return str(request.getfixturevalue("postgres_url")) if kind == "postgres" else None


def _reader(kind: str, sink_database: str | None, tmp_path: Path) -> Any:
    name = "s" + uuid.uuid4().hex[:10]
    if sink_database is not None:
        return _postgres(name, sink_database)
    if kind == "jsonl":
        return _jsonl(name, tmp_path / "sinks")
    return {"redis": _redis, "nats": _nats, "amqp": _amqp, "mqtt": _mqtt}[kind](name)


async def test_every_event_of_every_job_reaches_the_sink_once_in_order(
    kind: str, sink_database: str | None, tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    async with (
        _reader(kind, sink_database, tmp_path) as (sink, read),
        serve(_settings(tmp_path, upstream, sink)) as live,
    ):
        job_ids = await _submit(live, JOBS)
        received = await _until(read, 3 * JOBS)
        secret = (await live.client.get("/v1/webhook-secret")).json()["secret"]
        _check(received, job_ids, secret)
        # The deliveries list shows them too, as sent to the sink.
        listed = (await live.client.get("/v1/deliveries", params={"job_id": job_ids[0]})).json()
        assert {d["sink"] for d in listed["data"]} == {sink.name}
        assert {d["status"] for d in listed["data"]} == {"succeeded"}
        ready = (await live.client.get("/readyz")).json()
        assert ready["checks"][f"sink:{sink.name}"]["status"] == "ok"


class _Forwarder:
    """A loopback TCP port in front of a broker, refusing connections until :meth:`open`, then
    forwarding them; :meth:`cut` is the broker stopping (connecting is refused, every open
    connection drops), :meth:`open` again its coming back. No real service is stopped."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()  # nothing listens there: connecting is refused
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def url(self, url: str) -> str:
        """``url`` with this port in place of the broker's."""
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[0]
        netloc = f"{netloc}@" if netloc else ""
        return parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}").geturl()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # cut while it connected
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def cut(self) -> None:
        """The broker goes away as a killed process does: refused, and its connections reset."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.transport.abort()

    async def close(self) -> None:
        await self.cut()


# How long a sink's publishes may take to fail, and its circuit breaker to open, when its broker
# refuses connections or drops them: well under the publish timeout.
FAIL_FAST = 5.0


async def _eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 15) -> Any:
    """Poll ``probe`` until it returns something true, and return that."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        await asyncio.sleep(0.05)
    return found


async def _failing(live: LiveGateway, name: str, failures: int = 1) -> dict[str, Any]:
    """Wait until sink ``name`` shows failing in /readyz (``failures`` in a row at least) and a
    message of it waits in the outbox, tried, with its error; return the /readyz check."""

    async def check() -> dict[str, Any] | None:
        found: dict[str, Any] = (await live.client.get("/readyz")).json()["checks"][f"sink:{name}"]
        failing = found["status"] == "failing" and found["consecutive_failures"] >= failures
        return found if failing else None

    async def tried() -> list[dict[str, Any]]:
        params: dict[str, str | int] = {"sink": name, "status": "pending", "limit": 200}
        listed = (await live.client.get("/v1/deliveries", params=params)).json()["data"]
        return [d for d in listed if d["attempts"] > 0 and d["last_error"]]

    found: dict[str, Any] = await _eventually(
        check, f"failing {failures} times in /readyz", FAIL_FAST
    )
    assert "detail" in found, found
    await _eventually(tried, "a tried message waiting in the deliveries list", FAIL_FAST)
    return found


async def _settled(live: LiveGateway, name: str) -> None:
    """Wait until no message to sink ``name`` is pending: none is under way."""

    async def settled() -> bool:
        params: dict[str, str | int] = {"sink": name, "status": "pending", "limit": 1}
        listed: dict[str, Any] = (await live.client.get("/v1/deliveries", params=params)).json()
        return not listed["data"]

    await _eventually(settled, "every send recorded")


@pytest.mark.parametrize("kind", ["redis", "nats", "amqp", "mqtt", "postgres"], indirect=True)
async def test_a_sink_whose_broker_is_down_retries_and_loses_nothing_once_it_is_back(
    kind: str, sink_database: str | None, tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    """Each broker, behind a forwarder: unreachable when the gateway starts, then back; then
    stopped mid-run (its connections dropped) and back again. Meanwhile the messages wait in the
    outbox, tried, the sink shows failing and its circuit breaker opens; once the broker is back
    the sink connects anew and everything arrives, once, in order per job."""
    async with _reader(kind, sink_database, tmp_path) as (sink, read):
        port = urllib.parse.urlsplit(sink.url).port
        assert port is not None
        forwarder = _Forwarder(port)
        # The default publish timeout (10 s): a broker that refuses or drops the connection
        # makes a publish fail at once (within FAIL_FAST), not when it runs out.
        down = sink.model_copy(update={"url": forwarder.url(sink.url)})
        assert down.timeout_seconds > FAIL_FAST
        webhooks = {"retry_schedule_seconds": [0.2] * 200}
        try:
            async with (
                asyncio.timeout(30),
                serve(_settings(tmp_path, upstream, down, webhooks=webhooks)) as live,
            ):
                secret = (await live.client.get("/v1/webhook-secret")).json()["secret"]
                # Down from the start: retried, shown in /readyz and the deliveries, nothing sent.
                first = await _submit(live, 10)
                await _failing(live, sink.name)
                assert await read() == []
                await forwarder.open()  # the broker is back
                _check(await _until(read, 3 * len(first), timeout=20), first, secret)
                await _settled(live, sink.name)  # none under way when it stops: none sent twice
                # Stopped mid-run: the sink's connection drops; the circuit breaker opens.
                await forwarder.cut()
                second = await _submit(live, 10)
                await _failing(live, sink.name, failures=BREAK_AFTER)
                await forwarder.open()  # back again: the sink connects anew on its next publish
                everything = first + second
                _check(await _until(read, 3 * len(everything), timeout=20), everything, secret)
                ready = (await live.client.get("/readyz")).json()["checks"][f"sink:{sink.name}"]
                assert ready["status"] == "ok", ready
                failed = (
                    await live.client.get("/v1/deliveries", params={"status": "failed"})
                ).json()
                assert failed["data"] == []
        finally:
            await forwarder.close()


async def test_sinks_for_named_jobs_tenants_and_the_sinks_api(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    directory = tmp_path / "sinks"
    every = SinkConfig(name="every", type="jsonl", url=directory.as_uri(), target="every.jsonl")
    named = SinkConfig(name="named", type="jsonl", url=directory.as_uri(), target="named.jsonl",
                       all_jobs=False, events=["job.succeeded", "batch.completed"])  # fmt: skip
    other = SinkConfig(name="other", type="jsonl", url=directory.as_uri(), target="other.jsonl",
                       tenants=["globex"])  # fmt: skip
    async with serve(_settings(tmp_path, upstream, every, named, other)) as live:
        listed = (await live.client.get("/v1/sinks")).json()["data"]
        assert [(s["name"], s["all_jobs"]) for s in listed] == [("every", True), ("named", False)]
        assert all("url" not in s for s in listed)  # the operator's credentials stay hidden
        refused = await live.client.post("/v1/jobs", json=_chat(sinks=["other"]))
        assert refused.status_code == 422 and "other" in refused.json()["detail"]
        plain = (await live.client.post("/v1/jobs", json=_chat())).json()
        asked = (await live.client.post("/v1/jobs", json=_chat(sinks=["named"]))).json()
        assert asked["sinks"] == ["named"] and asked["webhook"] is None
        # A batch names a sink: its items' results and batch.completed go there.
        lines = b"\n".join(
            orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}})
            for i in range(3)
        )  # fmt: skip
        batch = await live.client.post(
            "/v1/batches", params={"sinks": "named"}, content=lines,
            headers={"Content-Type": "application/jsonl"},
        )  # fmt: skip
        assert batch.status_code == 200, batch.text

        def lines_of(name: str) -> list[dict[str, Any]]:
            path = directory / f"{name}.jsonl"
            return (
                [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []
            )

        for _ in range(200):
            got = lines_of("named")
            if any(x["type"] == "batch.completed" for x in got):
                break
            await asyncio.sleep(0.1)
        types = sorted(x["type"] for x in lines_of("named"))
        assert types == ["batch.completed"] + ["job.succeeded"] * 4, types
        named_jobs = {
            x["data"].get("id") for x in lines_of("named") if x["type"] == "job.succeeded"
        }
        assert asked["id"] in named_jobs and plain["id"] not in named_jobs
        every_jobs = {x["data"]["id"] for x in lines_of("every") if x["type"] == "job.succeeded"}
        assert {plain["id"], asked["id"]} <= every_jobs
        assert lines_of("other") == []  # not acme's


async def test_the_docs_consumers_read_and_verify_what_the_sinks_wrote(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    from examples import sink_consumers

    _require("redis")
    key = f"hookline:test:docs{uuid.uuid4().hex[:8]}"
    redis_sink = SinkConfig(name="r", type="redis", url="redis://127.0.0.1:6379/0", target=key)
    directory = tmp_path / "sinks"
    jsonl_sink = SinkConfig(name="f", type="jsonl", url=directory.as_uri(), target="e.jsonl")
    async with serve(_settings(tmp_path, upstream, redis_sink, jsonl_sink)) as live:
        job_ids = set(await _submit(live, 3))
        secret = (await live.client.get("/v1/webhook-secret")).json()["secret"]
        got: set[str] = set()
        consumer = sink_consumers.from_redis(redis_sink.url, key, secret)
        try:
            async with asyncio.timeout(30):
                async for event in consumer:
                    got.add(event["data"]["id"])
                    if got == job_ids:
                        break
        finally:
            await consumer.aclose()
            import redis.asyncio as redis

            client = redis.from_url(redis_sink.url)
            await client.delete(key)
            await client.aclose()
        events = sink_consumers.from_jsonl(directory / "e.jsonl", secret)
        assert {e["data"]["id"] for e in events} == job_ids
