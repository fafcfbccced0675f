"""Anthropic's Messages API as an upstream (``type = "anthropic"``).

A job stays a ``chat.completions`` job in OpenAI's format: each attempt translates the chat
request into a Messages request (system messages into ``system``, tool calls into ``tool_use``
blocks and tool answers into ``tool_result`` blocks, ``max_tokens`` filled in, since Anthropic
requires one), streams the answer, and translates the events back into the ``chat.completion``
that every delivery path knows (text, tool calls, the stop reason as a ``finish_reason``, usage
in OpenAI's terms). The HTTP side (aiohttp, timeouts, the output limit, what counts as a broken
stream) is :class:`~hookline.upstreams.openai.OpenAIUpstream`'s; Anthropic's ``529
overloaded`` and ``429`` with ``retry-after`` are retried like any 5xx and 429.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from hookline.jobs import Operation
from hookline.messages import FINISH_REASONS, openai_usage
from hookline.upstreams.base import DeltaSink, UpstreamError, bad_response
from hookline.upstreams.openai import Assembler, OpenAIUpstream
from hookline.upstreams.registry import register

# What a chat request may carry that the Messages API takes as it is.
_NATIVE_KEYS = ("top_k", "thinking", "metadata", "service_tier")


@register("anthropic")
class AnthropicUpstream(OpenAIUpstream):
    def _auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.config.anthropic_version}
        if api_key := self.config.resolved_api_key():
            headers["x-api-key"] = api_key
        return headers

    def _prepare(self, operation: Operation, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if operation.passthrough:  # (e.g. messages.count_tokens)
            return super()._prepare(operation, body)
        if operation is not Operation.CHAT_COMPLETIONS:
            raise UpstreamError(
                "unsupported_operation",
                f"upstream {self.name!r} (anthropic) runs chat.completions only, "
                f"not {operation.value}",
            )
        request = messages_request(body, self.config.default_max_tokens)
        if self._streams(operation):
            request["stream"] = True
        return "/messages", request

    def _assembler(self, operation: Operation, on_delta: DeltaSink) -> Assembler:
        return MessageStreamAssembler(on_delta)

    def _output(self, operation: Operation, answer: dict[str, Any]) -> dict[str, Any]:
        if operation.passthrough:
            return answer
        try:
            return chat_completion(answer)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise bad_response(f"it is not a Messages answer: {exc!r}"[:300]) from exc


# --- the request: OpenAI chat -> Anthropic Messages


def _invalid(message: str) -> UpstreamError:
    """A request the Messages API cannot express: the caller's to fix, not retried."""
    return UpstreamError("invalid_request", message, status=400)


