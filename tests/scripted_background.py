"""A scripted OpenAI Responses API in background mode on loopback, as OpenAI documents it:

``POST /v1/responses`` with ``background: true`` answers at once with the response ``queued``;
``GET /v1/responses/{id}`` shows it ``queued``, then ``in_progress``, then (after ``duration``
seconds) ``completed`` with its output message and usage, or ``failed`` for a model in
``fail_models``; ``POST /v1/responses/{id}/cancel`` makes it ``cancelled``. Answers carry
``openai-poll-after-ms``. The answer echoes the last input message, as the scripted single-call
server (whose routes this server also serves) does. With ``webhook_url`` and a ``whsec_``
secret, an ended response is announced by a signed ``response.completed`` (…) webhook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web

from tests.scripted_provider_batches import sign
from tests.scripted_upstream import ScriptedUpstream


@dataclasses.dataclass
class Behaviour:
    duration: float = 0.3  # seconds from creation to the end
    fail_models: frozenset[str] = frozenset({"bad"})
    poll_after_ms: int | None = 20
    webhook_url: str | None = None
    webhook_secret: str | None = None


@dataclasses.dataclass
class _Response:
    id: str
    request: dict[str, Any]
    created: float
    cancelled: bool = False
    announced: bool = False


class ScriptedResponses(ScriptedUpstream):
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour or Behaviour()
        self.responses: dict[str, _Response] = {}
        self.creates = 0
        self.retrieves = 0
        self.cancels: list[str] = []
        self.created = threading.Event()  # a response was created
        self.cancel_seen = asyncio.Event()  # a cancel came (for tests in the server's loop)
        self.webhooks_sent: list[int] = []
        self._ticker: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/responses", self._create)
        app.router.add_get("/v1/responses/{id}", self._retrieve)
        app.router.add_post("/v1/responses/{id}/cancel", self._cancel)
        return app

    async def start(self) -> str:
        base = await super().start()
        self._ticker = asyncio.create_task(self._tick())
        return base

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await super().stop()

    def _status(self, response: _Response) -> str:
        if response.cancelled:
            return "cancelled"
        age = time.monotonic() - response.created
        if age < self.behaviour.duration / 5:
            return "queued"
        if age < self.behaviour.duration:
            return "in_progress"
        return (
            "failed" if response.request.get("model") in self.behaviour.fail_models else "completed"
        )

    def _json(self, response: _Response) -> dict[str, Any]:
        status = self._status(response)
        request = response.request
        body: dict[str, Any] = {
            "id": response.id, "object": "response", "created_at": 1700000000,
            "status": status, "background": True, "model": request.get("model"),
            "metadata": request.get("metadata") or {}, "output": [], "usage": None,
            "error": None, "incomplete_details": None,
        }  # fmt: skip
        if status == "completed":
            text = f"echo: {_last_text(request.get('input'))}"
            body["output"] = [{"id": "msg_" + response.id, "type": "message", "role": "assistant",
                               "status": "completed", "content": [{"type": "output_text",
                               "text": text, "annotations": []}]}]  # fmt: skip
            body["usage"] = {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6,
                             "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        elif status == "failed":
            body["error"] = {"code": "invalid_prompt", "message": "scripted failure"}
        return body

    def _respond(self, response: _Response) -> web.Response:
        headers = {}
        if self.behaviour.poll_after_ms is not None:
            headers["openai-poll-after-ms"] = str(self.behaviour.poll_after_ms)
        return web.json_response(self._json(response), headers=headers)

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("background") is not True:
            return web.json_response({"error": {"message": "not background"}}, status=400)
        self.creates += 1
        response = _Response(f"resp_scripted_{self.creates}", body, time.monotonic())
        self.responses[response.id] = response
        self.created.set()
        return self._respond(response)

    async def _retrieve(self, request: web.Request) -> web.Response:
        self.retrieves += 1
        response = self.responses.get(request.match_info["id"])
        if response is None:
            return web.json_response({"error": {"message": "no such response"}}, status=404)
        return self._respond(response)

    async def _cancel(self, request: web.Request) -> web.Response:
        response = self.responses.get(request.match_info["id"])
        if response is None:
            return web.json_response({"error": {"message": "no such response"}}, status=404)
        self.cancels.append(response.id)
        self.cancel_seen.set()
        if self._status(response) in ("queued", "in_progress"):
            response.cancelled = True
        return self._respond(response)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            for response in list(self.responses.values()):
                status = self._status(response)
                if status in ("queued", "in_progress") or response.announced:
                    continue
                response.announced = True
                if self.behaviour.webhook_url:
                    await self._announce(response, f"response.{status}")

    async def _announce(self, response: _Response, kind: str) -> None:
        behaviour = self.behaviour
        assert behaviour.webhook_url and behaviour.webhook_secret
        message_id = f"evt_{response.id}"
        timestamp = int(time.time())
        body = json.dumps({"object": "event", "id": message_id, "type": kind,
                           "created_at": timestamp, "data": {"id": response.id}}).encode()  # fmt: skip
        headers = sign(behaviour.webhook_secret, message_id, timestamp, body)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(behaviour.webhook_url, data=body, headers=headers) as answer,
            ):
                self.webhooks_sent.append(answer.status)
        except aiohttp.ClientError:
            self.webhooks_sent.append(0)


def _last_text(given: Any) -> str:
    if isinstance(given, str):
        return given
    for item in reversed(given or []):
        if item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content if p.get("type") == "input_text")
    return ""
