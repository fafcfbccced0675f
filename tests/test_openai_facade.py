"""The OpenAI-compatible facade, driven by the official ``openai`` SDK and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from hookline.config import UpstreamConfig
from hookline.jobs import Operation
from hookline.upstreams.openai import OpenAIUpstream
from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Drop, Reply, ScriptedUpstream, Status, split_text
from tests.sse import read_sse

MESSAGES: list[Any] = [{"role": "user", "content": "hello facade"}]


def sdk(live: LiveGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=live.api_key, max_retries=0)


async def test_sdk_plain_chat_completion_is_a_durable_job(live: LiveGateway) -> None:
    async with sdk(live) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="echo-1", messages=MESSAGES, max_tokens=8
        )
        completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "echo: hello facade"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    job_id = raw.headers["hookline-job-id"]
    job = (await live.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "succeeded" and job["output"]["choices"][0]["message"]["content"]
    assert job["input"]["max_tokens"] == 8 and "model" not in job["input"]


async def test_sdk_streaming_chat_relays_chunks_in_openai_format(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    text = "".join(f"t{i} " for i in range(30))
    upstream.script("echo-1", Reply(text=text, chunks=30, token_delay=0.005))
    async with sdk(live) as client:
        stream = await client.chat.completions.create(
            model="echo-1",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


async def test_raw_stream_ends_with_done_and_carries_the_job_id(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("echo-1", Reply(text="abc def", chunks=3))
    body = {"model": "echo-1", "messages": MESSAGES, "stream": True}
    stream = await read_sse(live.client, "/v1/chat/completions", method="POST", json_body=body)
    assert stream.status == 200
    assert stream.headers["hookline-job-id"].startswith("job_")
    assert stream.messages[-1].data == "[DONE]"
    assert all(m.event is None and m.id is None for m in stream.messages)  # OpenAI's plain format
    chunks = [json.loads(m.data) for m in stream.messages[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "abc def"


async def test_a_burst_goes_out_first_token_first(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    """A fast upstream's stream piles up while the job is accepted: its first events are relayed
    before the rest of the burst is parsed, and nothing is lost or repeated."""
    text = "".join(f"t{i} " for i in range(60))
    upstream.script("echo-1", Reply(text=text, chunks=60, burst=True))
    body = {"model": "echo-1", "messages": MESSAGES, "stream": True}
    stream = await read_sse(live.client, "/v1/chat/completions", method="POST", json_body=body)
    chunks = [json.loads(m.data) for m in stream.messages[:-1]]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    texts = [t for t in texts if t]
    assert "".join(texts) == text
    first, second = split_text(text, 60)[:2]
    assert texts[0] in (first, first + second)  # read whole, the burst's first two events go first
    job = (await live.client.get(f"/v1/jobs/{stream.headers['hookline-job-id']}")).json()
    assert job["output"]["choices"][0]["message"]["content"] == text


async def test_a_burst_held_for_its_accept_is_read_only_to_its_first_events_until_released(
    upstream: ScriptedUpstream,
) -> None:
    """While a job's accept commits nobody can see its text: the upstream reader takes only the
    burst's first events (ready to show at once), and the rest once the accept is through, so
    under load the held bursts do not compete with the accepts that release them."""
    text = "".join(f"t{i} " for i in range(60))
    upstream.script("echo-1", Reply(text=text, chunks=60, burst=True))
    config = UpstreamConfig(name="scripted", type="openai", base_url=upstream.base_url)
    client = OpenAIUpstream(config)
    held = asyncio.get_running_loop().create_future()
    seen: list[str] = []
    some_seen = asyncio.Event()

    def on_delta(index: int, piece: str) -> None:
        seen.append(piece)
        some_seen.set()

    body = {"model": "echo-1", "messages": MESSAGES}
    call = asyncio.create_task(
        client.run(Operation.CHAT_COMPLETIONS, body, on_delta, held_until=held)
    )
    try:
        await asyncio.wait_for(some_seen.wait(), 10)
        await asyncio.sleep(0.2)  # time enough to read the whole burst, were it not held
        first, second = split_text(text, 60)[:2]
        assert "".join(seen) in (first, first + second)
        assert not call.done()
        held.set_result(True)
        output = await call
    finally:
        call.cancel()
        await client.close()
    assert "".join(seen) == text
    assert output["choices"][0]["message"]["content"] == text


async def test_a_quiet_stream_gets_heartbeats_until_its_first_token(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(database_url, upstream.base_url, streams={"heartbeat_seconds": 0.2})
    upstream.script("echo-1", Reply(text="late but whole", chunks=2, first_token_delay=1.2))
    body = {"model": "echo-1", "messages": MESSAGES, "stream": True}
    async with serve(settings) as live:
        stream = await read_sse(live.client, "/v1/chat/completions", method="POST", json_body=body)
    # One per 0.2 s of the 1.2 s wait; at least two even on a busy machine (one run of the
    # whole suite got only two).
    assert len(stream.comments) >= 2
    chunks = [json.loads(m.data) for m in stream.messages[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "late but whole"
    assert stream.messages[-1].data == "[DONE]"


async def test_completions_and_embeddings_and_models(live: LiveGateway) -> None:
    async with sdk(live) as client:
        completion = await client.completions.create(model="echo-1", prompt="say hi", max_tokens=5)
        assert completion.choices[0].text == "echo: say hi"
        streamed = await client.completions.create(model="echo-1", prompt="stream me", stream=True)
        pieces = [c.choices[0].text async for c in streamed if c.choices]
        assert "".join(pieces) == "echo: stream me"
        embedding = await client.embeddings.create(model="embed-1", input=["a", "b"])
        assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0
        models = await client.models.list()
    assert isinstance(models.data, list)


async def test_models_lists_named_models_not_patterns(database_url: str) -> None:
    settings = gateway_settings(database_url, "http://127.0.0.1:9/v1")
    upstream = settings.upstreams[0].model_copy(update={"models": ["gpt-x", "llama-*"]})
    async with (
        serve(settings.model_copy(update={"upstreams": [upstream]})) as live,
        sdk(live) as client,
    ):
        models = await client.models.list()
    assert [m.id for m in models.data] == ["gpt-x"]
    assert models.data[0].owned_by == "scripted"


async def test_respond_async_answers_202_with_the_job(live: LiveGateway) -> None:
    body = {"model": "echo-1", "messages": MESSAGES}
    response = await live.client.post(
        "/v1/chat/completions", json=body, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202
    job = response.json()
    assert response.headers["hookline-job-id"] == job["id"]
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert done["output"]["choices"][0]["message"]["content"] == "echo: hello facade"


async def test_a_client_that_disconnects_does_not_abort_the_job(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    text = "".join(f"x{i} " for i in range(20))
    upstream.script("echo-1", Reply(text=text, chunks=20, token_delay=0.05))
    body = {"model": "echo-1", "messages": MESSAGES, "stream": True}
    partial = await read_sse(
        live.client, "/v1/chat/completions", method="POST", json_body=body, limit=3
    )
    job_id = partial.headers["hookline-job-id"]
    # The relay to the gone client stops (its watch of the job ends) while the job runs on.
    for _ in range(100):
        if not live.gateway.queue.live.watching(job_id):
            break
        await asyncio.sleep(0.01)
    assert not live.gateway.queue.live.watching(job_id)
    assert (await live.client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"
    done = await wait_for_status(live.client, job_id, {"succeeded"})
    assert done["output"]["choices"][0]["message"]["content"] == text
    assert upstream.requests[-1].aborted is False
    # The client reattaches to the whole stream through the job API.
    events = await read_sse(live.client, f"/v1/jobs/{job_id}/events")
    texts = [m.json()["data"]["text"] for m in events.messages if m.event == "job.output.delta"]
    assert "".join(texts) == text

    # The same holds for a plain call whose client gives up waiting.
    upstream.script("echo-1", Reply(text="slow answer", first_token_delay=1.0))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(
            live.client.post("/v1/chat/completions", json={**body, "stream": False}), 0.3
        )
    jobs = (await live.client.get("/v1/jobs", params={"limit": 1})).json()["data"]
    done = await wait_for_status(live.client, jobs[0]["id"], {"succeeded"})
    assert done["output"]["choices"][0]["message"]["content"] == "slow answer"


async def test_upstream_errors_come_back_in_openai_format(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(database_url, upstream.base_url, jobs={"max_attempts": 1})
    async with serve(settings) as live:
        upstream.script("echo-1", Status(400, message="bad things"))
        async with sdk(live) as client:
            with pytest.raises(openai.BadRequestError) as error:
                await client.chat.completions.create(model="echo-1", messages=MESSAGES)
            assert "bad things" in str(error.value)
            assert error.value.response.headers["hookline-job-id"].startswith("job_")

            # Mid-stream: the upstream drops the connection and no attempts are left.
            upstream.script("echo-1", Drop(after_chunks=2))
            with pytest.raises(openai.APIError) as mid_stream:
                stream = await client.chat.completions.create(
                    model="echo-1",
                    messages=[{"role": "user", "content": "long " * 10}],
                    stream=True,
                )
                async for _ in stream:
                    pass
            assert "upstream" in str(mid_stream.value).lower() or mid_stream.value.message


async def test_bad_requests_get_problem_json_with_an_openai_error(live: LiveGateway) -> None:
    cases: list[tuple[dict[str, Any], int]] = [
        # The same answers as /v1/jobs: 400 for a body that is not JSON, 415 for another type.
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 422),
        ({"content": b"model=x", "headers": {"content-type": "text/plain"}}, 415),
        ({"json": {"messages": MESSAGES}}, 422),  # no model
        ({"json": {"model": "echo-1"}}, 422),  # no messages
        ({"json": {"model": "echo-1", "messages": "nope"}}, 422),
    ]
    before = len((await live.client.get("/v1/jobs")).json()["data"])
    for kwargs, status in cases:
        response = await live.client.post("/v1/chat/completions", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["error"]["message"] == problem["detail"]
    assert len((await live.client.get("/v1/jobs")).json()["data"]) == before  # nothing queued
    anonymous = await live.client.post(
        "/v1/chat/completions",
        json={"model": "echo-1", "messages": MESSAGES},
        headers={"Authorization": "Bearer nope"},
    )
    assert anonymous.status_code == 401 and "error" in anonymous.json()
    async with openai.AsyncOpenAI(
        base_url=f"{live.base_url}/v1", api_key="wrong", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_the_synchronous_sdk_works_too(live: LiveGateway) -> None:
    def call() -> tuple[str | None, str]:
        with openai.OpenAI(
            base_url=f"{live.base_url}/v1", api_key=live.api_key, max_retries=0
        ) as client:
            plain = client.chat.completions.create(model="echo-1", messages=MESSAGES)
            streamed = client.chat.completions.create(
                model="echo-1", messages=MESSAGES, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        return plain.choices[0].message.content, text

    plain, streamed = await asyncio.to_thread(call)  # the gateway runs in this test's loop
    assert plain == streamed == "echo: hello facade"


async def test_a_waiting_call_is_run_at_once_by_this_process_and_only_once(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    async with sdk(live) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="once-1", messages=MESSAGES
        )
    job_id = raw.headers["hookline-job-id"]
    await asyncio.sleep(0.3)  # a second run, if the claim loop also took it, would show by now
    assert upstream.counts["once-1"] == 1
    events = (await live.client.get(f"/v1/jobs/{job_id}/events")).json()["data"]
    types = [e["type"] for e in events]
    assert types[:2] == ["job.queued", "job.started"] and types[-1] == "job.succeeded"
    assert set(types[2:-1]) == {"job.output.delta"}  # one started, one ending: a single run
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    job = (await live.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["attempts"] == 1 and job["started_at"] is not None


async def test_facade_jobs_cost_no_claim_transactions(
    live: LiveGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A facade call is accepted already claimed: its end frees a slot but, with nothing queued,
    wakes no claim (before, each one cost an empty claim transaction). A queued job still runs."""
    store = live.gateway.store
    claims = 0
    claim_jobs = store.claim_jobs

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return await claim_jobs(*args, **kwargs)

    monkeypatch.setattr(store, "claim_jobs", counting)
    body = {"model": "echo-1", "messages": MESSAGES}
    started = asyncio.get_running_loop().time()
    for _ in range(20):
        response = await live.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
    elapsed = asyncio.get_running_loop().time() - started
    polls = elapsed / live.gateway.settings.worker.poll_seconds
    assert claims <= polls + 5, (claims, polls)  # the idle polls only, not one per job (20)
    # A job that waits in the queue is still claimed and run (its accept announces it).
    queued = {"operation": "chat.completions", "model": "echo-1", "input": {"messages": MESSAGES}}
    job = (await live.client.post("/v1/jobs", json=queued)).json()
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert done["status"] == "succeeded"
