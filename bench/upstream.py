"""A fast streaming upstream for benchmarks, as its own process: every chat completion
(OpenAI's ``/v1/chat/completions``) and every message (Anthropic's ``/v1/messages``, streamed as
Anthropic streams it) streams ``TOKENS`` chunks at once (no time to first token, no delay
between tokens).

python -m bench.upstream PORT [TOKENS]
"""

from __future__ import annotations

import asyncio
import sys

import orjson
from aiohttp import web

TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 200


def _chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


# The whole answer is prepared once: the upstream costs as little as it can.
CHUNKS = [_chunk(f"t{i} ") for i in range(TOKENS)]
FINISH = [_chunk(None, "stop"),
          b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
          b'"model":"bench","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":'
          + str(TOKENS).encode() + b',"total_tokens":' + str(TOKENS + 5).encode() + b"}}\n\n",
          b"data: [DONE]\n\n"]  # fmt: skip


def _event(kind: str, data: dict[str, object]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


_MESSAGE: dict[str, object] = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
ANTHROPIC_START = [
    _event("message_start", {"message": _MESSAGE}),
    _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
]
ANTHROPIC_CHUNKS = [
    _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f"t{i} "}})
    for i in range(TOKENS)
]
ANTHROPIC_FINISH = [
    _event("content_block_stop", {"index": 0}),
    _event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": TOKENS}}),
    _event("message_stop", {}),
]  # fmt: skip


async def _messages(request: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API, streamed (the benchmarks always ask for a stream)."""
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in (*ANTHROPIC_START, *ANTHROPIC_CHUNKS, *ANTHROPIC_FINISH):
        await response.write(chunk)
    return response


async def _chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    model = str(body.get("model", ""))
    delay = 0.05 if model == "slow" else 0.0  # "slow": a job that runs ~10 s
    if model.startswith("hold"):  # "hold30": 30 s before the first token (in-flight capacity)
        await asyncio.sleep(float(model.removeprefix("hold")))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in CHUNKS:
        await response.write(chunk)  # one write per token, as a real server sends them
        if delay:
            await asyncio.sleep(delay)
    for chunk in FINISH:
        await response.write(chunk)
    return response


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/messages", _messages)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
