"""Anthropic as an upstream: chat jobs run on a scripted Messages API server on loopback, the
request and the streamed answer translated both ways, and its faults retried as any upstream's."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hookline.config import UpstreamConfig
from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_anthropic import ScriptedAnthropic, ToolUse
from tests.scripted_upstream import Drop, ErrorChunk, Hang, Reply, ScriptedUpstream, Status


def with_claude(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic, **fields: Any
) -> Any:
    """The test gateway's settings with an anthropic upstream serving ``claude-*`` first."""
    settings = gateway_settings(database_url, upstream.base_url)
    anthropic = UpstreamConfig(
        name="claude",
        type="anthropic",
        base_url=claude.base_url,
        api_key="sk-ant-test",
        models=["claude-*"],
        timeout_seconds=10,
        idle_timeout_seconds=fields.pop("idle_timeout_seconds", 5),
        **fields,
    )
    return settings.model_copy(update={"upstreams": [anthropic, *settings.upstreams]})


@contextlib.asynccontextmanager
async def claude_gateway(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic, **fields: Any
) -> AsyncIterator[LiveGateway]:
    async with serve(with_claude(database_url, upstream, claude, **fields)) as live:
        yield live


def chat(model: str, *messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    given = list(messages) or [{"role": "user", "content": "hi there"}]
    return {"operation": "chat.completions", "model": model, "input": {"messages": given, **extra}}


async def run(live: LiveGateway, body: dict[str, Any], status: str = "succeeded") -> dict[str, Any]:
    job = (await live.client.post("/v1/jobs", json=body)).json()
    return await wait_for_status(live.client, job["id"], {status})


async def test_a_chat_job_runs_on_claude_translated_both_ways(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    claude.script("claude-test", Reply(text="Bonjour, le monde", chunks=3))
    async with claude_gateway(database_url, upstream, claude) as live:
        body = chat(
            "claude-test",
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello world"},
            temperature=1.5,
            stop="END",
        )
        done = await run(live, body)
        events = (await live.client.get(f"/v1/jobs/{done['id']}/events")).json()["data"]
    assert done["upstream"] == "claude"
    output = done["output"]
    assert output["object"] == "chat.completion"
    choice = output["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Bonjour, le monde",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    # Anthropic's usage in OpenAI's terms: cached prompt tokens count in the prompt.
    assert output["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    # The text was streamed: deltas in the log, as for any upstream.
    deltas = "".join(e["data"]["text"] for e in events if e["type"] == "job.output.delta")
    assert deltas == "Bonjour, le monde"
    (sent,) = claude.seen("claude-test")
    assert sent.body["system"] == "Answer in French."
    assert sent.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello world"}]}
    ]
    assert sent.body["max_tokens"] == 4096  # required by Anthropic: the configured default
    assert sent.body["temperature"] == 1.0  # OpenAI's 0-2, clamped to Anthropic's 0-1
    assert sent.body["stop_sequences"] == ["END"]
    assert sent.body["stream"] is True
    assert claude.headers[0].api_key == "sk-ant-test"
    assert claude.headers[0].version == "2023-06-01"


async def test_tool_calls_go_both_ways(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    weather = {"city": "Paris", "unit": "celsius"}
    claude.script("claude-tools", ToolUse("get_weather", weather, text="Let me look."))
    tools: list[dict[str, Any]] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    async with claude_gateway(database_url, upstream, claude) as live:
        done = await run(
            live,
            chat("claude-tools", {"role": "user", "content": "Weather in Paris?"}, tools=tools,
                 tool_choice="required", max_tokens=50),
        )  # fmt: skip
        choice = done["output"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["id"] == "toolu_01scripted" and call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == weather
        assert choice["message"]["content"] == "Let me look."
        first = claude.seen("claude-tools")[0].body
        assert first["tools"] == [
            {
                "name": "get_weather",
                "input_schema": tools[0]["function"]["parameters"],
                "description": "The weather in a city",
            }
        ]
        assert first["tool_choice"] == {"type": "any"}
        assert first["max_tokens"] == 50

        # The conversation goes on with the tool's answer: a tool_use and a tool_result.
        claude.script("claude-tools", Reply(text="It is sunny."))
        follow_up = chat(
            "claude-tools",
            {"role": "user", "content": "Weather in Paris?"},
            choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24 C"},
            tools=tools,
        )
        done = await run(live, follow_up)
    assert done["output"]["choices"][0]["message"]["content"] == "It is sunny."
    second = claude.seen("claude-tools")[1].body
    assert second["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_01scripted", "name": "get_weather", "input": weather},
        ],
    }
    assert second["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01scripted", "content": "sunny, 24 C"}
        ],
    }


async def test_a_whole_answer_is_translated_too(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    claude.script("claude-whole", ToolUse("lookup", {"q": "x"}))
    async with claude_gateway(database_url, upstream, claude, stream=False) as live:
        done = await run(live, chat("claude-whole"))
    assert "stream" not in claude.seen("claude-whole")[0].body
    choice = done["output"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"q": "x"}
    assert done["output"]["usage"]["completion_tokens"] == 3


async def test_429_with_retry_after_and_529_overloaded_are_retried(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    claude.script(
        "claude-busy",
        Status(429, retry_after="1", message="rate limited"),
        Status(529, message="Overloaded"),
        Status(500),
        Reply(text="at last"),
    )
    async with claude_gateway(database_url, upstream, claude) as live:
        done = await run(live, chat("claude-busy"))
        events = (await live.client.get(f"/v1/jobs/{done['id']}/events")).json()["data"]
    assert done["attempts"] == 4
    assert done["output"]["choices"][0]["message"]["content"] == "at last"
    first, second, *_ = claude.seen("claude-busy")
    assert second.at - first.at >= 0.95  # never sooner than retry-after
    logs = [e["data"]["message"] for e in events if e["type"] == "job.log"]
    assert "rate limited" in logs[0] and "Overloaded" in logs[1]


async def test_an_invalid_request_is_not_retried(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    claude.script("claude-bad", Status(400, message="max_tokens: too large"))
    async with claude_gateway(database_url, upstream, claude) as live:
        done = await run(live, chat("claude-bad"), "failed")
    assert done["attempts"] == 1
    assert done["error"]["upstream_status"] == 400
    assert done["error"]["message"] == "max_tokens: too large"


async def test_a_dropped_stream_an_error_event_and_a_hang_are_retried(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    claude.script(
        "claude-faulty",
        Drop(after_chunks=2),
        ErrorChunk(after_chunks=1, message="Overloaded mid-stream"),
        Hang(),
        Reply(text="whole at last", chunks=5),
    )
    async with claude_gateway(database_url, upstream, claude, idle_timeout_seconds=0.5) as live:
        done = await run(live, chat("claude-faulty"))
        events = (await live.client.get(f"/v1/jobs/{done['id']}/events")).json()["data"]
    assert done["attempts"] == 4
    assert done["output"]["choices"][0]["message"]["content"] == "whole at last"
    logs = [e["data"]["message"] for e in events if e["type"] == "job.log"]
    assert "broke off" in logs[0] or "ended before" in logs[0]
    assert "Overloaded mid-stream" in logs[1]
    assert "sent nothing" in logs[2]
    last = [e for e in events if e["type"] == "job.output.delta" and e["data"]["attempt"] == 4]
    assert "".join(e["data"]["text"] for e in last) == "whole at last"


async def test_the_openai_facade_streams_claude(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    claude.script("claude-facade", Reply(text="streamed from claude", chunks=4))
    async with claude_gateway(database_url, upstream, claude) as live:
        body = {
            "model": "claude-facade",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        async with live.client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "streamed from claude"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_the_anthropic_sdk_reads_the_scripted_server(claude: ScriptedAnthropic) -> None:
    """The scripted server speaks Anthropic's format as the official SDK parses it (what the
    tests above rely on)."""
    anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is not installed")
    claude.script("claude-sdk", ToolUse("f", {"a": 1}, text="hi"))
    client = anthropic.AsyncAnthropic(api_key="k", base_url=claude.base_url.removesuffix("/v1"))
    async with client:
        messages = [{"role": "user", "content": "x"}]
        async with client.messages.stream(
            model="claude-sdk", max_tokens=10, messages=messages
        ) as stream:
            message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"a": 1}
