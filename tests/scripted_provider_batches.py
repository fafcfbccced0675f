"""Scripted providers' asynchronous batch APIs on loopback, as their documentation describes them:

- OpenAI's Files + Batch API (``POST /v1/files``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]``,
  ``POST /v1/batches/{id}/cancel``, ``GET /v1/files/{id}/content``): a batch moves ``validating →
  in_progress → finalizing → completed`` over ``duration`` seconds, its ``request_counts`` growing;
  then its output file (lines in random order) and error file (failed requests; expired ones with
  ``batch_expired``); ``cancelling → cancelled`` and ``expired`` with what had finished. Answers
  carry ``openai-poll-after-ms``. With ``webhook_url`` and a ``whsec_`` secret, an ended batch is
  announced by a signed ``batch.completed`` (…) webhook, as OpenAI's webhooks are.
- Anthropic's Message Batches (``/v1/messages/batches``): ``processing_status`` ``in_progress →
  canceling → ended``, the results JSONL (in random order) at ``results_url``.

Either answers each request as the scripted single-call server (:class:`ScriptedUpstream`, whose
routes this server also serves) would answer it unstreamed: the echo of the last user message, so
a batch's results are comparable with the same requests run as calls. A model in ``fail_models``
answers 400.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import random
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web

from tests.scripted_upstream import ScriptedUpstream, _echo, _whole


@dataclasses.dataclass
class Behaviour:
    duration: float = 0.3  # seconds from creation to the end
    expire: bool = False  # ends expired, with the requests done by then
    expire_after: float = 0.15
    fail_models: frozenset[str] = frozenset({"bad"})
    poll_after_ms: int | None = 20  # openai-poll-after-ms on every batch answer
    hold_create: float = 0.0  # the create's answer waits this long (the batch exists already)
    refuse_creates: int = 0  # the first this many creates answer 503 (no batch made)
    results_pause: float = 0.0  # a results download stops this long halfway
    webhook_url: str | None = None
    webhook_secret: str | None = None


@dataclasses.dataclass
class _Batch:
    id: str
    kind: str  # openai | anthropic
    requests: list[dict[str, Any]]
    metadata: dict[str, str]
    created: float
    endpoint: str = "/v1/chat/completions"
    input_file_id: str | None = None
    cancelled_at: float | None = None
    ended: str | None = None  # completed | expired | cancelled
    done: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    announced: bool = False


class ScriptedProviderBatches(ScriptedUpstream):
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour or Behaviour()
        self.batches: dict[str, _Batch] = {}
        self.files: dict[str, bytes] = {}
        self.calls: dict[str, int] = {}
        self.created = threading.Event()  # a batch was created (before its answer went out)
        self.results_started = threading.Event()  # a results download is halfway
        self.webhooks_sent: list[int] = []
        self._ticker: asyncio.Task[None] | None = None
        self._n = 0

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self._count)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        app.router.add_post("/v1/messages/batches", self._create_messages)
        app.router.add_get("/v1/messages/batches", self._list_messages)
        app.router.add_get("/v1/messages/batches/{id}", self._retrieve_message)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self._cancel_message)
        app.router.add_get("/v1/messages/batches/{id}/results", self._results)
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

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        route = f"{request.method} {request.match_info.route.resource.canonical if request.match_info.route.resource else request.path}"
        self.calls[route] = self.calls.get(route, 0) + 1
        response: web.StreamResponse = await handler(request)
        return response

    def batch_calls(self) -> int:
        """Requests made to the batch and file routes (not single calls)."""
        return sum(n for route, n in self.calls.items() if "batches" in route or "files" in route)

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:04d}"

    # --- time

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            for batch in list(self.batches.values()):
                self._advance(batch)
                if batch.ended and not batch.announced:
                    batch.announced = True
                    if batch.kind == "openai" and self.behaviour.webhook_url:
                        await self._announce(batch)

    def _advance(self, batch: _Batch) -> None:
        if batch.ended:
            return
        now = time.monotonic()
        behaviour = self.behaviour
        total = len(batch.requests)
        if batch.cancelled_at is not None and now - batch.cancelled_at >= 0.05:
            self._end(batch, "cancelled")
            return
        if behaviour.expire and now - batch.created >= behaviour.expire_after:
            self._end(batch, "expired")
            return
        fraction = min(1.0, (now - batch.created) / behaviour.duration)
        if batch.cancelled_at is None:
            batch.done = int(total * fraction)
        if fraction >= 1.0:
            self._end(batch, "completed")

    def _end(self, batch: _Batch, how: str) -> None:
        batch.ended = how
        done = batch.requests[: batch.done] if how != "completed" else batch.requests
        answered = [(r, self._reply(r)) for r in done]
        left = batch.requests[len(done) :]
        if batch.kind == "anthropic":
            lines = [self._message_result(r, answer) for r, answer in answered]
            kind = {"cancelled": "canceled", "expired": "expired"}.get(how)
            lines += (
                [{"custom_id": r["custom_id"], "result": {"type": kind}} for r in left]
                if kind
                else []
            )
            random.shuffle(lines)
            self.files[f"results-{batch.id}"] = _jsonl(lines)
            return
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for request, (status, body) in answered:
            line = {"id": self._id("batch_req_"), "custom_id": request["custom_id"],
                    "response": {"status_code": status, "request_id": self._id("req_"),
                                 "body": body}, "error": None}  # fmt: skip
            (output if status == 200 else errors).append(line)
        if how == "expired":
            errors += [{"id": self._id("batch_req_"), "custom_id": r["custom_id"], "response": None,
                        "error": {"code": "batch_expired",
                                  "message": "This request could not be executed before the "
                                             "completion window expired."}} for r in left]  # fmt: skip
        random.shuffle(output)
        random.shuffle(errors)
        if output:
            batch.output_file_id = self._id("file-")
            self.files[batch.output_file_id] = _jsonl(output)
        if errors:
            batch.error_file_id = self._id("file-")
            self.files[batch.error_file_id] = _jsonl(errors)

    def _reply(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = request.get("body") or _as_chat(request.get("params") or {})
        if body.get("model") in self.behaviour.fail_models:
            return 400, {"error": {"message": "no such thing", "type": "scripted", "code": 400}}
        return 200, _whole(body, _echo(body, True), True)

    def _message_result(self, request: dict[str, Any], answer: tuple[int, Any]) -> dict[str, Any]:
        status, whole = answer
        params = request["params"]
        if status != 200:
            error = {"type": "error", "error": {"type": "invalid_request_error",
                                                "message": "no such thing"}}  # fmt: skip
            return {
                "custom_id": request["custom_id"],
                "result": {"type": "errored", "error": error},
            }
        text = whole["choices"][0]["message"]["content"]
        message = {"id": self._id("msg_"), "type": "message", "role": "assistant",
                   "model": params.get("model"), "content": [{"type": "text", "text": text}],
                   "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
        return {
            "custom_id": request["custom_id"],
            "result": {"type": "succeeded", "message": message},
        }

    async def _announce(self, batch: _Batch) -> None:
        """OpenAI's webhook for an ended batch, signed per Standard Webhooks."""
        behaviour = self.behaviour
        assert behaviour.webhook_url and behaviour.webhook_secret
        kind = {"completed": "batch.completed", "expired": "batch.expired",
                "cancelled": "batch.cancelled"}[batch.ended or "completed"]  # fmt: skip
        message_id = self._id("evt_")
        timestamp = int(time.time())
        body = json.dumps({"object": "event", "id": message_id, "type": kind,
                           "created_at": timestamp, "data": {"id": batch.id}}).encode()  # fmt: skip
        headers = sign(behaviour.webhook_secret, message_id, timestamp, body)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(behaviour.webhook_url, data=body, headers=headers) as response,
            ):
                self.webhooks_sent.append(response.status)
        except aiohttp.ClientError:
            self.webhooks_sent.append(0)

    # --- OpenAI: files and batches

    def _headers(self) -> dict[str, str]:
        after = self.behaviour.poll_after_ms
        return {"openai-poll-after-ms": str(after)} if after is not None else {}

    async def _upload(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        content, purpose = b"", ""
        async for part in reader:
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            if part.name == "file":
                content = bytes(await part.read())
            elif part.name == "purpose":
                purpose = (await part.read()).decode()
        file_id = self._id("file-")
        self.files[file_id] = content
        return web.json_response({"id": file_id, "object": "file", "bytes": len(content),
                                  "purpose": purpose, "created_at": int(time.time())})  # fmt: skip

    async def _content(self, request: web.Request) -> web.StreamResponse:
        content = self.files.get(request.match_info["id"])
        if content is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return await self._send(request, content)

    async def _send(self, request: web.Request, content: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
        await response.prepare(request)
        if self.behaviour.results_pause and len(content) > 2:
            half = content.rfind(b"\n", 0, len(content) // 2) + 1
            await response.write(content[:half])
            self.results_started.set()
            await asyncio.sleep(self.behaviour.results_pause)
            await response.write(content[half:])
        else:
            await response.write(content)
        await response.write_eof()
        return response

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.behaviour.refuse_creates > 0:
            self.behaviour.refuse_creates -= 1
            return web.json_response({"error": {"message": "try again"}}, status=503)
        raw = self.files.get(body.get("input_file_id", ""))
        if raw is None:
            return web.json_response({"error": {"message": "no such file"}}, status=400)
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        ids = [line["custom_id"] for line in lines]
        if len(set(ids)) != len(ids):
            return web.json_response({"error": {"message": "duplicate custom_id"}}, status=400)
        batch = _Batch(self._id("batch_"), "openai", lines, body.get("metadata") or {},
                       time.monotonic(), body.get("endpoint"), body["input_file_id"])  # fmt: skip
        self.batches[batch.id] = batch
        self.created.set()
        if self.behaviour.hold_create:
            await asyncio.sleep(self.behaviour.hold_create)
        return web.json_response(self._batch_json(batch), headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        mine = [b for b in self.batches.values() if b.kind == "openai"][::-1]  # newest first
        after = request.query.get("after")
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        page = mine[:limit]
        return web.json_response({"object": "list", "data": [self._batch_json(b) for b in page],
                                  "has_more": len(mine) > limit})  # fmt: skip

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        self._advance(batch)
        return web.json_response(self._batch_json(batch), headers=self._headers())

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        if not batch.ended and batch.cancelled_at is None:
            batch.cancelled_at = time.monotonic()
        return web.json_response(self._batch_json(batch), headers=self._headers())

    def _batch_json(self, batch: _Batch) -> dict[str, Any]:
        total = len(batch.requests)
        if batch.ended:
            status = batch.ended
        elif batch.cancelled_at is not None:
            status = "cancelling"
        else:
            age = time.monotonic() - batch.created
            status = "validating" if age < self.behaviour.duration * 0.1 else (
                "finalizing" if batch.done >= total else "in_progress")  # fmt: skip
        failed = sum(1 for r in batch.requests[: batch.done] if self._reply(r)[0] != 200)
        return {
            "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": None,
            "input_file_id": batch.input_file_id, "completion_window": "24h", "status": status,
            "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
            "created_at": int(time.time()), "metadata": batch.metadata,
            "request_counts": {"total": total, "completed": batch.done - failed, "failed": failed},
        }  # fmt: skip

    # --- Anthropic: Message Batches

    async def _create_messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        requests = body.get("requests") or []
        batch = _Batch(self._id("msgbatch_"), "anthropic", requests, {}, time.monotonic())
        self.batches[batch.id] = batch
        self.created.set()
        if self.behaviour.hold_create:
            await asyncio.sleep(self.behaviour.hold_create)
        return web.json_response(self._message_batch_json(request, batch))

    async def _list_messages(self, request: web.Request) -> web.Response:
        mine = [b for b in self.batches.values() if b.kind == "anthropic"][::-1]
        after = request.query.get("after_id")
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        page = [self._message_batch_json(request, b) for b in mine[:limit]]
        return web.json_response({"data": page, "has_more": len(mine) > limit,
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None})  # fmt: skip

    async def _retrieve_message(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return web.json_response({"type": "error", "error": {"type": "not_found_error",
                                                                 "message": "no batch"}}, status=404)  # fmt: skip
        self._advance(batch)
        return web.json_response(self._message_batch_json(request, batch),
                                 headers={"retry-after": "0"})  # fmt: skip

    async def _cancel_message(self, request: web.Request) -> web.Response:
        batch = self.batches[request.match_info["id"]]
        if not batch.ended and batch.cancelled_at is None:
            batch.cancelled_at = time.monotonic()
        return web.json_response(self._message_batch_json(request, batch))

    async def _results(self, request: web.Request) -> web.StreamResponse:
        content = self.files.get(f"results-{request.match_info['id']}")
        if content is None:
            return web.json_response({"type": "error"}, status=404)
        return await self._send(request, content)

    def _message_batch_json(self, request: web.Request, batch: _Batch) -> dict[str, Any]:
        total = len(batch.requests)
        done = (
            batch.requests[: batch.done]
            if not batch.ended or batch.ended != "completed"
            else batch.requests
        )
        errored = sum(1 for r in done if self._reply(r)[0] != 200)
        left = total - len(done)
        status = "ended" if batch.ended else ("canceling" if batch.cancelled_at else "in_progress")
        counts = {"processing": 0 if batch.ended else left, "succeeded": len(done) - errored,
                  "errored": errored, "canceled": left if batch.ended == "cancelled" else 0,
                  "expired": left if batch.ended == "expired" else 0}  # fmt: skip
        base = str(request.url.origin())
        created = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        return {
            "id": batch.id, "type": "message_batch", "processing_status": status,
            "request_counts": counts, "created_at": created, "ended_at": created if batch.ended else None,
            "expires_at": None, "cancel_initiated_at": None, "archived_at": None,
            "results_url": f"{base}/v1/messages/batches/{batch.id}/results" if batch.ended else None,
        }  # fmt: skip


def _as_chat(params: dict[str, Any]) -> dict[str, Any]:
    """A Messages request's last user text as a chat request's (to echo it alike)."""
    messages = []
    for message in params.get("messages") or ():
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content if b.get("type") == "text")
        messages.append({"role": message.get("role"), "content": content})
    return {**params, "messages": messages}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(random.randbytes(24)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers for ``body``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1,{signature}", "content-type": "application/json"}  # fmt: skip
