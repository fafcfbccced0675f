"""Data sink benchmark: messages per second into each kind through hookline's delivery, against
the same client library publishing the same messages in a bare loop, in the same run.

    python -m bench.sinks [--messages 2000] [--kinds redis,nats,...]

For each kind whose server is up on loopback (Redis 6379, NATS JetStream 4222, RabbitMQ 5672,
Mosquitto 1883, PostgreSQL 5432) and a JSONL file:
- the baseline: the kind's sink class (the same client library, connection and confirmation:
  XADD, a JetStream publish acknowledged, a confirmed persistent AMQP publish, an MQTT QoS 1
  PUBACK, an INSERT, an fsynced append) publishing N prepared messages, 64 at a time, with
  nothing else: no outbox, no signing, no recording;
- hookline: the webhook sender (``WebhookSender`` with ``Sinks``) working through an outbox of N
  messages on SQLite: claim, sign, publish, record the attempt, mark it sent; from its start to
  the last recorded outcome.
Rounds are interleaved; medians reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import sqlalchemy as sa

from bench import save_figures
from hookline.cli.server import tune_interpreter
from hookline.clock import SystemClock
from hookline.config import SinkConfig, WebhooksConfig
from hookline.deliveries import SinkRoute, SinkRoutes
from hookline.delivery.sinks import Sinks, build_sink, sink_message
from hookline.delivery.webhooks.sender import WebhookSender
from hookline.events import Event, EventType
from hookline.live.notify import Notifier
from hookline.store import open_store
from hookline.store.migrate import upgrade
from hookline.store.outbox import enqueue_deliveries
from hookline.store.schema import deliveries

CONCURRENCY = 64
PORTS = {"redis": 6379, "nats": 4222, "amqp": 5672, "mqtt": 1883, "postgres": 5432}
KINDS = ["redis", "nats", "amqp", "mqtt", "postgres", "jsonl"]


def _up(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def sink_config(kind: str, tag: str, postgres_url: str, directory: Path) -> SinkConfig:
    """A fresh target of ``kind`` (a new stream, subject, queue, topic, table or file)."""
    name = f"b{tag}"
    url, target = {
        "redis": ("redis://127.0.0.1:6379/0", f"hookline:bench:{tag}"),
        "nats": ("nats://127.0.0.1:4222", f"hookline.bench.{tag}"),
        "amqp": ("amqp://guest:guest@127.0.0.1:5672/", f"hookline-bench-{tag}"),
        "mqtt": ("mqtt://127.0.0.1:1883", f"hookline/bench/{tag}"),
        "postgres": (postgres_url, f"hookline_bench_{tag}"),
        "jsonl": (directory.as_uri(), f"{tag}.jsonl"),
    }[kind]
    stream = f"HLBENCH_{tag}" if kind == "nats" else None
    return SinkConfig.model_validate(
        {
            "name": name,
            "type": kind,
            "url": url,
            "target": target,
            "events": ["*"],
            "stream": stream,
        }
    )


async def prepare(config: SinkConfig) -> None:
    """What a consumer sets up first: an AMQP queue (a message no queue takes is refused)."""
    if config.type == "amqp":
        import aio_pika

        connection = await aio_pika.connect(config.url)
        async with connection:
            await (await connection.channel()).declare_queue(config.target, durable=True)


async def cleanup(config: SinkConfig) -> None:
    with contextlib.suppress(Exception):
        if config.type == "redis":
            import redis.asyncio as redis

            client = redis.from_url(config.url)
            await client.delete(config.target)
            await client.aclose()
        elif config.type == "nats":
            import nats

            nc = await nats.connect(config.url)
            await nc.jetstream().delete_stream(str(config.stream))
            await nc.close()
        elif config.type == "amqp":
            import aio_pika

            connection = await aio_pika.connect(config.url)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(config.target)
        elif config.type == "postgres":
            conn = await asyncpg.connect(config.url)
            await conn.execute(f"DROP TABLE IF EXISTS {config.target}")
            await conn.close()


def _payload(i: int) -> dict[str, object]:
    return {"type": "job.succeeded", "timestamp": "2025-01-01T00:00:00.000Z",
            "data": {"id": f"job_{i:08d}", "status": "succeeded", "output": {"text": "x" * 64}}}  # fmt: skip


async def bare_loop(config: SinkConfig, n: int) -> float:
    """The client library alone: the same messages, 64 publishes at a time."""
    await prepare(config)
    sink = build_sink(config)
    messages = [
        sink_message(config, f"msg_{uuid.uuid4().hex}", "bench", f"job_{i:08d}", _payload(i),
                     {"webhook-id": "x", "webhook-timestamp": "0", "webhook-signature": "v1,x"})
        for i in range(n)
    ]  # fmt: skip
    await sink.publish(messages[0])  # connected (and the stream, table created) before timing
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(1, n):
        queue.put_nowait(i)

    async def publish() -> None:
        while not queue.empty():
            await sink.publish(messages[queue.get_nowait()])

    started = time.perf_counter()
    await asyncio.gather(*(publish() for _ in range(CONCURRENCY)))
    rate = (n - 1) / (time.perf_counter() - started)
    await sink.close()
    await cleanup(config)
    return rate


async def hookline_rate(config: SinkConfig, database_url: str, n: int) -> float:
    """hookline's sender draining an outbox of ``n`` messages to the sink."""
    await prepare(config)
    store = await open_store(database_url)
    await upgrade(store.database)
    sinks = Sinks([config])
    # Connected first (and the stream, table created), as the bare loop is.
    first = sink_message(config, "msg_warm", "bench", None, _payload(0), {})
    assert await sinks.publish(config.name, first) is None
    now = SystemClock().now_ms()
    events = [(Event(0, f"job_{i:08d}", "bench", 1, EventType.SUCCEEDED, {}, now), None, None)
              for i in range(n)]  # fmt: skip
    routes = SinkRoutes([SinkRoute(config.name, ("*",), ("*",), True)])
    await store.database.write(lambda conn: enqueue_deliveries(conn, events, now, sinks=routes))
    pending = await store.database.read(
        lambda conn: conn.execute(sa.select(sa.func.count()).select_from(deliveries)).scalar_one()
    )
    assert pending == n, f"the outbox holds {pending} messages, not {n}"
    # A publish that fails (a broker's hiccup) is tried again within a second, not on the
    # production schedule's 5 minutes: the run stays bounded, and the retries are reported.
    webhooks = WebhooksConfig(
        max_in_flight=CONCURRENCY,
        max_in_flight_per_endpoint=CONCURRENCY,
        retry_schedule_seconds=[0.2, 0.5, 1.0, 1.0, 1.0],
    )
    sender = WebhookSender(store.webhooks, webhooks, SystemClock(), Notifier(), sinks=sinks)
    started_ms = SystemClock().now_ms()
    await sender.start()
    query = deliveries.select().where(deliveries.c.status == "pending").limit(1)
    deadline = time.monotonic() + 120
    while await store.database.read(lambda conn: conn.execute(query).first()) is not None:
        if time.monotonic() > deadline:
            errors = await store.database.read(
                lambda conn: conn.execute(
                    sa.select(deliveries.c.last_error, sa.func.count())
                    .where(deliveries.c.status == "pending")
                    .group_by(deliveries.c.last_error)
                ).all()
            )
            raise RuntimeError(f"{config.type}: messages still pending after 120 s: {errors}")
        await asyncio.sleep(0.1)
    retried = await store.database.read(
        lambda conn: conn.execute(
            sa.select(sa.func.count()).select_from(deliveries).where(deliveries.c.attempts > 1)
        ).scalar_one()
    )
    if retried:
        print(f"{config.type}: {retried} of {n} messages needed more than one publish")
    last_ms: int = await store.database.read(
        lambda conn: conn.execute(sa.select(sa.func.max(deliveries.c.updated_at))).scalar_one()
    )
    await sender.stop()
    failed = await store.webhooks.list_deliveries("bench", status="failed", limit=1)
    await store.close()
    await cleanup(config)
    if failed:
        raise RuntimeError(f"a sink message failed: {failed[0].last_error}")
    return n / ((last_ms - started_ms) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "HOOKLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    tune_interpreter()
    kinds = [k for k in args.kinds.split(",") if k not in PORTS or _up(PORTS[k])]
    skipped = sorted(set(args.kinds.split(",")) - set(kinds))
    if skipped:
        print(f"skipped, no server: {', '.join(skipped)}")
    bare: dict[str, list[float]] = {}
    ours: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for kind in kinds:
                tag = f"{kind[:2]}{round_}{uuid.uuid4().hex[:6]}"
                config = sink_config(kind, tag, args.postgres_url, Path(tmp) / "sinks")
                bare.setdefault(kind, []).append(asyncio.run(bare_loop(config, args.messages)))
                database = f"sqlite:///{Path(tmp) / f'{tag}.db'}"
                config = sink_config(kind, tag + "h", args.postgres_url, Path(tmp) / "sinks")
                rate = asyncio.run(hookline_rate(config, database, args.messages))
                ours.setdefault(kind, []).append(rate)
    print(
        f"\nData sinks, {args.messages} messages, {CONCURRENCY} in flight, loopback brokers, "
        f"hookline on SQLite, median of {args.rounds} interleaved rounds\n"
    )
    print(f"{'kind':<10}{'bare loop msgs/s':>18}{'hookline msgs/s':>17}{'ratio':>8}")
    figures: dict[str, float] = {}
    for kind in kinds:
        b, h = statistics.median(bare[kind]), statistics.median(ours[kind])
        print(f"{kind:<10}{b:>18,.0f}{h:>17,.0f}{h / b:>8.0%}")
        figures |= {f"bare {kind}": b, f"hookline {kind}": h, f"ratio {kind}": h / b}
    if args.json:
        save_figures(args.json, figures)


if __name__ == "__main__":
    main()
