"""A scripted Anthropic Messages API server on loopback (``POST /v1/messages``), the twin of
:mod:`tests.scripted_upstream`: the same steps, one consumed per request (the last one repeats),
answered in Anthropic's format: a reply (streamed as Anthropic streams it, or whole; a slow first
token, slow tokens), a tool call, an error status with ``retry-after`` (429, 529 overloaded, 500),
a stream dropped midway, an ``error`` event mid-stream, a hang. With no script a model echoes the
last user message's text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import defaultdict
from typing import Any

from aiohttp import web

from tests.scripted_upstream import Drop, ErrorChunk, Hang, Reply, Seen, Status, split_text

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclasses.dataclass
class ToolUse:
    """An answer that calls a tool (after ``text``, when given), its input streamed in pieces."""

    name: str
    input: dict[str, Any]
    text: str | None = None
    id: str = "toolu_01scripted"


Step = Reply | Status | Drop | Hang | ErrorChunk | ToolUse


@dataclasses.dataclass
class Headers:
    api_key: str | None
    version: str | None


class ScriptedAnthropic:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Step]] = {}
        self.requests: list[Seen] = []
        self.headers: list[Headers] = []
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    def script(self, model: str, *steps: Step) -> None:
        self.scripts[model] = list(steps)

    def seen(self, model: str) -> list[Seen]:
        return [r for r in self.requests if r.model == model]

    def _next_step(self, model: str) -> Step:
        steps = self.scripts.get(model)
        if not steps:
            return Reply()
        return steps.pop(0) if len(steps) > 1 else steps[0]

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model", "")
        seen = Seen(model, body, time.monotonic())
        self.requests.append(seen)
        self.headers.append(
            Headers(request.headers.get("x-api-key"), request.headers.get("anthropic-version"))
        )
        self.counts[model] += 1
        try:
            return await self._answer(request, body, self._next_step(model))
        except (asyncio.CancelledError, ConnectionResetError):
            seen.aborted = True
            raise

    async def _answer(
        self, request: web.Request, body: dict[str, Any], step: Step
    ) -> web.StreamResponse:
        if isinstance(step, Hang):
            await asyncio.sleep(step.seconds)
            step = Reply()
        if isinstance(step, Status):
            headers = {"retry-after": step.retry_after} if step.retry_after else {}
            error = {"type": _ERROR_TYPES.get(step.status, "api_error"), "message": step.message}
            return web.json_response(
                {"type": "error", "error": error}, status=step.status, headers=headers
            )
        tool = step if isinstance(step, ToolUse) else None
        text = step.text if isinstance(step, Reply | ToolUse) else None
        if text is None and tool is None:
            text = _echo(body)
        stop_reason = "tool_use" if tool else "end_turn"
        if not body.get("stream"):
            if isinstance(step, Reply) and step.first_token_delay:
                await asyncio.sleep(step.first_token_delay)
            content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            if tool:
                content.append(
                    {"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool.input}
                )
            return web.json_response(_message(body, content, stop_reason, output_tokens=3))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event("message_start", {"message": _message(body, [], None, 1)}))
        await response.write(_event("ping", {}))
        pieces = split_text(text, step.chunks if isinstance(step, Reply) else 4) if text else []
        index = 0
        if pieces:
            block: dict[str, Any] = {"type": "text", "text": ""}
            await response.write(
                _event("content_block_start", {"index": 0, "content_block": block})
            )
            for i, piece in enumerate(pieces):
                if isinstance(step, Drop) and i == step.after_chunks:
                    assert request.transport is not None
                    request.transport.close()  # the connection breaks mid-stream
                    return response
                if isinstance(step, ErrorChunk) and i == step.after_chunks:
                    error = {"type": "overloaded_error", "message": step.message}
                    await response.write(_event("error", {"error": error}))
                    return response
                if isinstance(step, Reply):
                    await asyncio.sleep(step.first_token_delay if i == 0 else step.token_delay)
                delta: dict[str, Any] = {"type": "text_delta", "text": piece}
                await response.write(_event("content_block_delta", {"index": 0, "delta": delta}))
            await response.write(_event("content_block_stop", {"index": 0}))
            index = 1
        if tool:
            block = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
            start = {"index": index, "content_block": block}
            await response.write(_event("content_block_start", start))
            arguments = json.dumps(tool.input)
            for piece in split_text(arguments, 3):
                delta = {"type": "input_json_delta", "partial_json": piece}
                await response.write(
                    _event("content_block_delta", {"index": index, "delta": delta})
                )
            await response.write(_event("content_block_stop", {"index": index}))
        end = {"stop_reason": stop_reason, "stop_sequence": None}
        usage = {"output_tokens": max(1, len(pieces))}
        await response.write(_event("message_delta", {"delta": end, "usage": usage}))
        await response.write(_event("message_stop", {}))
        return response


def _echo(body: dict[str, Any]) -> str:
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content", "")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if b.get("type") == "text")
    return f"echo: {content}"


def _message(
    body: dict[str, Any], content: list[dict[str, Any]], stop_reason: str | None, output_tokens: int
) -> dict[str, Any]:
    return {
        "id": "msg_01scripted",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 7,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2,
        },
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
