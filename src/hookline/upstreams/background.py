"""OpenAI's Responses API in background mode, as a client (``upstream_mode = "background"``).

A chat completion job is posted as ``POST /responses`` with ``background: true``: the provider
answers at once with the response's id (``queued``), and ``GET /responses/{id}`` follows it until
it is ``completed``, ``incomplete``, ``failed`` or ``cancelled``. No connection is held while the
model works. The ended response is turned into the ``chat.completion`` a direct call would have
answered (:func:`chat_completion`), so the job's output has the same shape either way.

The caller (:mod:`hookline.worker`) records the response's id with the job as soon as it is
known and hands a recorded one back to the next attempt, which follows that response instead of
creating a second (:meth:`BackgroundResponses.run`); :meth:`BackgroundResponses.cancel` forwards
a cancel. Only chat completions run this way; an upstream's other operations stay calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import orjson

from hookline.config import UpstreamConfig
from hookline.upstreams.base import UpstreamError, bad_response
from hookline.upstreams.provider_batches import request_json

log = logging.getLogger("hookline.upstreams")

_ENDED = frozenset({"completed", "incomplete", "failed", "cancelled"})
_KNOWN = _ENDED | {"queued", "in_progress"}
_POLL_GROWTH = 1.5
# A failed response whose error code is one of these is worth another attempt (a new response).
_RETRYABLE_CODES = frozenset({"server_error", "rate_limit_exceeded", "vector_store_timeout"})
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}

# Chat request fields the Responses API takes under the same name and meaning.
_SAME = ("model", "temperature", "top_p", "user", "store", "service_tier", "metadata",
         "parallel_tool_calls", "prompt_cache_key", "safety_identifier")  # fmt: skip
# What a chat request may carry that needs no translation (the stream is hookline's affair).
_IGNORED = frozenset({"stream", "stream_options", "n"})
_TRANSLATED = frozenset({"messages", "max_tokens", "max_completion_tokens", "reasoning_effort",
                         "response_format", "verbosity", "tools", "tool_choice"})  # fmt: skip


def _unsupported(message: str) -> UpstreamError:
    return UpstreamError("unsupported_in_background", message, status=400)


# --- the request


def responses_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The Responses request for a chat completion request (``background`` not set yet).
    Raises :class:`UpstreamError` (not retryable) for what the Responses API cannot do."""
    unknown = sorted(set(body) - set(_SAME) - _IGNORED - _TRANSLATED)
    if unknown:
        raise _unsupported(f"background mode cannot send these chat parameters: {unknown}")
    if body.get("n") not in (None, 1):
        raise _unsupported("background mode answers one choice (n = 1)")
    if body.get("store") is False:  # the provider keeps a background response to be polled
        raise _unsupported("background mode needs the provider to store the response (store)")
    request: dict[str, Any] = {k: body[k] for k in _SAME if body.get(k) is not None}
    request["input"] = [item for m in body.get("messages") or [] for item in _input_items(m)]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        request["max_output_tokens"] = limit
    if body.get("reasoning_effort") is not None:
        request["reasoning"] = {"effort": body["reasoning_effort"]}
    text: dict[str, Any] = {}
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping):
        if response_format.get("type") == "json_schema":
            text["format"] = {"type": "json_schema", **(response_format.get("json_schema") or {})}
        else:
            text["format"] = {"type": response_format.get("type")}
    if body.get("verbosity") is not None:
        text["verbosity"] = body["verbosity"]
    if text:
        request["text"] = text
    if body.get("tools"):
        request["tools"] = [_tool(tool) for tool in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        request["tool_choice"] = {"type": "function", "name": choice["function"].get("name")}
    elif choice is not None:
        request["tool_choice"] = choice
    return request


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, Mapping):
        raise _unsupported(f"background mode sends function tools only, not {tool.get('type')!r}")
    return {"type": "function", **function}