def messages_request(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """The Messages request for an OpenAI chat request (``body`` with its ``model``)."""
    if (body.get("n") or 1) != 1:
        raise _invalid("Anthropic answers with one choice: n must be 1")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for number, message in enumerate(body.get("messages") or ()):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{number}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content))
        elif role == "user":
            _add(messages, "user", _blocks(content))
        elif role == "assistant":
            blocks = _blocks(content)
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "input": _arguments(function.get("arguments")),
                    }
                )
            _add(messages, "assistant", blocks)
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": _text_of(content),
            }
            _add(messages, "user", [result])
        else:
            raise _invalid(f"messages[{number}]: role {role!r} has no Messages equivalent")
    request: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens")
        or body.get("max_tokens")
        or default_max_tokens,
    }
    if system:
        request["system"] = "\n\n".join(s for s in system if s)
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if isinstance(temperature, int | float):  # OpenAI's range is 0-2, Anthropic's 0-1
        request["temperature"] = min(float(temperature), 1.0)
    if body.get("top_p") is not None:
        request["top_p"] = body["top_p"]
    tools = body.get("tools")
    if tools:
        request["tools"] = [_tool(tool) for tool in tools]
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False:
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            request["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        request["metadata"] = {"user_id": body["user"]}
    for key in _NATIVE_KEYS:
        if body.get(key) is not None:
            request[key] = body[key]
    return request


def _add(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Append a message, merged into the one before it when that has the same role (tool
    answers following each other are one user turn for Anthropic)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and part.get("text"):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url")))
        elif kind == "refusal" and part.get("refusal"):
            blocks.append({"type": "text", "text": part["refusal"]})
    return blocks


def _image(image: Any) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _invalid("an image_url part needs a url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";")[0] or "image/png"
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"a tool call's arguments are not JSON: {exc}") from exc


def _tool(tool: Any) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise _invalid("only function tools can be sent to Anthropic")
    result: dict[str, Any] = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        result["description"] = function["description"]
    return result


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name")}
    raise _invalid(f"tool_choice {choice!r} has no Messages equivalent")


# --- the answer: Anthropic Messages -> OpenAI chat


def chat_completion(message: dict[str, Any]) -> dict[str, Any]:
    """The ``chat.completion`` for a Messages answer: its text, tool calls, finish reason and
    usage (thinking blocks are left out: chat completions have no place for them)."""
    text: list[str] = []
    tool_calls = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text") or "")
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    content = "".join(text)
    reply: dict[str, Any] = {"role": "assistant", "content": content or None, "refusal": None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    stop_reason = message.get("stop_reason")
    result: dict[str, Any] = {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(stop_reason or "", "stop"),
            }
        ],
    }
    usage = message.get("usage")
    if isinstance(usage, dict):
        result["usage"] = openai_usage(usage)
    return result


class MessageStreamAssembler:
    """Builds the Messages answer from its streamed events (``message_start``,
    ``content_block_*``, ``message_delta``, ``message_stop``); the text of the events fed
    together goes to ``on_delta`` as one piece."""

    def __init__(self, on_delta: DeltaSink) -> None:
        self.on_delta = on_delta
        self.message: dict[str, Any] = {}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] = {}
        self.finished = False

    def feed(self, *events: Any) -> None:
        texts: list[str] = []
        try:
            for event in events:
                self._take(event, texts)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise bad_response(
                f"it sent an event that is not a Messages event: {exc!r}"[:300]
            ) from exc
        if texts:
            self.on_delta(0, "".join(texts))

    def _take(self, event: dict[str, Any], texts: list[str]) -> None:
        kind = event["type"]
        if kind == "content_block_delta":
            delta = event["delta"]
            block = self.blocks[int(event["index"])]
            if delta["type"] == "text_delta":
                block["text"].append(delta["text"])
                texts.append(delta["text"])
            elif delta["type"] == "input_json_delta":
                block["json"].append(delta["partial_json"])
        elif kind == "content_block_start":
            start = event["content_block"]
            block = {**start, "text": [], "json": []}
            if start.get("type") == "text" and start.get("text"):
                block["text"].append(start["text"])
                texts.append(start["text"])
            self.blocks[int(event["index"])] = block
        elif kind == "message_start":
            self.message = event["message"]
            self.usage.update(self.message.get("usage") or {})
        elif kind == "message_delta":
            self.message.update(event.get("delta") or {})
            self.usage.update(
                {k: v for k, v in (event.get("usage") or {}).items() if v is not None}
            )
        elif kind == "message_stop":
            self.finished = True

    def result(self) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        for index in sorted(self.blocks):
            block = self.blocks[index]
            if block.get("type") == "text":
                content.append({"type": "text", "text": "".join(block["text"])})
            elif block.get("type") == "tool_use":
                given = "".join(block["json"])
                try:
                    tool_input = orjson.loads(given) if given else block.get("input") or {}
                except orjson.JSONDecodeError as exc:
                    raise bad_response(f"a tool call's streamed input is not JSON: {exc}") from exc
                content.append(
                    {"type": "tool_use", "id": block.get("id"), "name": block.get("name"),
                     "input": tool_input}
                )  # fmt: skip
        return chat_completion({**self.message, "content": content, "usage": self.usage})
