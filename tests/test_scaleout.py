"""Several gateways on one PostgreSQL, in this process: each has its own notifier and live hub
and shares only the database with the others, exactly as separate processes on separate machines
do. What crosses between them goes through PostgreSQL (LISTEN/NOTIFY and the tables).

Settings make the slow fallbacks (polling every 60 s) too slow for the tests' deadlines, so a
test passing shows the wake-up came through PostgreSQL at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from hookline.config import Settings
from hookline.gateway import Gateway
from tests.conftest import gateway_settings, serve
from tests.scripted_upstream import Hang, Reply, ScriptedUpstream
from tests.sse import read_sse

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "x"}]},
}
SLOW_FALLBACKS = {"poll_seconds": 60, "heartbeat_seconds": 30, "delta_flush_seconds": 30}


def _settings(url: str, scripted: ScriptedUpstream, **changes: Any) -> Settings:
    settings = gateway_settings(url, scripted.base_url, worker=SLOW_FALLBACKS, **changes)
    streams = settings.streams.model_copy(update={"poll_seconds": 60})
    return settings.model_copy(update={"streams": streams})


async def _workers(settings: Settings, n: int) -> AsyncIterator[list[Gateway]]:
    gateways = [Gateway(settings, serve_api=False) for _ in range(n)]
    try:
        for gateway in gateways:
            await gateway.start(migrate=False)
        yield gateways
    finally:
        for gateway in gateways:
            await gateway.stop()


async def test_a_stream_follows_live_a_job_run_by_another_process(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    text = "".join(f"w{i} " for i in range(20))
    upstream.script("m", Reply(text=text, chunks=20, first_token_delay=0.3, token_delay=0.03))
    settings = _settings(postgres_url, upstream)
    async for _ in _workers(settings, 1):
        async with serve(settings, run_worker=False) as api:
            job = (await api.client.post("/v1/jobs", json=CHAT)).json()
            stream = await read_sse(api.client, f"/v1/jobs/{job['id']}/events")
    deltas = [m.json() for m in stream.messages if m.event == "job.output.delta"]
    assert "".join(d["data"]["text"] for d in deltas) == text
    # The worker writes output every 30 s: text that came before the end came live, by NOTIFY.
    live = [d for d in deltas if d["seq"] is None]
    assert len(live) >= 5, f"only {len(live)} of {len(deltas)} deltas came live"
    assert stream.messages[-1].event == "job.succeeded"


async def test_a_worker_that_starts_after_a_stream_began_watching_streams_to_it_live(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    """A process that joins learns at once what the others' streams watch (it asks), rather than
    at their next renewal, seconds later."""
    text = "".join(f"w{i} " for i in range(20))
    upstream.script("m", Reply(text=text, chunks=20, token_delay=0.03))
    settings = _settings(postgres_url, upstream)
    async with serve(settings, run_worker=False) as api:
        job = (await api.client.post("/v1/jobs", json=CHAT)).json()
        reading = asyncio.create_task(read_sse(api.client, f"/v1/jobs/{job['id']}/events"))
        await asyncio.sleep(0.3)  # the stream watches the job before any worker runs
        async for _ in _workers(settings, 1):
            stream = await asyncio.wait_for(reading, 10)
    deltas = [m.json() for m in stream.messages if m.event == "job.output.delta"]
    assert "".join(d["data"]["text"] for d in deltas) == text
    live = [d for d in deltas if d["seq"] is None]
    assert len(live) >= 5, f"only {len(live)} of {len(deltas)} deltas came live"


async def test_claims_long_polls_and_cancels_cross_processes_at_once(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _settings(postgres_url, upstream)
    async for _ in _workers(settings, 1):
        async with serve(settings, run_worker=False) as api:
            # The worker polls every 60 s: the job is claimed because the accept woke it, and
            # the long-poll answers because the worker's success woke this process.
            job = (await api.client.post("/v1/jobs", json=CHAT)).json()
            done = (await api.client.get(f"/v1/jobs/{job['id']}", params={"wait": 20})).json()
            assert done["status"] == "succeeded"

            upstream.script("m", Hang(60))
            job = (await api.client.post("/v1/jobs", json=CHAT)).json()
            for _ in range(200):
                if upstream.seen("m")[-1:] and len(upstream.seen("m")) == 2:
                    break
                await asyncio.sleep(0.05)
            cancelled = (await api.client.post(f"/v1/jobs/{job['id']}/cancel")).json()
            assert cancelled["status"] == "cancelled"
            # The lease is renewed every 30 s: the call is aborted because the cancel said so.
            for _ in range(100):
                if upstream.seen("m")[-1].aborted:
                    break
                await asyncio.sleep(0.05)
            assert upstream.seen("m")[-1].aborted, "the worker kept calling the upstream"


@pytest.mark.parametrize("workers", [3])
async def test_max_concurrency_holds_across_workers(
    postgres_url: str, upstream: ScriptedUpstream, workers: int
) -> None:
    upstream.script("m", Reply(first_token_delay=0.2, chunks=2))
    settings = _settings(postgres_url, upstream, upstream={"max_concurrency": 3})
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"poll_seconds": 0.05})}
    )
    async for _ in _workers(settings, workers):
        async with serve(settings, run_worker=False) as api:
            ids = [(await api.client.post("/v1/jobs", json=CHAT)).json()["id"] for _ in range(15)]
            finished = [
                (await api.client.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
                for job_id in ids
            ]
    assert [job["status"] for job in finished] == ["succeeded"] * 15
    assert [job["attempts"] for job in finished] == [1] * 15
    assert upstream.max_active == 3  # reached, never passed, with 3 workers of 3 slots each


async def test_priority_then_submission_order_holds_across_workers(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    # One job at a time across two workers: the order the upstream sees is the queue's order.
    settings = _settings(postgres_url, upstream, upstream={"max_concurrency": 1})
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"poll_seconds": 0.05})}
    )
    async with serve(settings, run_worker=False) as api:
        ids = []
        for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 1)]:
            body = {**CHAT, "priority": priority,
                    "input": {"messages": [{"role": "user", "content": name}]}}  # fmt: skip
            ids.append((await api.client.post("/v1/jobs", json=body)).json()["id"])
        async for _ in _workers(settings, 2):
            for job_id in ids:
                job = (await api.client.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
                assert job["status"] == "succeeded"
    order = [seen.body["messages"][-1]["content"] for seen in upstream.seen("m")]
    assert order == ["b", "d", "e", "a", "c"]


async def test_the_tenant_stream_never_steps_past_an_event_still_being_committed(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    # Event ids are taken at insert: a transaction that inserted a lower id may commit after one
    # with a higher id. A reader that advanced past the higher id would never see the lower one.
    async with serve(_settings(postgres_url, upstream), run_worker=False) as api:
        job = (await api.client.post("/v1/jobs", json=CHAT)).json()["id"]
        store = api.gateway.store
        seen = [event.id for event in await store.list_tenant_events("acme")]
        insert = (
            "INSERT INTO events (job_id, tenant, seq, type, data, created_at) "
            "VALUES ($1, 'acme', $2, 'job.progress', '{}', 0) RETURNING id"
        )
        slow = await asyncpg.connect(postgres_url)
        fast = await asyncpg.connect(postgres_url)
        try:
            transaction = slow.transaction()
            await transaction.start()
            lower = await slow.fetchval(insert, job, 100)
            higher = await fast.fetchval(insert, job, 101)  # committed at once
            assert higher > lower
            visible = [e.id for e in await store.list_tenant_events("acme", seen[-1])]
            assert visible == []  # not the higher one yet: the lower one may still come
            await transaction.commit()
            visible = [e.id for e in await store.list_tenant_events("acme", seen[-1])]
            assert visible == [lower, higher]
        finally:
            await slow.close()
            await fast.close()


async def test_a_rate_limit_holds_across_workers(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    # 5 calls a second, no burst beyond one, shared by two workers.
    limit = {"max_concurrency": 8, "rate_limit_per_second": 5, "rate_limit_burst": 1}
    settings = _settings(postgres_url, upstream, upstream=limit)
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"poll_seconds": 0.05})}
    )
    async for _ in _workers(settings, 2):
        async with serve(settings, run_worker=False) as api:
            ids = [(await api.client.post("/v1/jobs", json=CHAT)).json()["id"] for _ in range(8)]
            for job_id in ids:
                job = (await api.client.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
                assert job["status"] == "succeeded"
    starts = sorted(seen.at for seen in upstream.seen("m"))
    assert len(starts) == 8
    # Never more than a token a fifth of a second: any 8 starts span at least 7 intervals (a few
    # ms allowed for the way from the claim to the upstream).
    assert starts[-1] - starts[0] >= 7 * 0.2 - 0.05, starts
    for first, second in itertools.pairwise(starts):
        assert second - first >= 0.2 - 0.05, starts


async def test_the_openai_facade_streams_a_job_run_by_another_process(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    text = "".join(f"o{i} " for i in range(20))
    upstream.script("m", Reply(text=text, chunks=20, first_token_delay=0.2, token_delay=0.03))
    settings = _settings(postgres_url, upstream)
    async for _ in _workers(settings, 1):
        async with serve(settings, run_worker=False) as api:
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
            stream = await read_sse(
                api.client, "/v1/chat/completions", method="POST", json_body=body
            )
    assert stream.status == 200
    assert stream.messages[-1].data == "[DONE]"
    chunks = [m.json() for m in stream.messages[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(pieces) == text
    # Output is written every 30 s here: chunks that came one by one came live, by NOTIFY.
    assert sum(1 for piece in pieces if piece) >= 5
