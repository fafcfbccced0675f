"""Worker and gateway lifecycle: starting, draining on stop, and recovering jobs whose worker
died."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from hookline.config import Settings, UpstreamConfig, WorkerConfig
from hookline.gateway import Gateway
from hookline.jobs import Operation
from hookline.queue import JobQueue, SubmitRequest
from hookline.store import open_store
from hookline.upstreams.base import DeltaSink, PartialSink, Upstream
from hookline.worker import Worker
from tests.conftest import POSTGRES_URL, gateway_settings, serve, wait_for_status
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
    store = await open_store(database_url)
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


def hookline_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("hookline"))


async def connections_to(database_url: str) -> int:
    """Sessions open on the database of ``database_url``, once closed ones have gone (a server
    process ends a moment after its client leaves)."""
    database = database_url.rpartition("/")[2]
    admin = await asyncpg.connect(POSTGRES_URL.replace("postgresql://", "postgres://"), timeout=5)
    try:
        for _ in range(50):
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
            count: int = await admin.fetchval(query, database)
            if count == 0:
                break
            await asyncio.sleep(0.1)
        return count
    finally:
        await admin.close()


async def test_a_gateway_that_fails_to_start_closes_what_it_had_opened(
    postgres_url: str, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    settings = gateway_settings(postgres_url, upstream.base_url)
    missing = UpstreamConfig(
        name="local", type="llama_cpp", models=["local"], model_path=str(tmp_path / "none.gguf")
    )
    settings = settings.model_copy(update={"upstreams": [*settings.upstreams, missing]})
    gateway = Gateway(settings)
    # The store, the broadcast and the first upstream start; the model file is missing (llama.cpp
    # says so; without the `local` extra its import fails instead).
    with pytest.raises((ValueError, ModuleNotFoundError)):
        await gateway.start()
    assert await connections_to(postgres_url) == 0
    assert hookline_tasks() == []
    await gateway.stop()  # nothing left to stop


class SlowToStart(Upstream):
    """An upstream whose start waits for the test."""

    def __init__(self) -> None:
        super().__init__(UpstreamConfig(name="slow", base_url="http://127.0.0.1:9/v1"))
        self.starting = asyncio.Event()
        self.release = asyncio.Event()
        self.closed = False

    async def start(self) -> None:
        self.starting.set()
        await self.release.wait()

    async def close(self) -> None:
        self.closed = True

    async def run(
        self,
        operation: Operation,
        body: dict[str, Any],
        on_delta: DeltaSink,
        *,
        held_until: asyncio.Future[Any] | None = None,
        partial: PartialSink | None = None,
    ) -> dict[str, Any]:
        raise AssertionError("the worker never ran")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_worker_stopped_while_it_starts_stops_and_starts_nothing_more(
    database_url: str,
) -> None:
    store = await open_store(database_url)
    queue = JobQueue(store, Settings(database_url=database_url, local_model=False))
    slow = SlowToStart()
    worker = Worker(queue, {"slow": slow}, WorkerConfig())
    try:
        starting = asyncio.create_task(worker.start())
        await slow.starting.wait()
        await worker.stop()
        assert slow.closed
        slow.release.set()
        await starting
        assert hookline_tasks() == []  # no claim, flush or heartbeat loop came after the stop
    finally:
        await queue.close()
        await store.close()
