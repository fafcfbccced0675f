"""The job API through real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import LiveGateway, wait_for_status
from tests.scripted_upstream import Hang, Reply, ScriptedUpstream

CHAT = {
    "operation": "chat.completions",
    "model": "echo-1",
    "input": {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8},
}


async def test_submit_answers_202_with_location_and_runs_to_success(live: LiveGateway) -> None:
    response = await live.client.post("/v1/jobs", json=CHAT)
    assert response.status_code == 202
    job = response.json()
    assert job["id"].startswith("job_") and job["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["links"]["events"] == f"/v1/jobs/{job['id']}/events"

    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert done["attempts"] == 1
    assert done["upstream"] == "scripted"
    output = done["output"]
    assert output["object"] == "chat.completion"
    assert output["choices"][0]["message"] == {
        "role": "assistant",
        "content": "echo: hi there",
        "refusal": None,
    }  # reassembled from the stream, in OpenAI's exact shape
    assert output["choices"][0]["finish_reason"] == "stop"
    assert output["usage"]["completion_tokens"] == 4
    assert done["started_at"] is not None and done["finished_at"] is not None


async def test_streamed_output_is_recorded_as_ordered_deltas(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script(
        "slow-tokens", Reply(text="one two three four five six", chunks=12, token_delay=0.02)
    )
    job = (await live.client.post("/v1/jobs", json={**CHAT, "model": "slow-tokens"})).json()
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    events = (await live.client.get(f"/v1/jobs/{job['id']}/events")).json()["data"]
    types = [e["type"] for e in events]
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] == "job.succeeded"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    deltas = [e for e in events if e["type"] == "job.output.delta"]
    # Coalesced (fewer events than tokens) yet complete.
    assert 1 <= len(deltas) < 12
    assert (
        "".join(d["data"]["text"] for d in deltas)
        == done["output"]["choices"][0]["message"]["content"]
    )
    assert all(d["data"]["attempt"] == 1 for d in deltas)
    later = (await live.client.get(f"/v1/jobs/{job['id']}/events", params={"after": 2})).json()[
        "data"
    ]
    assert [e["seq"] for e in later] == list(range(3, len(events) + 1))


async def test_completions_and_embeddings(live: LiveGateway) -> None:
    completion = (
        await live.client.post(
            "/v1/jobs",
            json={"operation": "completions", "model": "m", "input": {"prompt": "Say"}},
        )
    ).json()
    embedding = (
        await live.client.post(
            "/v1/jobs",
            json={"operation": "embeddings", "model": "m", "input": {"input": ["a", "bcd"]}},
        )
    ).json()
    done = await wait_for_status(live.client, completion["id"], {"succeeded"})
    assert done["output"]["object"] == "text_completion"
    assert done["output"]["choices"][0]["text"] == "echo: Say"
    done = await wait_for_status(live.client, embedding["id"], {"succeeded"})
    assert [d["embedding"][0] for d in done["output"]["data"]] == [1.0, 3.0]


async def test_model_may_come_from_input(live: LiveGateway) -> None:
    body = {"operation": "chat.completions", "input": {**CHAT["input"], "model": "from-input"}}  # type: ignore[dict-item]
    job = (await live.client.post("/v1/jobs", json=body)).json()
    assert job["model"] == "from-input"


async def test_prefer_wait_returns_the_finished_job(live: LiveGateway) -> None:
    response = await live.client.post("/v1/jobs", json=CHAT, headers={"Prefer": "wait=10"})
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.headers["preference-applied"] == "wait=10"


async def test_prefer_wait_times_out_as_202(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    upstream.script("hang", Hang(30))
    response = await live.client.post(
        "/v1/jobs", json={**CHAT, "model": "hang"}, headers={"Prefer": "respond-async, wait=1"}
    )
    assert response.status_code == 202
    assert response.json()["status"] in {"queued", "running"}


async def test_long_poll_returns_early_when_the_job_finishes(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("slow", Reply(first_token_delay=0.5))
    job = (await live.client.post("/v1/jobs", json={**CHAT, "model": "slow"})).json()
    loop = asyncio.get_running_loop()
    started = loop.time()
    polled = (await live.client.get(f"/v1/jobs/{job['id']}", params={"wait": 20})).json()
    assert polled["status"] == "succeeded"
    assert loop.time() - started < 10


async def test_idempotency_key_same_body_same_job_different_body_409(live: LiveGateway) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await live.client.post("/v1/jobs", json=CHAT, headers=headers)
    again = await live.client.post("/v1/jobs", json=CHAT, headers=headers)
    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = await live.client.post("/v1/jobs", json={**CHAT, "priority": 3}, headers=headers)
    assert other.status_code == 409
    assert other.headers["content-type"] == "application/problem+json"
    assert first.json()["id"] in other.json()["detail"]
    listed = (await live.client.get("/v1/jobs")).json()["data"]
    assert len(listed) == 1


async def test_concurrent_submits_with_one_key_make_one_job(live: LiveGateway) -> None:
    headers = {"Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *(live.client.post("/v1/jobs", json=CHAT, headers=headers) for _ in range(10))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1


async def test_list_filters_and_paginates(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    upstream.script("hang", Hang(30))
    ids = []
    for i in range(5):
        job = (await live.client.post("/v1/jobs", json={**CHAT, "metadata": {"n": str(i)}})).json()
        ids.append(job["id"])
    embed = (
        await live.client.post(
            "/v1/jobs", json={"operation": "embeddings", "model": "m", "input": {"input": "x"}}
        )
    ).json()
    for job_id in [*ids, embed["id"]]:
        await wait_for_status(live.client, job_id, {"succeeded"})
    hanging = (await live.client.post("/v1/jobs", json={**CHAT, "model": "hang"})).json()
    await wait_for_status(live.client, hanging["id"], {"running"})

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 2, "operation": "chat.completions"}
        if cursor:
            params["cursor"] = cursor
        page = (await live.client.get("/v1/jobs", params=params)).json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == [hanging["id"], *reversed(ids)]

    running = (await live.client.get("/v1/jobs", params={"status": "running"})).json()["data"]
    assert [job["id"] for job in running] == [hanging["id"]]
    both = (
        await live.client.get(
            "/v1/jobs", params=[("status", "running"), ("operation", "embeddings")]
        )
    ).json()["data"]
    assert both == []


async def fill_every_slot(live: LiveGateway, upstream: ScriptedUpstream) -> list[dict[str, Any]]:
    """Occupy all 8 slots of the upstream with hanging jobs, so the next job stays queued."""
    upstream.script("hang", Hang(30))
    blockers = [
        (await live.client.post("/v1/jobs", json={**CHAT, "model": "hang"})).json()
        for _ in range(8)
    ]
    for blocker in blockers:
        await wait_for_status(live.client, blocker["id"], {"running"})
    return blockers


async def test_cancel_queued_job_at_once(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    await fill_every_slot(live, upstream)
    queued = (await live.client.post("/v1/jobs", json=CHAT)).json()
    response = await live.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    events = (await live.client.get(f"/v1/jobs/{queued['id']}/events")).json()["data"]
    assert [e["type"] for e in events] == ["job.queued", "job.cancelled"]
    # Cancelling a finished job changes nothing.
    again = await live.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert again.json()["status"] == "cancelled"
    assert len((await live.client.get(f"/v1/jobs/{queued['id']}/events")).json()["data"]) == 2


async def test_cancel_running_job_aborts_the_upstream_call(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("hang", Hang(30))
    job = (await live.client.post("/v1/jobs", json={**CHAT, "model": "hang"})).json()
    await wait_for_status(live.client, job["id"], {"running"})
    cancelled = (await live.client.post(f"/v1/jobs/{job['id']}/cancel")).json()
    assert cancelled["status"] == "cancelled"
    for _ in range(100):
        if upstream.seen("hang") and upstream.seen("hang")[0].aborted:
            break
        await asyncio.sleep(0.05)
    assert upstream.seen("hang")[0].aborted, "the upstream request was not aborted"
    await asyncio.sleep(0.3)
    final = (await live.client.get(f"/v1/jobs/{job['id']}")).json()
    assert final["status"] == "cancelled"
    types = [
        e["type"] for e in (await live.client.get(f"/v1/jobs/{job['id']}/events")).json()["data"]
    ]
    assert types == ["job.queued", "job.started", "job.cancelled"]


async def test_priority_runs_first(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    blockers = await fill_every_slot(live, upstream)
    low = (await live.client.post("/v1/jobs", json={**CHAT, "model": "low"})).json()
    high = (
        await live.client.post("/v1/jobs", json={**CHAT, "model": "high", "priority": 10})
    ).json()
    await live.client.post(f"/v1/jobs/{blockers[0]['id']}/cancel")
    await wait_for_status(live.client, high["id"], {"succeeded"})
    assert next(r.model for r in upstream.requests if r.model in ("low", "high")) == "high"
    await live.client.post(f"/v1/jobs/{blockers[1]['id']}/cancel")
    await wait_for_status(live.client, low["id"], {"succeeded"})


async def test_openapi_spec_lists_the_job_routes(live: LiveGateway) -> None:
    spec = (await live.client.get("/openapi.json")).json()
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
    } <= set(spec["paths"])


async def test_health_and_readiness(live: LiveGateway) -> None:
    assert (await live.client.get("/healthz")).json() == {"status": "ok"}
    ready = await live.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
