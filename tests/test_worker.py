"""Worker lifecycle: draining on stop, and recovering jobs whose worker died."""

from __future__ import annotations

from typing import Any

import httpx

from hookline.jobs import Operation
from hookline.queue import JobQueue, SubmitRequest
from hookline.store import open_store
from tests.conftest import gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Hang, Reply, ScriptedUpstream

CHAT: dict[str, Any] = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "hi"}]},
}


async def test_stop_lets_short_jobs_finish(database_url: str, upstream: ScriptedUpstream) -> None:
    upstream.script("m", Reply(first_token_delay=0.4))
    settings = gateway_settings(database_url, upstream.base_url, worker={"drain_seconds": 10})
    async with serve(settings) as live:
        job = (await live.client.post("/v1/jobs", json=CHAT)).json()
        await wait_for_status(live.client, job["id"], {"running"})
        worker = live.gateway.worker
        assert worker is not None
        await worker.stop()  # returns once the running job has finished
        live.gateway.worker = None
        finished = (await live.client.get(f"/v1/jobs/{job['id']}")).json()
    assert finished["status"] == "succeeded" and finished["attempts"] == 1


async def test_stop_requeues_jobs_still_running_after_the_grace_period(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("m", Hang(30))
    settings = gateway_settings(database_url, upstream.base_url, worker={"drain_seconds": 0.2})
    async with serve(settings) as live:
        job = (await live.client.post("/v1/jobs", json=CHAT)).json()
        await wait_for_status(live.client, job["id"], {"running"})
    assert upstream.seen("m")[0].aborted
    upstream.script("m", Reply())
    async with serve(settings) as live:
        requeued_events = (await live.client.get(f"/v1/jobs/{job['id']}/events")).json()["data"]
        assert (
            "worker stopped"
            in next(e for e in requeued_events if e["type"] == "job.log")["data"]["message"]
        )
        done = await wait_for_status(live.client, job["id"], {"succeeded"})
        assert done["attempts"] == 1, "a drained attempt does not count"


async def test_job_of_a_dead_worker_is_taken_over_when_its_lease_lapses(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(database_url, upstream.base_url, worker={"lease_seconds": 0.5})
    # A worker claims the job, then dies: nobody renews its lease.
    store = await open_store(database_url, migrate=False)
    queue = JobQueue(store, settings)
    request = SubmitRequest(Operation.CHAT_COMPLETIONS, CHAT["input"], "m", "scripted")
    job, _ = await queue.submit("acme", request)
    [claimed], _ = await queue.claim("scripted", 1, "lease_dead")
    assert claimed.id == job.id and claimed.attempts == 1
    await queue.close()
    await store.close()

    async with serve(settings) as live:
        key = await live.gateway.keys.create("acme")
        async with httpx.AsyncClient(
            base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}
        ) as client:
            done = await wait_for_status(client, job.id, {"succeeded"})
            events = (await client.get(f"/v1/jobs/{job.id}/events")).json()["data"]
    assert done["attempts"] == 2
    types = [e["type"] for e in events]
    assert types[:4] == ["job.queued", "job.started", "job.log", "job.started"]
    assert types[-1] == "job.succeeded" and types.count("job.succeeded") == 1
    lost = next(e for e in events if e["type"] == "job.log")
    assert "stopped renewing its lease" in lost["data"]["message"]
