"""The Anthropic-compatible front door, ``POST /v1/messages``: the official ``anthropic`` SDK with
only its base URL changed, against any upstream (an OpenAI-compatible one, or Claude), every call
a durable job."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import LiveGateway, serve, wait_for_status
from tests.scripted_anthropic import ScriptedAnthropic, ToolUse
from tests.scripted_upstream import Reply, ScriptedUpstream, Status
from tests.test_anthropic_upstream import with_claude

anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is not installed")


def sdk(live: LiveGateway) -> Any:
    """The official client, only its base URL changed (and no retries of its own)."""
    return anthropic.AsyncAnthropic(api_key=live.api_key, base_url=live.base_url, max_retries=0)


async def test_the_sdk_gets_a_message_from_an_openai_upstream(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    async with sdk(live) as client:
        raw = await client.messages.with_raw_response.create(
            model="gpt-test",
            max_tokens=64,
            system="Be brief.",
            messages=[{"role": "user", "content": "hello"}],
            stop_sequences=["END"],
        )
        message = await raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "echo: hello"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 5 and message.usage.output_tokens == 4  # 4 chunks
    (sent,) = upstream.seen("gpt-test")
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]
    assert sent.body["max_tokens"] == 64 and sent.body["stop"] == ["END"]
    # A durable job, named in a header, that the job API shows.
    job_id = raw.headers["hookline-job-id"]
    job = await wait_for_status(live.client, job_id, {"succeeded"})
    assert job["metadata"] == {"via": "anthropic"}


async def test_the_sdk_streams_a_message(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    upstream.script("gpt-stream", Reply(text="one two three four", chunks=4, token_delay=0.05))
    async with (
        sdk(live) as client,
        client.messages.stream(
            model="gpt-stream", max_tokens=64, messages=[{"role": "user", "content": "count"}]
        ) as stream,
    ):
        pieces = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert "".join(pieces) == "one two three four"
    assert len(pieces) > 1  # streamed as the upstream produced it
    assert message.content[0].text == "one two three four"
    assert message.stop_reason == "end_turn"


async def test_tool_use_through_claude_and_back(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    """Anthropic in, a chat job in the middle, Anthropic out: a tool call survives both
    translations, streamed and not."""
    weather = {"city": "Paris"}
    tools = [{"name": "get_weather", "description": "Weather",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    claude.script("claude-tools", ToolUse("get_weather", weather, text="Looking."))
    async with serve(with_claude(database_url, upstream, claude)) as live, sdk(live) as client:
        question = [{"role": "user", "content": "Weather?"}]
        message = await client.messages.create(
            model="claude-tools", max_tokens=100, messages=question, tools=tools,
            tool_choice={"type": "tool", "name": "get_weather"},
        )  # fmt: skip
        assert message.stop_reason == "tool_use"
        text, call = message.content
        assert text.type == "text" and text.text == "Looking."
        assert call.type == "tool_use" and call.name == "get_weather"
        assert call.input == weather
        sent = claude.seen("claude-tools")[0].body
        assert sent["tool_choice"] == {"type": "tool", "name": "get_weather"}
        assert sent["tools"][0]["input_schema"] == tools[0]["input_schema"]

        async with client.messages.stream(
            model="claude-tools", max_tokens=100, messages=question, tools=tools
        ) as stream:
            streamed = await stream.get_final_message()
        assert [b.type for b in streamed.content] == ["text", "tool_use"]
        assert streamed.content[1].input == weather

        # The tool's answer goes back as a tool_result: Claude sees its tool_use and the result.
        claude.script("claude-tools", ToolUse("get_weather", weather, text="Sunny."))
        answer = await client.messages.create(
            model="claude-tools",
            max_tokens=100,
            tools=tools,
            messages=[
                *question,
                {"role": "assistant", "content": [b.model_dump() for b in message.content]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "24 C"}]},
            ],
        )  # fmt: skip
    assert answer.content[0].text == "Sunny."
    last = claude.seen("claude-tools")[-1].body["messages"]
    assert last[1]["content"][1] == {
        "type": "tool_use", "id": call.id, "name": "get_weather", "input": weather
    }  # fmt: skip
    assert last[2]["content"] == [
        {"type": "tool_result", "tool_use_id": call.id, "content": "24 C"}
    ]


async def test_errors_come_in_anthropics_shape(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("gpt-refused", Status(400, message="context too long"))
    async with sdk(live) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(
                model="gpt-refused", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(anthropic.BadRequestError) as invalid:
            await client.messages.create(
                model="gpt-test", max_tokens=0, messages=[{"role": "user", "content": "x"}]
            )
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "context too long"},
        "title": "Bad Request",
        "status": 400,
        "detail": "context too long",
    }
    assert "max_tokens" in invalid.value.message
    assert upstream.seen("gpt-test") == []  # refused before it was a job

    # x-api-key is the key (as the SDK sends it); a wrong one is a 401.
    async with httpx.AsyncClient(base_url=live.base_url) as anonymous:
        bad = await anonymous.post("/v1/messages", headers={"x-api-key": "hk_wrong"}, json={})
    assert bad.status_code == 401


async def test_an_overloaded_upstream_is_an_overloaded_error_after_its_retries(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    claude.script("claude-busy", Status(529, message="Overloaded"))
    settings = with_claude(database_url, upstream, claude)
    settings = settings.model_copy(
        update={"jobs": settings.jobs.model_copy(update={"max_attempts": 2})}
    )
    async with serve(settings) as live:
        body = {
            "model": "claude-busy",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
        }
        answer = await live.client.post("/v1/messages", json=body)
        streamed = await live.client.post("/v1/messages", json={**body, "stream": True})
    assert answer.status_code == 502  # (529 is Anthropic's, not HTTP's: not in the spec)
    assert answer.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert claude.counts["claude-busy"] == 4  # two attempts each
    events = [line for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert events == ["event: message_start", "event: error"]
    last = json.loads(streamed.text.strip().splitlines()[-1].removeprefix("data: "))
    assert last == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
