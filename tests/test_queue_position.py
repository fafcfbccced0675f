"""A queued job's position among the jobs waiting for its upstream, and its estimated start."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import hookline.api.streams
from tests.conftest import gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Reply, ScriptedUpstream


def chat(priority: int = 0) -> dict[str, Any]:
    return {"operation": "chat.completions", "model": "slow", "priority": priority,
            "input": {"messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip


async def test_positions_count_down_as_the_jobs_ahead_finish(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    # Each call long enough that the checks before the countdown finish within the first one,
    # on a loaded machine too.
    upstream.script("slow", Reply(first_token_delay=1.5))
    settings = gateway_settings(database_url, upstream.base_url, upstream={"max_concurrency": 1})
    async with serve(settings) as live:
        ids = [(await live.client.post("/v1/jobs", json=chat())).json()["id"] for _ in range(4)]
        await wait_for_status(live.client, ids[0], {"running"})

        async def queue_of(job_id: str) -> Any:
            return (await live.client.get(f"/v1/jobs/{job_id}")).json().get("queue")

        assert [(await queue_of(i))["position"] for i in ids[1:]] == [1, 2, 3]
        assert (await queue_of(ids[3]))["upstream"] == "scripted"
        # A job of higher priority goes before them.
        urgent = (await live.client.post("/v1/jobs", json=chat(priority=5))).json()["id"]
        assert (await queue_of(urgent))["position"] == 1
        assert (await queue_of(ids[3]))["position"] == 4
        seen: list[dict[str, Any]] = []
        while (queue := await queue_of(ids[3])) is not None:
            if not seen or queue["position"] != seen[-1]["position"]:
                seen.append(queue)
            await asyncio.sleep(0.05)
        assert [q["position"] for q in seen] == [4, 3, 2, 1]
        # Once jobs have finished, the upstream's throughput gives an estimated start.
        assert seen[0]["estimated_start_seconds"] is None  # nothing had finished yet
        assert seen[-1]["estimated_start_seconds"] is not None
        done = await wait_for_status(live.client, ids[3], {"succeeded"})
        assert "queue" not in done


async def test_a_queued_jobs_stream_tells_its_position(
    database_url: str, upstream: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hookline.api.streams, "POSITION_SECONDS", 0.1)
    upstream.script("slow", Reply(first_token_delay=0.6))
    settings = gateway_settings(database_url, upstream.base_url, upstream={"max_concurrency": 1})
    async with serve(settings) as live:
        ids = [(await live.client.post("/v1/jobs", json=chat())).json()["id"] for _ in range(3)]
        headers = {"Accept": "text/event-stream"}
        events: list[tuple[str | None, str, dict[str, Any]]] = []
        async with live.client.stream("GET", f"/v1/jobs/{ids[2]}/events", headers=headers) as r:
            event_id, kind = None, ""
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((event_id, kind, json.loads(line[6:])))
                    event_id = None
                    if kind == "job.succeeded":
                        break
    progress = [(i, data) for i, kind, data in events if kind == "job.progress"]
    positions = [data["data"]["queue"]["position"] for _, data in progress]
    assert positions[0] >= 2 and positions[-1] == 1
    assert positions == sorted(positions, reverse=True)
    assert all(i is None for i, _ in progress)  # not durable: a reconnect resumes elsewhere
    kinds = [kind for _, kind, _ in events if kind != "job.progress"]
    assert kinds[0] == "job.queued" and kinds[-1] == "job.succeeded"
