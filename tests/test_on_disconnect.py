"""What a facade call's client going away does to its job: it runs on (the default; the answer is
kept) or, with ``Hookline-On-Disconnect: cancel`` or the upstream's ``on_disconnect``, the
upstream call ends at once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx

from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Reply, ScriptedUpstream

SLOW = Reply(text="a long answer, token by token", chunks=10, token_delay=0.3)


def body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def leave_a_stream(live: LiveGateway, path: str, json: dict[str, Any], **headers: str) -> str:
    """Start a streamed call, read its first event, go away; the job's id."""
    async with (
        httpx.AsyncClient(base_url=live.base_url, timeout=10) as client,
        client.stream("POST", path, json=json, headers={
            "Authorization": f"Bearer {live.api_key}", **headers}) as response,
    ):  # fmt: skip
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and ("content" in line or "text_delta" in line):
                break
        return response.headers["hookline-job-id"]


async def test_a_stream_left_runs_on_by_default(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("stay", SLOW)
    job_id = await leave_a_stream(live, "/v1/chat/completions", body("stay", True))
    done = await wait_for_status(live.client, job_id, {"succeeded"})
    assert done["output"]["choices"][0]["message"]["content"] == SLOW.text


async def test_a_stream_left_with_cancel_ends_the_upstream_call(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("go", SLOW)
    job_id = await leave_a_stream(
        live, "/v1/chat/completions", body("go", True), **{"Hookline-On-Disconnect": "cancel"}
    )
    done = await wait_for_status(live.client, job_id, {"cancelled"})
    for _ in range(50):  # the upstream sees its request go away
        if upstream.seen("go")[0].aborted:
            break
        await asyncio.sleep(0.05)
    assert upstream.seen("go")[0].aborted
    # What was streamed before the cancel stays in the job's log, and the job keeps its output
    # so far (the worker records it as its call ends, a moment after the cancel).
    events = (await live.client.get(f"/v1/jobs/{done['id']}/events")).json()["data"]
    text = "".join(e["data"]["text"] for e in events if e["type"] == "job.output.delta")
    assert SLOW.text and SLOW.text.startswith(text)
    for _ in range(50):
        kept = (await live.client.get(f"/v1/jobs/{job_id}")).json()
        if kept["output"] is not None:
            break
        await asyncio.sleep(0.05)
    assert kept["status"] == "cancelled" and kept["output"]["object"] == "chat.completion"
    (choice,) = kept["output"]["choices"]
    partial = choice["message"]["content"]
    assert partial and partial.startswith(text) and SLOW.text.startswith(partial)
    assert len(partial) < len(SLOW.text) and choice["finish_reason"] is None
    assert [a["outcome"] for a in kept["attempt_log"]] == ["cancelled"]


async def test_a_waiting_call_left_is_cancelled_per_the_upstreams_default(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("wait", SLOW)
    settings = gateway_settings(
        database_url, upstream.base_url, upstream={"on_disconnect": "cancel"}
    )
    async with serve(settings) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=0.5) as client:
            with contextlib.suppress(httpx.ReadTimeout):  # the client gives up and goes away
                await client.post("/v1/messages", json={**body("wait", False), "max_tokens": 9},
                                  headers={"x-api-key": live.api_key})  # fmt: skip
        listed = (await live.client.get("/v1/jobs")).json()["data"]
        await wait_for_status(live.client, listed[0]["id"], {"cancelled"})
        # A call may still ask for the job to run on, and a value that is neither is refused.
        kept = await live.client.post("/v1/chat/completions", json=body("wait", False),
                                      headers={"Hookline-On-Disconnect": "continue"})  # fmt: skip
        assert kept.status_code == 200, kept.text
        wrong = await live.client.post("/v1/chat/completions", json=body("wait", False),
                                       headers={"Hookline-On-Disconnect": "later"})  # fmt: skip
        assert wrong.status_code == 422