def _input_items(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A chat message as Responses input items (an assistant's tool calls and a tool's answer
    are items of their own)."""
    role = message.get("role")
    content = message.get("content")
    if role == "tool":
        return [{"type": "function_call_output", "call_id": message.get("tool_call_id"),
                 "output": content if isinstance(content, str) else _text_of(content)}]  # fmt: skip
    if role not in ("system", "developer", "user", "assistant"):
        raise _unsupported(f"background mode cannot send a message of role {role!r}")
    items: list[dict[str, Any]] = []
    if isinstance(content, str):
        items.append({"role": role, "content": content})
    elif isinstance(content, list):
        kind = "output_text" if role == "assistant" else "input_text"
        items.append({"role": role, "content": [_part(part, kind) for part in content]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        items.append({"type": "function_call", "call_id": call.get("id"),
                      "name": function.get("name"), "arguments": function.get("arguments")})  # fmt: skip
    return items


def _part(part: Mapping[str, Any], text_kind: str) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"type": text_kind, "text": part.get("text")}
    if kind == "image_url":
        image = part.get("image_url") or {}
        return {"type": "input_image", "image_url": image.get("url"),
                "detail": image.get("detail") or "auto"}  # fmt: skip
    if kind == "file":
        return {"type": "input_file", **(part.get("file") or {})}
    raise _unsupported(f"background mode cannot send a content part of type {kind!r}")


def _text_of(content: Any) -> str:
    parts = content if isinstance(content, list) else []
    return "".join(str(p.get("text") or "") for p in parts if isinstance(p, Mapping))


# --- the answer


def chat_completion(response: Mapping[str, Any]) -> dict[str, Any]:
    """The ``chat.completion`` of an ended (completed or incomplete) response."""
    texts: list[str] = []
    refusals: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.get("output") or []:
        if item.get("type") == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    texts.append(str(part.get("text") or ""))
                elif part.get("type") == "refusal":
                    refusals.append(str(part.get("refusal") or ""))
        elif item.get("type") == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function",
                          "function": {"name": item.get("name"),
                                       "arguments": item.get("arguments")}})  # fmt: skip
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not (calls or refusals) else None,
        "refusal": "".join(refusals) or None,
    }
    if calls:
        message["tool_calls"] = calls
    finish = "tool_calls" if calls else "stop"
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        finish = _INCOMPLETE.get(str(reason), "length")
    completion: dict[str, Any] = {
        "id": response.get("id"),
        "object": "chat.completion",
        "created": response.get("created_at"),
        "model": response.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    usage = response.get("usage")
    if isinstance(usage, Mapping):
        given, made = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
        reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
        completion["usage"] = {
            "prompt_tokens": given,
            "completion_tokens": made,
            "total_tokens": _count(usage.get("total_tokens")) or given + made,
            "prompt_tokens_details": {"cached_tokens": _count(cached)},
            "completion_tokens_details": {"reasoning_tokens": _count(reasoning)},
        }
    if response.get("service_tier") is not None:
        completion["service_tier"] = response["service_tier"]
    return completion


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- the client


@dataclasses.dataclass(frozen=True)
class ResponseState:
    """A background response as the provider shows it; ``poll_after``: the seconds it asked
    to wait before the next look."""

    id: str
    status: str
    body: dict[str, Any]
    poll_after: float | None = None

    @property
    def ended(self) -> bool:
        return self.status in _ENDED


Record = Callable[[str], Awaitable[bool]]


class BackgroundResponses:
    """One upstream's background responses: create, follow, cancel."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        assert config.base_url is not None
        self.base_url = config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0  # HTTP requests made

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            key = self.config.resolved_api_key()
            headers = {
                "User-Agent": "hookline",
                **({"Authorization": f"Bearer {key}"} if key else {}),
            }
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=min(self.config.timeout_seconds, 120.0),
                    sock_connect=min(10.0, self.config.timeout_seconds),
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(
        self,
        body: Mapping[str, Any],
        *,
        recorded: str | None,
        record: Record,
        metadata: Mapping[str, str],
        poke: asyncio.Event | None = None,
    ) -> dict[str, Any]:
        """One attempt: follow the ``recorded`` response if it may still give the answer (it
        exists and has not failed), else create one and ``record`` its id (False: the job is no
        longer ours, and the response is cancelled); then look at it, spaced by the provider's
        wishes and a growing backoff (at once when ``poke`` is set: a webhook came), until it
        ends. Returns the job's output (a ``chat.completion``); raises :class:`UpstreamError`."""
        state = await self._resumable(recorded) if recorded is not None else None
        if state is None:
            # Shielded: once the provider has made a response, its id is recorded (or the
            # response cancelled) even if this attempt is stopped meanwhile, so no response is
            # left running unknown to hookline.
            creating = asyncio.ensure_future(self._create(body, record, metadata))
            creating.add_done_callback(_retrieved)
            state = await asyncio.shield(creating)
        delay = self.config.background_poll_seconds
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        while not state.ended:
            await _pause(max(delay, state.poll_after or 0.0), poke)
            delay = min(delay * _POLL_GROWTH, self.config.background_poll_max_seconds)
            try:
                state = await self.retrieve(state.id)
                failing_since = None
            except UpstreamError as exc:  # a blip: look again later, within timeout_seconds
                now = loop.time()
                failing_since = now if failing_since is None else failing_since
                if not exc.retryable or now - failing_since > self.config.timeout_seconds:
                    raise
                log.info("background response %s: looking at it failed: %s", state.id, exc)
        return self._output(state)

    async def _create(
        self, body: Mapping[str, Any], record: Record, metadata: Mapping[str, str]
    ) -> ResponseState:
        request = {**responses_request(body), "background": True}
        request["metadata"] = {**(request.get("metadata") or {}), **metadata}
        state = self._state(*await self._json("POST", "/responses", json=request))
        if not state.id:
            raise bad_response("the created response has no id")
        try:
            kept = await record(state.id)
        except BaseException:  # not recorded: a later attempt would make another one
            await self._abandon(state.id)
            raise
        if not kept:
            await self._abandon(state.id)
            raise UpstreamError("job_lost", "the job is no longer this worker's")
        return state

    async def _abandon(self, response_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.cancel(response_id)

    async def retrieve(self, response_id: str) -> ResponseState:
        return self._state(*await self._json("GET", f"/responses/{response_id}"))

    async def cancel(self, response_id: str) -> None:
        """Ask the provider to stop the response (one that already ended is left as it is)."""
        try:
            await self._json("POST", f"/responses/{response_id}/cancel")
        except UpstreamError as exc:
            if exc.status not in (400, 404, 409):  # (ended already, or gone)
                raise

    async def _resumable(self, response_id: str) -> ResponseState | None:
        """The recorded response, unless it is gone or failed (a new one is made then)."""
        try:
            state = await self.retrieve(response_id)
        except UpstreamError as exc:
            if exc.status == 404:
                return None
            raise
        if state.status in ("failed", "cancelled"):
            return None
        return state

    def _output(self, state: ResponseState) -> dict[str, Any]:
        body = state.body
        if state.status in ("completed", "incomplete"):
            return chat_completion(body)
        given = body.get("error")
        error: dict[str, Any] = given if isinstance(given, dict) else {}
        if state.status == "cancelled":
            raise UpstreamError("upstream_cancelled", "the provider cancelled the response")
        code = str(error.get("code") or "")
        message = str(error.get("message") or f"the background response {state.id} failed")
        raise UpstreamError("upstream_error", message, retryable=code in _RETRYABLE_CODES,
                            body={"error": error})  # fmt: skip

    def _state(self, body: dict[str, Any], hint: float | None) -> ResponseState:
        status = str(body.get("status") or "")
        if status not in _KNOWN:  # never polled forever on an answer that cannot end
            raise bad_response(f"a response with status {status!r}")
        return ResponseState(str(body.get("id") or ""), status, body, hint)

    async def _json(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[dict[str, Any], float | None]:
        url = self.base_url + path
        self.calls += 1
        if "json" in kwargs:  # (orjson: the request as the other upstream calls encode it)
            kwargs = {"data": orjson.dumps(kwargs.pop("json")),
                      "headers": {"Content-Type": "application/json"}, **kwargs}  # fmt: skip
        return await request_json(self.session, method, url, self.config.max_output_bytes, **kwargs)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A shielded creation's failure, seen (the attempt that awaited it may have gone)."""
    if not task.cancelled():
        task.exception()


async def _pause(seconds: float, poke: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or less when ``poke`` is set meanwhile (it is cleared)."""
    if poke is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await poke.wait()
    poke.clear()
