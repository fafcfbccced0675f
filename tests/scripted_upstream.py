"""A scripted OpenAI-compatible server on loopback, for testing how hookline meets upstream faults.

Each model name has a script: a list of steps, one consumed per request (the last one repeats). With no
script, a model answers by echoing the last user message. Steps reproduce what real upstreams do:
answer (streamed or not, with a slow first token or slow tokens), an error status with Retry-After,
a connection dropped mid-stream, a hang, a stream without end, random bytes.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
import socket
import threading
import time
from collections import defaultdict
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web


@dataclasses.dataclass
class Reply:
    text: str | None = None  # default: echo of the last user message
    chunks: int = 4  # how many pieces a streamed answer is cut into
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    burst: bool = False  # the whole stream in one write, as a fast server's bytes pile up


@dataclasses.dataclass
class Status:
    status: int
    retry_after: str | None = None
    message: str = "scripted failure"


@dataclasses.dataclass
class Drop:
    after_chunks: int = 2  # stream this many chunks of the echo, then cut the connection


@dataclasses.dataclass
class Hang:
    seconds: float = 3600.0


@dataclasses.dataclass
class ErrorChunk:
    after_chunks: int = 2  # stream this many chunks of the echo, then an error chunk, and end
    message: str = "scripted error mid-stream"


@dataclasses.dataclass
class Endless:
    """A stream that never ends: chunks of ``piece_chars`` characters as fast as they are taken
    (it stops after ``give_up_bytes``, so that a test that fails does not run forever)."""

    piece_chars: int = 1024
    give_up_bytes: int = 256 * 1024 * 1024


@dataclasses.dataclass
class Garbage:
    """``size`` random bytes (the same ones each time) where the answer should be: the body of a
    200 (typed as an event stream for a streamed request), or with ``raw``, in place of the whole
    HTTP response."""

    size: int = 8192
    raw: bool = False


Step = Reply | Status | Drop | Hang | ErrorChunk | Endless | Garbage


@dataclasses.dataclass
class Seen:
    model: str
    body: dict[str, Any]
    at: float
    aborted: bool = False


class ScriptedUpstream:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Step]] = {}
        self.requests: list[Seen] = []
        self.counts: defaultdict[str, int] = defaultdict(int)
        self.active = 0
        self.max_active = 0
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

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/images/generations", self._images)
        app.router.add_post("/v1/rerank", self._rerank)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(
            self.app(), handle_signals=False, handler_cancellation=True, shutdown_timeout=0.5
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

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(Seen(body.get("model", ""), body, time.monotonic()))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(text))), 0.5, -0.5]}
            for i, text in enumerate(inputs)
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )

    async def _images(self, request: web.Request) -> web.Response:
        """OpenAI's image generation: ``n`` images of the prompt, as base64 (a few bytes each)
        or URLs; a ``Reply``'s ``first_token_delay`` makes it a slow answer, as images are."""
        body = await request.json()
        model = body.get("model", "")
        self.requests.append(Seen(model, body, time.monotonic()))
        self.counts[model] += 1
        step = self._next_step(model)
        if isinstance(step, Status):
            error = {"message": step.message, "type": "scripted", "code": step.status}
            headers = {"Retry-After": step.retry_after} if step.retry_after else {}
            return web.json_response({"error": error}, status=step.status, headers=headers)
        if isinstance(step, Reply) and step.first_token_delay:
            await asyncio.sleep(step.first_token_delay)
        prompt = str(body.get("prompt", ""))
        images = []
        for i in range(int(body.get("n") or 1)):
            if body.get("response_format") == "url":
                images.append({"url": f"https://images.example/{i}.png", "revised_prompt": prompt})
            else:
                png = base64.b64encode(f"PNG {i}: {prompt}".encode()).decode()
                images.append({"b64_json": png, "revised_prompt": prompt})
        return web.json_response({"created": 1700000000, "data": images})

    async def _rerank(self, request: web.Request) -> web.Response:
        """An endpoint hookline does not model (a passthrough operation): a reranker's
        answer, the documents scored by their length."""
        body = await request.json()
        self.requests.append(Seen(body.get("model", ""), body, time.monotonic()))
        documents = body.get("documents") or []
        results = [{"index": i, "relevance_score": len(str(d))} for i, d in enumerate(documents)]
        results.sort(key=lambda r: -r["relevance_score"])
        return web.json_response({"model": body.get("model"), "results": results})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model", "")
        seen = Seen(model, body, time.monotonic())
        self.requests.append(seen)
        self.counts[model] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._answer(request, body, self._next_step(model), seen)
        except (asyncio.CancelledError, ConnectionResetError):
            seen.aborted = True
            raise
        finally:
            self.active -= 1

    async def _answer(
        self, request: web.Request, body: dict[str, Any], step: Step, seen: Seen
    ) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        if isinstance(step, Hang):
            await asyncio.sleep(step.seconds)
            step = Reply()
        if isinstance(step, Status):
            headers = {"Retry-After": step.retry_after} if step.retry_after else {}
            return web.json_response(
                {"error": {"message": step.message, "type": "scripted", "code": step.status}},
                status=step.status,
                headers=headers,
            )
        if isinstance(step, Garbage):
            return await self._garbage(request, body, step)
        if isinstance(step, Endless):
            return await self._endless(request, body, step, chat, seen)
        text = (step.text if isinstance(step, Reply) else None) or _echo(body, chat)
        pieces = split_text(text, step.chunks if isinstance(step, Reply) else 4)
        if not body.get("stream"):
            if isinstance(step, Reply) and step.first_token_delay:
                await asyncio.sleep(step.first_token_delay)
            return web.json_response(_whole(body, text, chat))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if isinstance(step, Reply) and step.burst:
            events = [_sse(_chunk(body, piece, chat, i == 0)) for i, piece in enumerate(pieces)]
            events.append(_sse(_chunk(body, "", chat, False, finish="stop")))
            await response.write(b"".join(events) + b"data: [DONE]\n\n")
            return response
        for i, piece in enumerate(pieces):
            if isinstance(step, Drop) and i == step.after_chunks:
                assert request.transport is not None
                request.transport.close()  # the connection breaks mid-stream
                return response
            if isinstance(step, ErrorChunk) and i == step.after_chunks:
                # As OpenAI reports an error after the stream began: a chunk with "error".
                await response.write(
                    _sse({"error": {"message": step.message, "type": "server_error"}})
                )
                return response
            if isinstance(step, Reply):
                await asyncio.sleep(step.first_token_delay if i == 0 else step.token_delay)
            await response.write(_sse(_chunk(body, piece, chat, i == 0)))
        await response.write(_sse(_chunk(body, "", chat, False, finish="stop")))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": 5,
                "completion_tokens": len(pieces),
                "total_tokens": 5 + len(pieces),
            }
            await response.write(
                _sse({**_chunk(body, "", chat, False), "choices": [], "usage": usage})
            )
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _garbage(
        self, request: web.Request, body: dict[str, Any], step: Garbage
    ) -> web.StreamResponse:
        noise = random.Random(step.size).randbytes(step.size)
        if step.raw:
            assert request.transport is not None
            request.transport.write(noise)
            request.transport.close()
            return web.Response()  # never sent: the connection is gone
        kind = "text/event-stream" if body.get("stream") else "application/json"
        response = web.StreamResponse(headers={"Content-Type": kind})
        await response.prepare(request)
        await response.write(noise)
        return response

    async def _endless(
        self, request: web.Request, body: dict[str, Any], step: Endless, chat: bool, seen: Seen
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = _sse(_chunk(body, "x" * step.piece_chars, chat, False))
        try:
            for _ in range(step.give_up_bytes // len(event)):
                await response.write(event)  # waits while the client does not read
        except ConnectionResetError:  # the client hung up
            seen.aborted = True
            raise asyncio.CancelledError from None  # (aiohttp's quiet way to end a handler)
        return response


def _echo(body: dict[str, Any], chat: bool) -> str:
    if chat:
        messages = body.get("messages") or [{}]
        return f"echo: {messages[-1].get('content', '')}"
    return f"echo: {body.get('prompt', '')}"


def split_text(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text)))
    size = -(-len(text) // n)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _chunk(
    body: dict[str, Any], piece: str, chat: bool, first: bool, finish: str | None = None
) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"content": piece} if piece else {}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {
        "id": "scripted-1",
        "object": obj,
        "created": 1700000000,
        "model": body.get("model"),
        "choices": [choice],
    }


def _whole(body: dict[str, Any], text: str, chat: bool) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        obj = "text_completion"
    return {
        "id": "scripted-1",
        "object": obj,
        "created": 1700000000,
        "model": body.get("model"),
        "choices": [choice],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


class Server(Protocol):
    async def start(self) -> Any: ...
    async def stop(self) -> None: ...


ServerT = TypeVar("ServerT", bound=Server)


class Threaded(Generic[ServerT]):
    """A loopback test server on its own thread and loop, for tests whose gateway is another
    process (and so cannot share the test's event loop)."""

    def __init__(self, server: ServerT) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ServerT:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# Ports for processes started later (gateways, a private PostgreSQL) come from below the
# kernel's ephemeral range (32768-60999 by default), from which every bind to port 0 and every
# outgoing connection takes its port: a port found free there and let go could be handed to a
# server in this process binding port 0 before the child binds it (a suite run saw it once).
_OWN_PORTS = range(20_000, 32_768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now, never the same one twice in this process."""
    for _ in range(200):
        port = random.choice(_OWN_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken (a service of this machine, say)
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found below the ephemeral range")
