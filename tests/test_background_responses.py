"""Background responses upstream (``upstream_mode = "background"``): a chat job runs as one
OpenAI background response against a scripted Responses API, on both databases: the answer in
the shape a direct call gives, one create, a gateway stopped mid-way and a process SIGKILLed
mid-way resume the same response by its recorded id, cancel forwarded, the inbound
``response.completed`` webhook that ends the wait for the next poll."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hookline.config import Settings, UpstreamConfig
from hookline.upstreams.background import chat_completion, responses_request
from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.processes import GatewayProcess, hookline
from tests.scripted_background import Behaviour, ScriptedResponses
from tests.scripted_provider_batches import new_secret
from tests.scripted_upstream import Threaded

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "hi there"}], "max_tokens": 8},
}  # fmt: skip


@pytest.fixture
async def provider() -> AsyncIterator[ScriptedResponses]:
    server = ScriptedResponses()
    await server.start()
    yield server
    await server.stop()


def _settings(database_url: str, provider: ScriptedResponses, **upstream: Any) -> Settings:
    changes = {"upstream_mode": "background", "background_poll_seconds": 0.05,
               "background_poll_max_seconds": 0.2, **upstream}  # fmt: skip
    return gateway_settings(database_url, provider.base_url, upstream=changes)


async def _recorded(live: LiveGateway, job_id: str, timeout: float = 15) -> str:
    """The background response id recorded in the job's events, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = (await live.client.get(f"/v1/jobs/{job_id}/events")).json()["data"]
        for event in events:
            if event["type"] == "job.progress" and "upstream_response" in event["data"]:
                return str(event["data"]["upstream_response"]["id"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id}: no background response recorded")


async def test_a_chat_job_runs_as_one_background_response(
    database_url: str, provider: ScriptedResponses
) -> None:
    async with serve(_settings(database_url, provider)) as live:
        job = (await live.client.post("/v1/jobs", json=CHAT)).json()
        done = await wait_for_status(live.client, job["id"], {"succeeded"})
        response_id = await _recorded(live, job["id"])
    assert provider.creates == 1
    assert provider.retrieves >= 1
    assert not provider.seen("m")  # no direct call
    sent = provider.responses[response_id].request
    assert sent["background"] is True
    assert sent["metadata"] == {"hookline_job_id": job["id"]}
    assert sent["input"] == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi there"}]  # fmt: skip
    assert sent["max_output_tokens"] == 8
    output = done["output"]
    assert output["object"] == "chat.completion"
    assert output["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "echo: hi there",
                                              "refusal": None}}]  # fmt: skip
    assert output["usage"]["prompt_tokens"] == 5
    assert output["usage"]["completion_tokens"] == 1


async def test_a_streamed_facade_call_gets_the_answer_in_one_piece(
    database_url: str, provider: ScriptedResponses
) -> None:
    """``stream: true`` through the facade on a background upstream: the answer arrives whole,
    as one content chunk, then the finish."""
    async with serve(_settings(database_url, provider)) as live:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi there"}]}
        async with live.client.stream("POST", "/v1/chat/completions", json=body) as answer:
            assert answer.status_code == 200
            lines = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: hi there"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert provider.creates == 1


async def test_a_failed_response_fails_the_job_without_a_retry(
    database_url: str, provider: ScriptedResponses
) -> None:
    async with serve(_settings(database_url, provider)) as live:
        job = (await live.client.post("/v1/jobs", json={**CHAT, "model": "bad"})).json()
        done = await wait_for_status(live.client, job["id"], {"failed"})
    assert done["error"]["message"] == "scripted failure"
    assert provider.creates == 1  # invalid_prompt: not worth another response


async def test_a_gateway_stopped_midway_resumes_the_same_response(
    database_url: str, provider: ScriptedResponses
) -> None:
    provider.behaviour.duration = 2.0
    settings = _settings(database_url, provider)
    async with serve(settings) as live:
        job = (await live.client.post("/v1/jobs", json=CHAT)).json()
        response_id = await _recorded(live, job["id"])
    # The first gateway stopped while the response ran (its job was put back in the queue).
    assert provider.creates == 1
    assert not provider.cancels
    async with serve(settings) as live:
        done = await wait_for_status(live.client, job["id"], {"succeeded"})
    assert provider.creates == 1  # followed by its id, not created again
    assert done["output"]["id"] == response_id
    assert done["output"]["choices"][0]["message"]["content"] == "echo: hi there"


async def test_cancel_is_forwarded_to_the_provider(
    database_url: str, provider: ScriptedResponses
) -> None:
    provider.behaviour.duration = 30.0
    async with serve(_settings(database_url, provider)) as live:
        job = (await live.client.post("/v1/jobs", json=CHAT)).json()
        response_id = await _recorded(live, job["id"])
        cancelled = await live.client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        await asyncio.wait_for(provider.cancel_seen.wait(), 10)
    assert provider.cancels == [response_id]
    assert provider.responses[response_id].cancelled


