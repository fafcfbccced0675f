"""Provider batches: the per-item delivery rate once a provider batch has completed, against the
hookline batch runner's per-item rate for the same requests as single calls, and the upstream
calls each makes.

    python -m bench.provider_batches [--items 10000] [--database sqlite|postgresql]

One gateway in this process (the tests' ``serve``: API, worker and batch runner) against the
scripted provider of tests/scripted_provider_batches.py (OpenAI's Files + Batch API; it ends the
batch ``--duration`` seconds after its creation), ``batch_poll_seconds = 0.05``. Each item has a
``job.succeeded`` webhook to a local receiver. Provider batch: the time from the provider's end to
the last item's webhook received (results fetched, mapped, written, delivered per item, and the
result files written), so the provider's own time is left out. Single calls: the same items with
``execution: single`` (``max_concurrency = 64``, an upstream that answers at once), from the
submit to the last webhook. Calls: requests the upstream received for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.conftest import LiveGateway, gateway_settings, serve
from tests.scripted_provider_batches import Behaviour, ScriptedProviderBatches
from tests.webhook_receiver import WebhookReceiver

from bench import save_figures
from hookline.config import BatchesConfig


def _jsonl(n: int) -> bytes:
    lines = []
    for i in range(n):
        body = {"model": "m", "messages": [{"role": "user", "content": f"item {i}"}]}
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


async def _deliver(
    live: LiveGateway, receiver: WebhookReceiver, n: int, execution: str
) -> tuple[float, str]:
    """Submit; the monotonic time the n-th item webhook arrived, and the batch's id."""
    before = len(receiver.received)
    params = {"webhook_url": receiver.url(), "webhook_events": "job.succeeded",
              "execution": execution}  # fmt: skip
    created = await live.client.post(
        "/v1/batches", content=_jsonl(n), params=params,
        headers={"Content-Type": "application/jsonl"}, timeout=600,
    )  # fmt: skip
    assert created.status_code == 200, created.text
    await receiver.wait_for("/hook", before + n, timeout=1800)
    return time.monotonic(), str(created.json()["id"])


async def _until_done(live: LiveGateway, batch_id: str) -> dict[str, Any]:
    while True:
        batch: dict[str, Any] = (await live.client.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.05)


async def run(items: int, database_url: str, duration: float) -> dict[str, float]:
    provider = ScriptedProviderBatches(Behaviour(duration=duration, poll_after_ms=None))
    receiver = WebhookReceiver()
    await provider.start()
    await receiver.start()
    upstream = {"batch_api": True, "batch_poll_seconds": 0.05, "batch_poll_max_seconds": 0.2,
                "stream": False, "max_concurrency": 64}  # fmt: skip
    settings = gateway_settings(
        database_url, provider.base_url, upstream=upstream,
        batches=BatchesConfig(max_lines=max(items, 50_000), poll_seconds=0.05),
        webhooks={"retry_schedule_seconds": [1.0], "max_in_flight": 256},
    )  # fmt: skip
    try:
        async with serve(settings) as live:
            # A provider batch: from the provider's end to the last item's webhook.
            delivered, batch_id = await _deliver(live, receiver, items, "provider_batch")
            [batch] = provider.batches.values()
            ended = batch.created + duration  # the scripted provider ends it then
            provider_rate = items / (delivered - ended)
            done = await _until_done(live, batch_id)
            provider_calls = provider.batch_calls()
            # The same requests as single calls.
            started = time.monotonic()
            delivered, batch_id = await _deliver(live, receiver, items, "single")
            single_rate = items / (delivered - started)
            await _until_done(live, batch_id)
            single_calls = len(provider.requests)
    finally:
        await receiver.stop()
        await provider.stop()
    print(
        f"{items} items ({database_url.split(':')[0]}): provider batch {done['status']}, "
        f"{provider_rate:,.0f} items/s delivered after the provider ended, "
        f"{provider_calls} upstream calls (upload, create, polls, downloads); "
        f"single calls {single_rate:,.0f} items/s, {single_calls} upstream calls; "
        f"ratio {provider_rate / single_rate:.2f}x",
        flush=True,
    )
    return {
        "provider_items_per_s": provider_rate,
        "single_items_per_s": single_rate,
        "ratio": provider_rate / single_rate,
        "provider_calls": provider_calls,
        "single_calls": single_calls,
        "completed": done["request_counts"]["completed"] / items,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=1.0, help="the provider's time")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        if args.database == "sqlite":
            url = f"sqlite:///{data}/bench.db"  # (the gateway migrates it at start)
        else:
            from bench.submit import reset_postgres

            url = asyncio.run(reset_postgres(args.postgres_url, "hookline_bench_provider"))
        figures = asyncio.run(run(args.items, url, args.duration))
    if args.json:
        save_figures(args.json, figures)


if __name__ == "__main__":
    main()
