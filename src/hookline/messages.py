"""Anthropic's Messages format beside OpenAI's chat format: what each one's terms are in the other.

A job is a ``chat.completions`` job in OpenAI's format whatever its door and its upstream. The
Anthropic upstream (:mod:`hookline.upstreams.anthropic`) translates a chat request into a
Messages request and the answer back; the Anthropic front door (``POST /v1/messages``,
:mod:`hookline.api.anthropic_compat`) translates the other way round, a Messages request into a
chat job and the job into a Message. The terms both directions share are here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from hookline.errors import InvalidRequest
from hookline.jobs import Job, JobStatus

# Anthropic's stop_reason -> OpenAI's finish_reason.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI's finish_reason -> Anthropic's stop_reason.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's usage in OpenAI's terms: the prompt counts the cached tokens too."""
    cached = _count(usage.get("cache_read_input_tokens"))
    prompt = _count(usage.get("input_tokens")) + _count(usage.get("cache_creation_input_tokens"))
    prompt += cached
    completion = _count(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def anthropic_usage(usage: Any) -> dict[str, Any]:
    """OpenAI's usage in Anthropic's terms (zeros when the upstream reported none)."""
    usage = usage if isinstance(usage, dict) else {}
    cached = _count((usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
    return {
        "input_tokens": max(0, _count(usage.get("prompt_tokens")) - cached),
        "output_tokens": _count(usage.get("completion_tokens")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


# --- the front door: a Messages request as a chat job, the job as a Message

VIA = "anthropic"  # job.metadata["via"] of a job that came through POST /v1/messages
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class MessagesRequestError(InvalidRequest):
    """A Messages request hookline cannot run (answered 400 ``invalid_request_error``)."""


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def message_id(job_id: str) -> str:
    return "msg_" + job_id.removeprefix("job_")


def chat_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The chat request (the job's input, without ``model``) for a Messages request already
    checked against its schema: the system prompt as the first message, ``tool_use`` blocks as
    tool calls and ``tool_result`` blocks as tool messages, images as ``image_url`` parts."""
    messages: list[dict[str, Any]] = []
    system = request.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for number, message in enumerate(request["messages"]):
        role, content = message["role"], message["content"]
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif role == "assistant":
            messages.append(_assistant(content))
        else:
            messages += _user(content, f"messages[{number}]")
    chat: dict[str, Any] = {"messages": messages, "max_tokens": request["max_tokens"]}
    if request.get("stop_sequences"):
        chat["stop"] = list(request["stop_sequences"])
    for key in ("temperature", "top_p", "top_k"):
        if request.get(key) is not None:
            chat[key] = request[key]
    tools = request.get("tools")
    if tools:
        chat["tools"] = [_function(tool) for tool in tools]
    choice = request.get("tool_choice")
    if choice:
        kind = choice.get("type")
        chat["tool_choice"] = {
            "auto": "auto",
            "any": "required",
            "none": "none",
            "tool": {"type": "function", "function": {"name": choice.get("name")}},
        }.get(kind, "auto")
        if choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    user = (request.get("metadata") or {}).get("user_id")
    if isinstance(user, str):
        chat["user"] = user
    return chat


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text") or "" for b in content if b.get("type") == "text")


def _assistant(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    calls = [
        {
            "id": block.get("id"),
            "type": "function",
            "function": {
                "name": block.get("name"),
                "arguments": orjson.dumps(block.get("input") or {}).decode(),
            },
        }
        for block in blocks
        if block.get("type") == "tool_use"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": _text(blocks) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """A user turn: its tool results first (each a tool message, as OpenAI wants them right
    after the assistant's calls), then the rest as one user message."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block)}})
        elif kind == "tool_result":
            content = block.get("content")
            text = _text(content) if content is not None else ""
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": text})  # fmt: skip
        else:
            raise MessagesRequestError(
                f"{where}.content[{index}]: a {kind} block is not supported by hookline"
            )
    if not parts:
        return results
    if len(parts) == 1 and parts[0]["type"] == "text":  # what every upstream takes
        return [*results, {"role": "user", "content": parts[0]["text"]}]
    return [*results, {"role": "user", "content": parts}]


def _image_url(block: Mapping[str, Any]) -> str:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if source.get("type") == "url":
        return str(source.get("url"))
    raise MessagesRequestError("an image block needs a base64 or url source")


def _function(tool: Mapping[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {
        "name": tool["name"],
        "parameters": tool.get("input_schema") or {"type": "object"},
    }
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _choice(job: Job) -> dict[str, Any]:
    choices = (job.output or {}).get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return first if isinstance(first, dict) else {}


def content_blocks(job: Job) -> list[dict[str, Any]]:
    """The answer's content: its text, then a ``tool_use`` block per tool call."""
    message = _choice(job).get("message") or {}
    blocks: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {"arguments": function.get("arguments")}  # (the model wrote no JSON)
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                       "input": arguments if isinstance(arguments, dict) else {"value": arguments}})  # fmt: skip
    return blocks


def stop_reason(job: Job) -> str:
    return STOP_REASONS.get(_choice(job).get("finish_reason") or "", "end_turn")


def message_json(job: Job) -> dict[str, Any]:
    """Anthropic's Message for a job that succeeded."""
    return {
        "id": message_id(job.id),
        "type": "message",
        "role": "assistant",
        "model": job.model,
        "content": content_blocks(job),
        "stop_reason": stop_reason(job),
        "stop_sequence": None,
        "usage": anthropic_usage((job.output or {}).get("usage")),
    }


def failure(job: Job) -> tuple[int, str, str]:
    """The HTTP status, Anthropic error type and message of a job that did not succeed."""
    if job.status is JobStatus.CANCELLED:
        return 409, "invalid_request_error", f"job {job.id} was cancelled"
    if job.status is JobStatus.EXPIRED:
        return 504, "api_error", f"job {job.id} expired before it started"
    error = job.error or {}
    given = error.get("upstream_status")
    status = given if isinstance(given, int) and 400 <= given < 500 else 502
    kind = "overloaded_error" if given == 529 else error_type(status)  # (529 is not HTTP's)
    return status, kind, str(error.get("message") or "the job failed")


class MessageEvents:
    """A Message's streaming events (``message_start``, ``content_block_*``, ``message_delta``,
    ``message_stop``) built from what the job's stream brings. The text streams as it comes;
    tool calls, which the live output does not carry, come as whole blocks at the end. A retry
    after text went out ends the stream with an ``error`` event: Anthropic's format cannot take
    text back."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.attempt: int | None = None
        self.open_text = False  # the text block was started
        self.ended = False

    def opening(self) -> list[tuple[str, dict[str, Any]]]:
        message: dict[str, Any] = {
            "id": message_id(self.job.id), "type": "message", "role": "assistant",
            "model": self.job.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }  # fmt: skip
        return [("message_start", {"type": "message_start", "message": message})]

    def delta(self, attempt: int, index: int, text: str) -> list[tuple[str, dict[str, Any]]]:
        if index != 0 or self.ended or not text:
            return []
        if self.attempt is not None and attempt != self.attempt:
            return self.error(
                "api_error",
                f"the upstream broke off and job {self.job.id} started over; its answer is at "
                f"/v1/jobs/{self.job.id}",
            )
        self.attempt = attempt
        out = []
        if not self.open_text:
            self.open_text = True
            block = {"type": "text", "text": ""}
            out.append(("content_block_start",
                        {"type": "content_block_start", "index": 0, "content_block": block}))  # fmt: skip
        delta = {"type": "text_delta", "text": text}
        out.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": delta}))  # fmt: skip
        return out

    def finished(self, job: Job) -> list[tuple[str, dict[str, Any]]]:
        self.job = job
        if job.status is not JobStatus.SUCCEEDED:
            _, kind, message = failure(job)
            return self.error(kind, message)
        out: list[tuple[str, dict[str, Any]]] = []
        blocks = content_blocks(job)
        for block in blocks:
            if block["type"] == "text" and not self.open_text:  # not streamed: all of it now
                out += self.delta(self.attempt or job.attempts, 0, block["text"])
        if self.open_text:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        index = 1 if self.open_text else 0
        for block in blocks:
            if block["type"] != "tool_use":
                continue
            start = {**block, "input": {}}
            partial = {
                "type": "input_json_delta",
                "partial_json": orjson.dumps(block["input"]).decode(),
            }
            out += [
                ("content_block_start",
                 {"type": "content_block_start", "index": index, "content_block": start}),
                ("content_block_delta",
                 {"type": "content_block_delta", "index": index, "delta": partial}),
                ("content_block_stop", {"type": "content_block_stop", "index": index}),
            ]  # fmt: skip
            index += 1
        usage = anthropic_usage((job.output or {}).get("usage"))
        out.append(("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(job), "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        }))  # fmt: skip
        out.append(("message_stop", {"type": "message_stop"}))
        self.ended = True
        return out

    def error(self, kind: str, message: str) -> list[tuple[str, dict[str, Any]]]:
        self.ended = True
        return [("error", {"type": "error", "error": {"type": kind, "message": message}})]
