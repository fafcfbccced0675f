"""What an upstream can do wrong, and what the caller then sees (scripted server on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_upstream import (
    Drop,
    Endless,
    ErrorChunk,
    Garbage,
    Hang,
    Reply,
    ScriptedUpstream,
    Status,
)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "operation": "chat.completions",
        "model": model,
        "input": {"messages": [{"role": "user", "content": "hi there"}]},
        **extra,
    }


@contextlib.asynccontextmanager
async def gateway(database_url: str, base_url: str, **changes: Any) -> AsyncIterator[LiveGateway]:
    async with serve(gateway_settings(database_url, base_url, **changes)) as live:
        yield live


async def events_of(live: LiveGateway, job_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = (await live.client.get(f"/v1/jobs/{job_id}/events")).json()["data"]
    return data


async def test_slow_first_token_still_succeeds(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("slow", Reply(first_token_delay=1.0))
    job = (await live.client.post("/v1/jobs", json=chat("slow"))).json()
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert done["attempts"] == 1
    assert done["output"]["choices"][0]["message"]["content"] == "echo: hi there"


async def test_429_is_retried_no_sooner_than_retry_after(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("limited", Status(429, retry_after="1"), Reply())
    job = (await live.client.post("/v1/jobs", json=chat("limited"))).json()
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert done["attempts"] == 2
    first, second = upstream.seen("limited")
    assert second.at - first.at >= 0.95
    logs = [e for e in await events_of(live, job["id"]) if e["type"] == "job.log"]
    assert "retrying in" in logs[0]["data"]["message"]
    assert len(logs) == 1


async def test_500_is_retried_then_succeeds(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    upstream.script("flaky", Status(500), Status(503), Reply(text="third time lucky"))
    job = (await live.client.post("/v1/jobs", json=chat("flaky"))).json()
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert done["attempts"] == 3
    assert done["output"]["choices"][0]["message"]["content"] == "third time lucky"
    types = [e["type"] for e in await events_of(live, job["id"])]
    assert types.count("job.started") == 3 and types.count("job.log") == 2


async def test_stream_dropped_midway_is_retried_and_output_is_whole(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("dropping", Drop(after_chunks=2), Reply(chunks=4))
    job = (await live.client.post("/v1/jobs", json=chat("dropping"))).json()
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert done["attempts"] == 2
    assert done["output"]["choices"][0]["message"]["content"] == "echo: hi there"
    events = await events_of(live, job["id"])
    started = [e["data"]["attempt"] for e in events if e["type"] == "job.started"]
    assert started == [1, 2]
    deltas = [e["data"] for e in events if e["type"] == "job.output.delta"]
    first_attempt = "".join(d["text"] for d in deltas if d["attempt"] == 1)
    assert "echo: hi there".startswith(first_attempt) and first_attempt != "echo: hi there"
    assert "".join(d["text"] for d in deltas if d["attempt"] == 2) == "echo: hi there"


async def test_an_error_chunk_mid_stream_fails_the_attempt_after_the_text_before_it(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("erring", ErrorChunk(after_chunks=2, message="the model fell over"))
    async with gateway(database_url, upstream.base_url, jobs={"max_attempts": 2}) as live:
        job = (await live.client.post("/v1/jobs", json=chat("erring"))).json()
        done = await wait_for_status(live.client, job["id"], {"failed"})
        assert done["attempts"] == 2 and done["error"]["message"] == "the model fell over"
        events = await events_of(live, job["id"])
        deltas = [e["data"] for e in events if e["type"] == "job.output.delta"]
        first = "".join(d["text"] for d in deltas if d["attempt"] == 1)
        assert first and "echo: hi there".startswith(first) and first != "echo: hi there"


async def test_hang_past_the_timeout_fails_after_the_last_attempt(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("hang", Hang(30))
    async with gateway(
        database_url,
        upstream.base_url,
        upstream={"idle_timeout_seconds": 0.3},
        jobs={"max_attempts": 2},
    ) as live:
        job = (await live.client.post("/v1/jobs", json=chat("hang"))).json()
        done = await wait_for_status(live.client, job["id"], {"failed"})
        assert done["attempts"] == 2
        assert done["error"]["type"] == "upstream_timeout"
        assert done["error"]["message"] == "the upstream sent nothing for 0.3 s"  # not "too long"
        failed = [e for e in await events_of(live, job["id"]) if e["type"] == "job.failed"]
        assert len(failed) == 1 and failed[0]["data"]["error"]["type"] == "upstream_timeout"


async def test_client_error_fails_at_once_with_the_upstream_error(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("strict", Status(400, message="max_tokens is too large"))
    job = (await live.client.post("/v1/jobs", json=chat("strict"))).json()
    done = await wait_for_status(live.client, job["id"], {"failed"})
    assert done["attempts"] == 1
    assert done["error"]["upstream_status"] == 400
    assert done["error"]["message"] == "max_tokens is too large"
    assert len(upstream.seen("strict")) == 1


async def test_persistent_5xx_fails_after_max_attempts(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("down", Status(502))
    async with gateway(database_url, upstream.base_url, jobs={"max_attempts": 3}) as live:
        job = (await live.client.post("/v1/jobs", json=chat("down"))).json()
        done = await wait_for_status(live.client, job["id"], {"failed"})
        assert done["attempts"] == 3 and done["error"]["upstream_status"] == 502
        assert len(upstream.seen("down")) == 3


async def test_unreachable_upstream_is_retried_then_fails(database_url: str) -> None:
    # A port held bound but not listening refuses connections, and no server started during the
    # test (the gateway's own binds port 0) can be given it, as a port merely found free could.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        async with gateway(database_url, dead, jobs={"max_attempts": 2}) as live:
            job = (await live.client.post("/v1/jobs", json=chat("any"))).json()
            done = await wait_for_status(live.client, job["id"], {"failed"})
            assert done["attempts"] == 2 and done["error"]["type"] == "upstream_unreachable"


async def test_ttl_passing_before_start_expires_the_job(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("hang", Hang(30))
    async with gateway(database_url, upstream.base_url, upstream={"max_concurrency": 1}) as live:
        blocker = (await live.client.post("/v1/jobs", json=chat("hang"))).json()
        await wait_for_status(live.client, blocker["id"], {"running"})
        job = (await live.client.post("/v1/jobs", json=chat("m", ttl_seconds=0.3))).json()
        assert job["expires_at"] is not None
        done = await wait_for_status(live.client, job["id"], {"expired"})
        assert done["started_at"] is None
        assert [e["type"] for e in await events_of(live, job["id"])] == [
            "job.queued",
            "job.expired",
        ]
        assert upstream.seen("m") == []


@pytest.mark.fault
async def test_an_endless_stream_fails_at_max_output_bytes_and_writes_no_more(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    limit = 256 * 1024
    upstream.script("endless", Endless(piece_chars=1024))
    async with gateway(
        database_url,
        upstream.base_url,
        upstream={"max_output_bytes": limit},
        jobs={"max_attempts": 3},
    ) as live:
        loop = asyncio.get_running_loop()
        started = loop.time()
        job = (await live.client.post("/v1/jobs", json=chat("endless"))).json()
        done = await wait_for_status(live.client, job["id"], {"failed"}, timeout=8)
        assert loop.time() - started < 5  # not the attempt's timeout (10 s here), times attempts
        assert done["error"]["type"] == "output_too_large"
        assert done["attempts"] == 1  # not retried: the same request would run past it again
        events = await events_of(live, job["id"])
        text = sum(len(e["data"]["text"]) for e in events if e["type"] == "job.output.delta")
        assert 0 < text <= limit
        [seen] = upstream.seen("endless")
        for _ in range(100):  # the gateway hung up: the upstream stops sending
            if seen.aborted:
                break
            await asyncio.sleep(0.02)
        assert seen.aborted


async def test_a_non_streamed_answer_past_max_output_bytes_fails_the_attempt(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("large", Reply(text="y" * 300_000))
    async with gateway(
        database_url,
        upstream.base_url,
        upstream={"max_output_bytes": 256 * 1024, "stream": False},
    ) as live:
        job = (await live.client.post("/v1/jobs", json=chat("large"))).json()
        done = await wait_for_status(live.client, job["id"], {"failed"})
        assert done["error"]["type"] == "output_too_large" and done["attempts"] == 1
        small = (await live.client.post("/v1/jobs", json=chat("small"))).json()
        ok = await wait_for_status(live.client, small["id"], {"succeeded"})
        assert ok["output"]["choices"][0]["message"]["content"] == "echo: hi there"


async def test_random_bytes_for_a_stream_are_a_bad_response_not_a_disconnect(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("noise", Garbage())
    async with gateway(database_url, upstream.base_url, jobs={"max_attempts": 2}) as live:
        job = (await live.client.post("/v1/jobs", json=chat("noise"))).json()
        done = await wait_for_status(live.client, job["id"], {"failed"})
        assert done["attempts"] == 2  # retried, as a flaky proxy may answer properly next time
        assert done["error"]["type"] == "upstream_bad_response", done["error"]
        deltas = [e for e in await events_of(live, job["id"]) if e["type"] == "job.output.delta"]
        assert deltas == []


async def test_random_bytes_in_place_of_http_are_a_bad_response_not_unreachable(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("not-http", Garbage(raw=True))
    async with gateway(database_url, upstream.base_url, jobs={"max_attempts": 1}) as live:
        job = (await live.client.post("/v1/jobs", json=chat("not-http"))).json()
        done = await wait_for_status(live.client, job["id"], {"failed"})
        assert done["error"]["type"] == "upstream_bad_response", done["error"]
