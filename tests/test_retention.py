"""Retention: finished jobs, their events and settled webhook messages older than the retention
are deleted in the background, in short batches; nothing unfinished is touched."""

from __future__ import annotations

import asyncio

from hookline.config import RetentionConfig
from tests.conftest import gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Hang, ScriptedUpstream
from tests.webhook_receiver import WebhookReceiver

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "x"}]},
}


async def test_old_history_is_deleted_in_batches_and_unfinished_work_is_kept(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    # A retention of 0.5 s; the background pass is far off, so the test runs the pass itself.
    retention = RetentionConfig(days=0.5 / 86_400, batch_size=2, interval_seconds=3600)
    settings = gateway_settings(database_url, upstream.base_url, retention=retention)
    async with serve(settings) as live:
        client = live.client
        old = []
        for _ in range(5):
            body = {**CHAT, "webhook": {"url": receiver.url()}}
            old.append((await client.post("/v1/jobs", json=body)).json()["id"])
        for job_id in old:
            await wait_for_status(client, job_id, {"succeeded"})
        await receiver.wait_for("/hook", 5)
        await asyncio.sleep(0.1)  # the sender records its attempts
        upstream.script("m", Hang(60))
        running = (await client.post("/v1/jobs", json=CHAT)).json()["id"]
        await wait_for_status(client, running, {"running"})
        await asyncio.sleep(0.6)

        jobs, messages = await live.gateway.queue.delete_old_history()

        assert (jobs, messages) == (5, 5)  # in batches of 2: 2 + 2 + 1 each
        for job_id in old:
            assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404
            assert await live.gateway.store.list_events(job_id, 0) == []
        deliveries = (await client.get("/v1/deliveries")).json()["data"]
        assert deliveries == []
        still = (await client.get(f"/v1/jobs/{running}")).json()
        assert still["status"] == "running"
        assert len((await client.get(f"/v1/jobs/{running}/events")).json()["data"]) == 2
        assert await live.gateway.queue.delete_old_history() == (0, 0)


async def test_a_retention_of_zero_keeps_everything(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(database_url, upstream.base_url, retention=RetentionConfig(days=0))
    async with serve(settings) as live:
        job = (await live.client.post("/v1/jobs", json=CHAT)).json()["id"]
        await wait_for_status(live.client, job, {"succeeded"})
        assert await live.gateway.queue.delete_old_history() == (0, 0)
        assert (await live.client.get(f"/v1/jobs/{job}")).status_code == 200
