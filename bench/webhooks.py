"""Webhook benchmark: deliveries per second and job-finished-to-webhook latency.

    python -m bench.webhooks [--messages 5000] [--postgres-url URL]

1. Throughput, against a fast receiver in its own process on loopback, 64 at a time:
   - the ceiling: a bare aiohttp POST loop (no signing, no storage);
   - hookline's sender working through an outbox of N messages: claim, sign (Standard Webhooks),
     POST, log the attempt, mark the message sent - on SQLite and on PostgreSQL; from the start
     to the last message's outcome (its recorded updated_at, when the receiver answered).
2. Latency while idle: one job at a time through a whole gateway (scripted upstream that answers
   at once), from the job's finished_at to the webhook arriving at a receiver.

The sender runs in this process, set up as ``hookline serve`` and ``hookline worker`` set up
theirs (``cli.tune_interpreter``: the young generation collected every 50,000 allocations, not
700); the bare loop runs in it too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import sqlalchemy as sa

from bench import save_figures
from bench.submit import free_port, reset_postgres
from hookline.cli.server import tune_interpreter
from hookline.clock import SystemClock
from hookline.config import Settings, UpstreamConfig, WebhooksConfig
from hookline.delivery.webhooks.sender import WebhookSender
from hookline.events import Event, EventType
from hookline.gateway import Gateway
from hookline.live.notify import Notifier
from hookline.store import open_store
from hookline.store.migrate import upgrade
from hookline.store.outbox import enqueue_deliveries
from hookline.store.schema import deliveries

CONCURRENCY = 64
CEILING = "bare aiohttp POST loop (ceiling)"
CPU_PER_MESSAGE_US: list[float] = []  # the sender's own CPU, per message, each run


async def bare_loop(url: str, n: int) -> float:
    body = orjson.dumps({"type": "job.succeeded", "timestamp": "x", "data": {"id": "job_x"}})
    async with aiohttp.ClientSession() as session:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def post() -> None:
            while not queue.empty():
                queue.get_nowait()
                async with session.post(
                    url, data=body, headers={"content-type": "application/json"}
                ) as r:
                    await r.read()

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(post() for _ in range(CONCURRENCY)))
        CPU_PER_MESSAGE_US.append((time.process_time() - cpu_started) / n * 1e6)
        return n / (time.perf_counter() - started)


async def sender_throughput(database_url: str, url: str, n: int) -> float:
    store = await open_store(database_url)
    await upgrade(store.database)
    now = SystemClock().now_ms()
    events = [
        (Event(0, f"job_{i:08d}", "bench", 1, EventType.SUCCEEDED, {}, now), None,
         {"url": url, "events": ["job.succeeded"]})
        for i in range(n)
    ]  # fmt: skip
    await store.database.write(lambda conn: enqueue_deliveries(conn, events, now))
    if store.dialect == "postgresql":  # a burst into a fresh table: give the planner statistics
        await store.database.write(lambda conn: conn.exec_driver_sql("ANALYZE deliveries"))
    config = WebhooksConfig(
        allowed_networks=["127.0.0.0/8"],
        max_in_flight=CONCURRENCY,
        max_in_flight_per_endpoint=CONCURRENCY,
    )
    sender = WebhookSender(store.webhooks, config, SystemClock(), Notifier())
    # The wall clock, as the outcomes' updated_at (when the receiver answered) are.
    started_ms, cpu_started = SystemClock().now_ms(), time.process_time()
    await sender.start()
    # Ordered as the due-messages index is, so the check is an index probe: a plain LIMIT 1 was
    # planned (on statistics from before the run) as a sequential scan of the whole outbox,
    # which cost PostgreSQL up to ~10 ms of CPU per check, beside the sender being measured.
    pending_query = (
        deliveries.select()
        .where(deliveries.c.status == "pending")
        .with_only_columns(deliveries.c.id)
        .order_by(deliveries.c.next_attempt_at)
        .limit(1)
    )
    # Checked every 0.1 s, and the run ends at the last outcome: a check every 10 ms (a read on
    # a reader thread, whose GIL hand-offs stall the sender's loop) cost the sender 10-20% of
    # its messages/s.
    while await store.database.read(lambda conn: conn.execute(pending_query).first()) is not None:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    CPU_PER_MESSAGE_US.append((time.process_time() - cpu_started) / n * 1e6)
    last_ms: int = await store.database.read(
        lambda conn: conn.execute(sa.select(sa.func.max(deliveries.c.updated_at))).scalar_one()
    )
    elapsed = (last_ms - started_ms) / 1000
    await sender.stop()
    failed = await store.webhooks.list_deliveries("bench", status="failed", limit=1)
    await store.close()
    if failed:
        raise RuntimeError(f"a delivery failed: {failed[0].last_error}")
    return n / elapsed


async def latency(database_url: str, jobs: int) -> list[float]:
    from tests.scripted_upstream import ScriptedUpstream
    from tests.webhook_receiver import WebhookReceiver

    upstream, receiver = ScriptedUpstream(), WebhookReceiver()
    await upstream.start()
    await receiver.start()
    settings = Settings(
        database_url=database_url,
        local_model=False,
        upstreams=[UpstreamConfig(name="s", base_url=upstream.base_url, models=["*"])],
        webhooks=WebhooksConfig(allowed_networks=["127.0.0.0/8"]),
    )
    gateway = Gateway(settings)
    await gateway.start()
    from hookline.jobs import Operation
    from hookline.queue import SubmitRequest

    samples = []
    try:
        for i in range(jobs):
            request = SubmitRequest(
                Operation.CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": "hi"}]},
                "m", "s", webhook={"url": receiver.url(), "events": ["job.succeeded"]},
            )  # fmt: skip
            job, _ = await gateway.queue.submit("bench", request)
            await receiver.wait_for("/hook", i + 1)
            arrived_ms = time.time() * 1000
            finished = await gateway.queue.get("bench", job.id)
            assert finished.finished_at is not None
            samples.append(arrived_ms - finished.finished_at)
            await asyncio.sleep(0.02)  # idle between jobs
    finally:
        await gateway.stop()
        await receiver.stop()
        await upstream.stop()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; medians reported"
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "HOOKLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    tune_interpreter()
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "bench.receiver", str(port)])
    time.sleep(1.5)
    url = f"http://127.0.0.1:{port}/hook"
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    lat: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:

            def databases() -> dict[str, str]:
                fresh = {"SQLite": f"sqlite:///{Path(tmp) / f'bench-{time.monotonic_ns()}.db'}"}
                try:
                    fresh["PostgreSQL"] = asyncio.run(
                        reset_postgres(args.postgres_url, "hookline_bench")
                    )
                except (OSError, asyncpg.PostgresError) as exc:
                    print(f"PostgreSQL skipped: {exc}")
                return fresh

            # Interleaved rounds: the machine is shared and noisy, so each run sees the same weather.
            for _ in range(args.rounds):
                runs.setdefault(CEILING, []).append(asyncio.run(bare_loop(url, args.messages)))
                cpu.setdefault(CEILING, []).append(CPU_PER_MESSAGE_US[-1])
                for name, database_url in databases().items():
                    rate = asyncio.run(sender_throughput(database_url, url, args.messages))
                    runs.setdefault(f"hookline sender, {name}", []).append(rate)
                    cpu.setdefault(f"hookline sender, {name}", []).append(CPU_PER_MESSAGE_US[-1])
            for name, database_url in databases().items():
                lat[name] = asyncio.run(latency(database_url, args.latency_jobs))
    finally:
        receiver.terminate()
        receiver.wait(10)
    rows = [(name, statistics.median(rates)) for name, rates in runs.items()]
    ceiling = rows[0][1]
    print(
        f"\nWebhook deliveries, {args.messages} messages, {CONCURRENCY} in flight, loopback "
        f"receiver, median of {args.rounds} interleaved rounds\n"
    )
    print(f"{'run':<36}{'msgs/s':>10}{'vs ceiling':>12}{'CPU µs/msg':>12}")
    for name, rate in rows:
        cpu_us = statistics.median(cpu[name])
        print(f"{name:<36}{rate:>10.0f}{rate / ceiling:>11.0%}{cpu_us:>12.0f}")
    print(f"\nJob finished -> webhook arrived, idle, {args.latency_jobs} jobs one at a time\n")
    print(f"{'database':<14}{'p50 ms':>10}{'p90 ms':>10}{'max ms':>10}")
    for name, samples in lat.items():
        q = statistics.quantiles(samples, n=10)
        print(f"{name:<14}{statistics.median(samples):>10.1f}{q[8]:>10.1f}{max(samples):>10.1f}")
    if args.json:
        figures = {f"rate {name}": rate for name, rate in rows}
        figures |= {f"latency_p50_ms {name}": statistics.median(s) for name, s in lat.items()}
        save_figures(args.json, figures)


if __name__ == "__main__":
    main()