async def test_the_inbound_webhook_ends_the_wait_for_the_next_poll(
    database_url: str, provider: ScriptedResponses
) -> None:
    secret = new_secret()
    # Polls 30 s apart: only the webhook can end the job within the test's wait.
    settings = _settings(database_url, provider, background_poll_seconds=30.0,
                         background_poll_max_seconds=30.0, webhook_secret=secret)  # fmt: skip
    async with serve(settings) as live:
        provider.behaviour.webhook_url = f"{live.base_url}/v1/inbound/scripted"
        provider.behaviour.webhook_secret = secret
        job = (await live.client.post("/v1/jobs", json=CHAT)).json()
        done = await wait_for_status(live.client, job["id"], {"succeeded"}, timeout=10)
    assert done["output"]["choices"][0]["message"]["content"] == "echo: hi there"
    assert provider.webhooks_sent == [200]
    assert provider.creates == 1


def test_background_mode_needs_an_openai_upstream() -> None:
    with pytest.raises(ValueError, match="needs type 'openai'"):
        UpstreamConfig(name="c", type="anthropic", upstream_mode="background")


def test_translation_of_tools_and_answers() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}},
        "stream": True,
    }  # fmt: skip
    request = responses_request(body)
    assert request["input"] == [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    assert request["tools"] == [{"type": "function", "name": "weather", "parameters": {}}]
    assert request["tool_choice"] == {"type": "function", "name": "weather"}
    assert request["text"] == {"format": {"type": "json_schema", "name": "w", "schema": {}}}
    assert "stream" not in request
    with pytest.raises(Exception, match="seed"):
        responses_request({**body, "seed": 1})
    answer = chat_completion({"id": "resp_1", "status": "incomplete", "created_at": 1,
                              "incomplete_details": {"reason": "max_output_tokens"},
                              "output": [{"type": "function_call", "call_id": "c",
                                          "name": "f", "arguments": "{}"}]})  # fmt: skip
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


# --- SIGKILL of the process following the response (real processes: tests/processes.py)


def _config(path: Path, provider: ScriptedResponses) -> dict[str, str]:
    path.write_text(
        f"""
local_model = false

[worker]
poll_seconds = 0.2
lease_seconds = 2
heartbeat_seconds = 0.5
maintenance_seconds = 0.2

[[upstreams]]
name = "scripted"
type = "openai"
base_url = "{provider.base_url}"
models = ["*"]
upstream_mode = "background"
background_poll_seconds = 0.1
background_poll_max_seconds = 0.3
"""
    )
    return {"HOOKLINE_CONFIG": str(path)}


def test_a_process_killed_midway_resumes_the_response_by_id(
    tmp_path: Path, database_url: str
) -> None:
    with Threaded(ScriptedResponses(Behaviour(duration=4.0))) as provider:
        env = {**_config(tmp_path / "hookline.toml", provider),
               "HOOKLINE_DATABASE_URL": database_url}  # fmt: skip
        created = hookline("keys", "create", "--tenant", "acme", env=env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        first = GatewayProcess("serve", env, tmp_path).start()
        second: GatewayProcess | None = None
        try:
            job = httpx.post(f"{first.url}/v1/jobs", json=CHAT, headers=headers).json()
            assert provider.created.wait(30)
            deadline = time.monotonic() + 30
            while True:  # killed once the id is on disk
                events = httpx.get(f"{first.url}/v1/jobs/{job['id']}/events",
                                   headers=headers).json()["data"]  # fmt: skip
                if any(e["type"] == "job.progress" for e in events):
                    break
                assert time.monotonic() < deadline, events
                time.sleep(0.05)
            first.kill()
            second = GatewayProcess("serve", env, tmp_path).start()
            deadline = time.monotonic() + 60
            while True:
                got = httpx.get(f"{second.url}/v1/jobs/{job['id']}", headers=headers,
                                params={"wait": 1}, timeout=30).json()  # fmt: skip
                if got["status"] in ("succeeded", "failed", "cancelled", "expired"):
                    break
                assert time.monotonic() < deadline, got
        finally:
            first.stop()
            if second is not None:
                second.stop()
    assert got["status"] == "succeeded", got
    assert got["output"]["choices"][0]["message"]["content"] == "echo: hi there"
    assert provider.creates == 1
    assert not provider.cancels
    attempts = [a["outcome"] for a in got["attempt_log"]]
    assert attempts == ["retried", "succeeded"]  # the lost worker's attempt, then the resume


def test_what_background_mode_cannot_send_is_refused_before_any_call() -> None:
    from hookline.upstreams.base import UpstreamError

    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert responses_request({**chat, "n": None})["input"]  # the default, written out
    for refused in ({"n": 2}, {"store": False}, {"seed": 7}):
        with pytest.raises(UpstreamError) as raised:
            responses_request({**chat, **refused})
        assert raised.value.type == "unsupported_in_background" and not raised.value.retryable
