"""Every facade answer in its API's exact shape, whatever the upstream, tried as a new user would:
the OpenAI answers validated against OpenAI's published OpenAPI schemas (tests/openai_schemas.json,
written by scripts/openai_schemas.py), the Anthropic ones against the official SDK's types with
nothing left over."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pydantic
import pytest

from tests.conftest import LiveGateway, serve
from tests.scripted_anthropic import ScriptedAnthropic
from tests.scripted_upstream import ScriptedUpstream, Status
from tests.test_anthropic_upstream import with_claude

anthropic_types = pytest.importorskip("anthropic.types")

SCHEMAS = Path(__file__).with_name("openai_schemas.json")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@functools.cache
def _validator(name: str) -> Any:
    document = json.loads(SCHEMAS.read_text())
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", **document})


def assert_openai(name: str, body: Any) -> None:
    """``body`` is a valid ``name`` of OpenAI's spec."""
    errors = [f"{e.instance_path}: {e.message}" for e in _validator(name).iter_errors(body)]
    assert not errors, f"not a {name}: {errors}\n{json.dumps(body)[:2000]}"


def assert_anthropic(kind: Any, body: Any) -> None:
    """``body`` is a valid ``kind`` of the anthropic SDK's types, with no field it lacks."""
    value = pydantic.TypeAdapter(kind).validate_python(body)

    def extra(model: Any, data: Any, where: str) -> list[str]:
        if not isinstance(model, pydantic.BaseModel) or not isinstance(data, dict):
            return []
        found = [f"{where}.{k}" for k in data if k not in type(model).model_fields]
        for key in type(model).model_fields:
            item, raw = getattr(model, key, None), data.get(key)
            if isinstance(item, list) and isinstance(raw, list):
                for i, (a, b) in enumerate(zip(item, raw, strict=False)):
                    found += extra(a, b, f"{where}.{key}[{i}]")
            else:
                found += extra(item, raw, f"{where}.{key}")
        return found

    assert extra(value, body, "") == [], body


def sse_data(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: {")]  # fmt: skip


async def test_openai_answers_match_openais_schemas(live: LiveGateway) -> None:
    client = live.client
    chat = await client.post("/v1/chat/completions", json={"model": "gpt-x", **CHAT})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["refusal"] is None
    assert_openai("CreateChatCompletionResponse", chat.json())
    streamed = await client.post(
        "/v1/chat/completions", json={"model": "gpt-x", "stream": True, **CHAT}
    )
    chunks = sse_data(streamed.text)
    assert chunks
    for chunk in chunks:
        assert_openai("CreateChatCompletionStreamResponse", chunk)
    completion = await client.post("/v1/completions", json={"model": "m", "prompt": "say hi"})
    assert_openai("CreateCompletionResponse", completion.json())
    embedding = await client.post("/v1/embeddings", json={"model": "e", "input": ["a", "b"]})
    assert_openai("CreateEmbeddingResponse", embedding.json())
    models = await client.get("/v1/models")
    assert_openai("ListModelsResponse", models.json())
    for response_format in ("b64_json", "url"):
        image = await client.post(
            "/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "a cat", "response_format": response_format},
        )
        assert image.status_code == 200, image.text
        assert_openai("ImagesResponse", image.json())
    response = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
    assert response.status_code == 200, response.text
    assert_openai("Response", response.json())
    refused = await client.post("/v1/chat/completions", json={"model": "gpt-x"})
    assert refused.status_code == 422
    assert_openai("ErrorResponse", refused.json())


async def test_an_upstream_error_is_an_openai_error(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("gpt-refused", Status(400, message="context too long"))
    refused = await live.client.post("/v1/chat/completions", json={"model": "gpt-refused", **CHAT})
    assert refused.status_code == 400
    assert_openai("ErrorResponse", refused.json())


async def test_a_chat_completion_from_claude_is_openais_shape_too(
    database_url: str, upstream: ScriptedUpstream, claude: ScriptedAnthropic
) -> None:
    async with serve(with_claude(database_url, upstream, claude)) as live:
        chat = await live.client.post(
            "/v1/chat/completions", json={"model": "claude-haiku-4-5", **CHAT}
        )
        assert chat.status_code == 200, chat.text
        assert_openai("CreateChatCompletionResponse", chat.json())
        streamed = await live.client.post(
            "/v1/chat/completions", json={"model": "claude-haiku-4-5", "stream": True, **CHAT}
        )
        for chunk in sse_data(streamed.text):
            assert_openai("CreateChatCompletionStreamResponse", chunk)
        job = await live.client.post(
            "/v1/jobs",
            json={"operation": "chat.completions", "model": "claude-haiku-4-5", "input": CHAT},
            headers={"Prefer": "wait=10"},
        )
        assert job.json()["status"] == "succeeded", job.text
        assert_openai("CreateChatCompletionResponse", job.json()["output"])


async def test_anthropic_answers_match_the_sdks_types(live: LiveGateway) -> None:
    body = {"model": "gpt-x", "max_tokens": 64, **CHAT}
    message = await live.client.post("/v1/messages", json=body)
    assert message.status_code == 200, message.text
    assert_anthropic(anthropic_types.Message, message.json())
    streamed = await live.client.post("/v1/messages", json={**body, "stream": True})
    events = sse_data(streamed.text)
    assert events[0]["type"] == "message_start"
    assert events[-1]["type"] == "message_stop"
    for event in events:
        assert_anthropic(anthropic_types.RawMessageStreamEvent, event)
    invalid = await live.client.post("/v1/messages", json={**body, "max_tokens": 0})
    assert invalid.status_code == 400
    # Anthropic's error, with the problem's fields beside it (RFC 9457 lets a problem carry more).
    error = invalid.json()
    assert_anthropic(
        anthropic_types.ErrorResponse, {"type": error["type"], "error": error["error"]}
    )
