"""Live, resumable streams through real HTTP: SSE per job, WebSocket, and the tenant stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hookline.delivery import streams as delivery_streams
from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Drop, Hang, Reply, ScriptedUpstream
from tests.sse import SSE, read_sse

TEXT = "".join(f"w{i:02d} " for i in range(40))  # 160 characters, streamed as 40 chunks


def chat(model: str = "m", content: str = "hi") -> dict[str, Any]:
    return {
        "operation": "chat.completions",
        "model": model,
        "input": {"messages": [{"role": "user", "content": content}]},
    }


def delta_text(messages: list[SSE], attempt: int | None = None) -> str:
    """The output a client rebuilds: delta texts of the last attempt, in order."""
    deltas = [m.json()["data"] for m in messages if m.event == "job.output.delta"]
    if attempt is None:
        attempt = max((d["attempt"] for d in deltas), default=0)
    return "".join(d["text"] for d in deltas if d["attempt"] == attempt)


async def submit(live: LiveGateway, body: dict[str, Any]) -> str:
    response = await live.client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def test_sse_replays_history_then_follows_live_to_the_terminal_event(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("m", Reply(text=TEXT, chunks=40, token_delay=0.01))
    job_id = await submit(live, chat())
    stream = await read_sse(live.client, f"/v1/jobs/{job_id}/events")
    assert stream.status == 200
    types = [m.event for m in stream.messages]
    assert types[0] == "job.queued" and types[1] == "job.started"
    assert types[-1] == "job.succeeded"  # and the stream ended by itself after it
    assert delta_text(stream.messages) == TEXT
    seqs = [m.json()["seq"] for m in stream.messages if m.json()["seq"] is not None]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    # A subscriber arriving after the end gets the same output from the log alone.
    late = await read_sse(live.client, f"/v1/jobs/{job_id}/events")
    assert delta_text(late.messages) == TEXT
    assert all(m.json()["seq"] is not None for m in late.messages)


async def test_live_text_reaches_watchers_before_it_is_written(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    # Deltas are written every 30 s here: anything a watcher sees before the end came live.
    settings_ = gateway_settings(
        database_url, upstream.base_url, worker={"delta_flush_seconds": 30}
    )
    upstream.script("m", Reply(text=TEXT, chunks=40, token_delay=0.02))
    async with serve(settings_) as live:
        job_id = await submit(live, chat())
        stream = await read_sse(live.client, f"/v1/jobs/{job_id}/events")
        live_deltas = [m for m in stream.messages if m.event == "job.output.delta"]
        # Chunk by chunk (chunks that arrive together may share a message), not one at the end.
        assert len(live_deltas) >= 8
        assert all(m.json()["seq"] is None for m in live_deltas)
        assert delta_text(stream.messages) == TEXT
        # The log has the text once, coalesced, and a resume from its start adds nothing.
        log = (await live.client.get(f"/v1/jobs/{job_id}/events")).json()["data"]
        assert "".join(e["data"]["text"] for e in log if e["type"] == "job.output.delta") == TEXT


async def test_many_subscribers_and_late_joiners_all_get_the_whole_output(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("m", Reply(text=TEXT, chunks=40, token_delay=0.01))
    job_id = await submit(live, chat())

    async def watch(delay: float) -> str:
        await asyncio.sleep(delay)
        return delta_text((await read_sse(live.client, f"/v1/jobs/{job_id}/events")).messages)

    outputs = await asyncio.gather(*(watch(i * 0.05) for i in range(8)))
    assert outputs == [TEXT] * 8


async def resume_until_done(
    live: LiveGateway, job_id: str, cuts: list[int], *, header: bool = True
) -> tuple[list[SSE], int]:
    """Read the stream, disconnecting after each number of messages in ``cuts`` and resuming
    from the last id seen; returns every message received and how many connections it took."""
    received: list[SSE] = []
    last_id: str | None = None
    connections = 0
    for limit in [*cuts, None]:
        connections += 1
        headers = {"Last-Event-ID": last_id} if last_id and header else {}
        params = {"after": last_id} if last_id and not header else None
        stream = await read_sse(
            live.client, f"/v1/jobs/{job_id}/events", headers=headers, params=params, limit=limit
        )
        assert stream.status == 200, stream.body
        received += stream.messages
        if stream.messages:
            last_id = stream.messages[-1].id
        if received and received[-1].event == "job.succeeded":
            break
    return received, connections


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cuts=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=25))
async def test_resuming_at_random_cut_points_never_loses_or_repeats_a_token(
    live: LiveGateway, upstream: ScriptedUpstream, cuts: list[int]
) -> None:
    upstream.script("m", Reply(text=TEXT, chunks=40, token_delay=0.01))
    job_id = await submit(live, chat())
    received, _ = await resume_until_done(live, job_id, cuts)
    assert delta_text(received) == TEXT
    await wait_for_status(live.client, job_id, {"succeeded"})


async def test_resume_with_after_parameter_and_across_a_retried_attempt(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    # The first attempt breaks mid-stream; the retry streams the whole answer again.
    upstream.script("m", Drop(after_chunks=3), Reply(text=TEXT, chunks=40, token_delay=0.01))
    job_id = await submit(live, chat(content="x" * 40))
    received, connections = await resume_until_done(live, job_id, [2, 3, 5, 4], header=False)
    assert connections > 1
    attempts = {m.json()["data"]["attempt"] for m in received if m.event == "job.output.delta"}
    assert attempts == {1, 2}
    assert delta_text(received, attempt=2) == TEXT


async def test_heartbeat_comments_keep_an_idle_stream_open(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings_ = gateway_settings(
        database_url, upstream.base_url, streams={"heartbeat_seconds": 0.2}
    )
    upstream.script("m", Hang(seconds=30))
    async with serve(settings_) as live:
        job_id = await submit(live, chat())
        started = time.monotonic()
        stream = await read_sse(live.client, f"/v1/jobs/{job_id}/events", until_comments=2)
        assert len(stream.comments) == 2
        assert time.monotonic() - started < 5
        await live.client.post(f"/v1/jobs/{job_id}/cancel")


async def test_bad_resume_ids_and_foreign_jobs_are_refused(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    job_id = await submit(live, chat())
    for bad in ["abc", "-1", "1.2", "1..3", "9" * 40, "1.x.3"]:
        stream = await read_sse(
            live.client, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": bad}
        )
        assert stream.status == 422, bad
        problem = json.loads(stream.body)
        assert "Last-Event-ID" in problem["detail"]
    other = await live.client_for("other-tenant")
    async with other:
        stream = await read_sse(other, f"/v1/jobs/{job_id}/events")
        assert stream.status == 404
        assert (await other.get(f"/v1/jobs/{job_id}/events")).status_code == 404
        with pytest.raises(TimeoutError):  # nothing of ours ever shows up on their stream
            await asyncio.wait_for(read_sse(other, "/v1/events", limit=1), 1.0)
    # A resume id past the end is fine: nothing more to send but the end.
    await wait_for_status(live.client, job_id, {"succeeded"})
    stream = await read_sse(
        live.client, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "999"}
    )
    assert stream.status == 200 and stream.messages == []


async def test_websocket_carries_the_same_events_and_resumes(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("m", Reply(text=TEXT, chunks=40, token_delay=0.01))
    job_id = await submit(live, chat())
    url = live.base_url.replace("http://", "ws://") + f"/v1/jobs/{job_id}/ws"
    auth = {"Authorization": f"Bearer {live.api_key}"}
    messages: list[dict[str, Any]] = []
    async with websockets.connect(url, additional_headers=auth) as ws:
        for _ in range(5):
            messages.append(json.loads(await ws.recv()))
    async with websockets.connect(
        f"{url}?after={messages[-1]['id']}", additional_headers=auth
    ) as ws:
        async for raw in ws:
            messages.append(json.loads(raw))
    assert messages[0]["event"] == "job.queued" and messages[-1]["event"] == "job.succeeded"
    texts = [m["data"]["data"]["text"] for m in messages if m["event"] == "job.output.delta"]
    assert "".join(texts) == TEXT
    # Without a key, or for a foreign job, the socket is closed with 4401 / 4404.
    for target, headers, code in [(url, {}, 4401), (url.replace(job_id, "job_nope"), auth, 4404)]:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(target, additional_headers=headers) as ws:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == code


async def test_a_websocket_client_that_leaves_a_quiet_job_is_let_go(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("m", Hang(seconds=30))
    job_id = await submit(live, chat())
    url = live.base_url.replace("http://", "ws://") + f"/v1/jobs/{job_id}/ws"
    auth = {"Authorization": f"Bearer {live.api_key}"}
    async with websockets.connect(url, additional_headers=auth) as ws:
        await ws.recv()  # job.queued
        assert live.gateway.queue.live.watching(job_id)
    for _ in range(100):
        if not live.gateway.queue.live.watching(job_id):
            break
        await asyncio.sleep(0.02)
    assert not live.gateway.queue.live.watching(job_id)
    await live.client.post(f"/v1/jobs/{job_id}/cancel")


async def test_tenant_stream_carries_every_job_filters_by_type_and_resumes(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    first = await submit(live, chat())
    second = await submit(live, chat())
    other = await live.client_for("someone-else")
    async with other:
        foreign = (await other.post("/v1/jobs", json=chat())).json()["id"]
    for job_id in (first, second):
        await wait_for_status(live.client, job_id, {"succeeded"})
    stream = await read_sse(live.client, "/v1/events", params={"type": "job.succeeded"}, limit=2)
    assert sorted(m.json()["job_id"] for m in stream.messages) == sorted([first, second])
    assert all(m.event == "job.succeeded" for m in stream.messages)
    everything = await read_sse(live.client, "/v1/events", limit=6)
    assert foreign not in {m.json()["job_id"] for m in everything.messages}
    ids = [int(m.id or 0) for m in everything.messages]
    assert ids == sorted(ids)
    resumed = await read_sse(
        live.client, "/v1/events", headers={"Last-Event-ID": str(ids[2])}, limit=3
    )
    assert [m.id for m in resumed.messages] == [str(i) for i in ids[3:6]]
    # A new job's event reaches a tenant stream that is already open.
    reading = asyncio.create_task(
        read_sse(
            live.client, "/v1/events", params={"type": "job.queued", "after": ids[-1]}, limit=1
        )
    )
    await asyncio.sleep(0.3)
    third = await submit(live, chat())
    stream = await asyncio.wait_for(reading, 10)
    assert stream.messages[0].json()["job_id"] == third
    bad = await read_sse(live.client, "/v1/events", headers={"Last-Event-ID": "x1"})
    assert bad.status == 422


async def test_upstream_failing_mid_stream_ends_the_stream_with_job_failed(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings_ = gateway_settings(database_url, upstream.base_url, jobs={"max_attempts": 1})
    upstream.script("m", Drop(after_chunks=2))
    async with serve(settings_) as live:
        job_id = await submit(live, chat(content="a long enough message"))
        stream = await read_sse(live.client, f"/v1/jobs/{job_id}/events")
        assert stream.messages[-1].event == "job.failed"
        assert stream.messages[-1].json()["data"]["error"]["type"]


async def test_an_idle_tenant_stream_reads_the_store_only_when_woken(
    database_url: str, upstream: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_ = gateway_settings(database_url, upstream.base_url, upstream={"max_concurrency": 1})
    upstream.script("blocker", Hang(30))
    async with serve(settings_) as live:
        store = live.gateway.store
        reads = 0
        read_tenant_events = store.list_tenant_events

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            return await read_tenant_events(*args, **kwargs)

        monkeypatch.setattr(store, "list_tenant_events", counted)
        # No safety re-read within these waits (the first at the 20 s cap, not after 1 s): only
        # a wake-up can bring a stream its event.
        monkeypatch.setattr(delivery_streams, "_FIRST_RESYNC", 60.0)
        finished = asyncio.create_task(
            read_sse(live.client, "/v1/events", params={"type": "job.succeeded"}, limit=1)
        )
        await asyncio.sleep(1.5)  # the stream's first read
        reads = 0
        await asyncio.sleep(3)
        assert reads == 0  # polling every 0.5 s made 6
        await submit(live, chat())
        stream = await asyncio.wait_for(finished, 10)
        assert stream.messages[0].event == "job.succeeded"
        # A job accepted but left queued publishes no event: the accept wakes the stream.
        await submit(live, chat("blocker"))
        queued = asyncio.create_task(
            read_sse(
                live.client,
                "/v1/events",
                params={"type": "job.queued", "after": "latest"},
                limit=1,
            )
        )
        await asyncio.sleep(1.5)
        waiting = await submit(live, chat())  # behind the blocker: max_concurrency is 1
        stream = await asyncio.wait_for(queued, 10)
        assert stream.messages[0].json()["job_id"] == waiting
