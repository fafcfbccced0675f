"""Any OpenAI-compatible HTTP server (OpenAI, vLLM, Ollama, llama.cpp server, LM Studio, …).

Uses aiohttp: on this kind of hot path (many concurrent long-lived POSTs) it is an order of magnitude
faster than httpx's async pool. Streamable operations are requested with ``stream: true`` (and usage
in the last chunk) so that partial output is reported as it arrives; the chunks are reassembled into
the non-streaming response shape.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import aiohttp
import orjson

from hookline.config import UpstreamConfig
from hookline.httputil import parse_retry_after
from hookline.jobs import Operation
from hookline.upstreams.assembly import StreamAssembler
from hookline.upstreams.base import (
    DeltaSink,
    PartialSink,
    Upstream,
    UpstreamError,
    bad_response,
    output_too_large,
)
from hookline.upstreams.chunk_stream import ChunkStreamParser
from hookline.upstreams.registry import register

_ERROR_BODY_LIMIT = 64 * 1024


@register("openai")
class OpenAIUpstream(Upstream):
    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        assert config.base_url is not None
        self.base_url = config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            headers = {"Content-Type": "application/json", "User-Agent": "hookline"}
            headers.update(self._auth_headers())
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=self.config.max_concurrency),
                timeout=aiohttp.ClientTimeout(
                    total=self.config.timeout_seconds,
                    sock_connect=min(10.0, self.config.timeout_seconds),
                    sock_read=self.config.idle_timeout_seconds,
                ),
            )

    def _auth_headers(self) -> dict[str, str]:
        """The headers every request carries besides the content type (the credentials)."""
        api_key = self.config.resolved_api_key()
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _prepare(self, operation: Operation, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of the request for one attempt (streamed when
        :meth:`_streams` says so)."""
        if operation.passthrough:  # an endpoint hookline does not model: the body as it came
            return operation.path, body
        request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        if self._streams(operation):
            request["stream"] = True
            request["stream_options"] = {"include_usage": True}
        return operation.path, request

    def _streams(self, operation: Operation) -> bool:
        return operation.streams and self.config.stream

    def _assembler(self, operation: Operation, on_delta: DeltaSink) -> Assembler | None:
        """What reads the streamed events (None: OpenAI's chunks)."""
        return None

    def _output(self, operation: Operation, answer: dict[str, Any]) -> dict[str, Any]:
        """The job's output from a whole (not streamed) answer."""
        return answer

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(
        self,
        operation: Operation,
        body: dict[str, Any],
        on_delta: DeltaSink,
        *,
        held_until: asyncio.Future[Any] | None = None,
        partial: PartialSink | None = None,
    ) -> dict[str, Any]:
        await self.start()
        assert self._session is not None
        stream = self._streams(operation)
        path, request = self._prepare(operation, body)
        try:
            async with self._session.post(
                self.base_url + path, data=orjson.dumps(request)
            ) as response:
                if response.status >= 400:
                    raise UpstreamError.from_status(
                        response.status,
                        await read_error_body(response),
                        parse_retry_after(response.headers.get("Retry-After")),
                    )
                limit = self.config.max_output_bytes
                if stream and response.content_type == "text/event-stream":
                    assembler = self._assembler(operation, on_delta) or StreamAssembler(
                        operation, on_delta
                    )
                    if partial is not None:
                        partial(assembler.result)
                    return await read_stream(
                        response, operation, on_delta, held_until, limit, assembler
                    )
                return self._output(operation, json_object(await read_body(response, limit)))
        except UpstreamError:
            raise
        except TimeoutError as exc:
            raise UpstreamError("upstream_timeout", self._late(exc), retryable=True) from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamError(
                "upstream_disconnected", f"the upstream response broke off: {exc}", retryable=True
            ) from exc
        except aiohttp.ClientResponseError as exc:  # (never raised for a status: not asked to)
            raise bad_response(f"not HTTP: {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                "upstream_unreachable", f"cannot reach the upstream: {exc}", retryable=True
            ) from exc

    def _late(self, exc: TimeoutError) -> str:
        """Which of the timeouts ran out: a silent upstream is not one whose answer runs long."""
        config = self.config
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return f"the upstream sent nothing for {config.idle_timeout_seconds:g} s"
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return "the upstream did not accept the connection in time"
        return f"the upstream's answer took longer than {config.timeout_seconds:g} s"


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytearray:
    """The whole body, refused past ``limit`` bytes (decompressed). Read into one growing buffer:
    aiohttp's ``read()`` holds a large answer twice while it joins the parts."""
    length = response.content_length
    if length is not None and length > limit:
        raise output_too_large(limit)
    body = bytearray()
    while data := await response.content.readany():
        body += data
        if len(body) > limit:
            raise output_too_large(limit)
    return body


def json_object(body: bytearray) -> dict[str, Any]:
    try:
        result = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_response(f"its body is not JSON: {exc}") from exc
    if not isinstance(result, dict):
        raise bad_response(f"its body is JSON but not an object: {type(result).__name__}")
    return result


async def read_error_body(response: aiohttp.ClientResponse) -> Any:
    raw = await response.content.read(_ERROR_BODY_LIMIT)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


_YIELD_SECONDS = 0.002
# A first read that holds more events than this (a burst that piled up while the job was being
# accepted, or a fast upstream) is split after them: their text goes to the streams watching the
# job before the rest of the burst is parsed (~0.3 ms for 200 chunks). Two, as the first event is
# often a role-only chunk.
_FIRST_EVENTS = 2


def _after_first_events(data: bytes) -> int:
    """Where the first ``_FIRST_EVENTS`` events of ``data`` end, if more follow; else 0."""
    end = 0
    for _ in range(_FIRST_EVENTS):
        blank = data.find(b"\n\n", end)
        if blank < 0:
            return 0
        end = blank + 2
    return end if end < len(data) else 0


class Assembler(Protocol):
    """What turns a stream's events into the final output (:class:`StreamAssembler` for
    OpenAI's chunks); ``finished``: its protocol's last event came."""

    finished: bool

    def feed(self, *chunks: Any) -> None: ...

    def result(self) -> dict[str, Any]: ...


async def read_stream(
    response: aiohttp.ClientResponse,
    operation: Operation,
    on_delta: DeltaSink,
    held_until: asyncio.Future[Any] | None,
    limit: int,
    assembler: Assembler | None = None,
) -> dict[str, Any]:
    """Read the SSE stream a read at a time (whatever bytes have arrived), not a line at a time:
    the chunks of one read are parsed together and their text reported as one delta. Past
    ``limit`` bytes the attempt fails (before they are parsed). ``assembler``: another
    protocol's events (default: OpenAI's chunks).

    While ``held_until`` is pending, only the first events are taken: under load (a hundred
    streams accepted together) parsing the rest of every held burst kept the event loop from
    committing their accepts, and so from showing anyone a first token."""
    if assembler is None:
        assembler = StreamAssembler(operation, on_delta)
    parser = ChunkStreamParser()
    loop = asyncio.get_running_loop()
    content = response.content
    yielded_at = 0.0
    first = True
    received = 0
    while True:
        data = content.read_nowait()  # what has arrived, without waiting
        if not data:
            data = await content.readany()  # waits for more: the other tasks run meanwhile
            if not data:
                break  # the end of the stream
            if not first:  # (after the first read the relay always gets a turn, below)
                yielded_at = loop.time()
        received += len(data)
        if received > limit:
            raise output_too_large(limit)
        if first:
            first = False
            cut = _after_first_events(data)
            if cut:  # a burst: its first events are relayed before the rest is parsed
                assembler.feed(*parser.feed(data[:cut]))
                if parser.done:
                    break
                data = data[cut:]
            if held_until is not None and not held_until.done():
                await asyncio.shield(held_until)  # (not ours to cancel)
            elif cut:
                await asyncio.sleep(0)
        assembler.feed(*parser.feed(data))
        if parser.done:
            break
        # Reads that arrived together are taken without suspending. Yield now and then (and
        # right after the first), so the streams watching this job send the first token at once
        # and a long burst is relayed as it is read, not after it; a read that had to wait for
        # its bytes has just yielded.
        if loop.time() - yielded_at > _YIELD_SECONDS:
            await asyncio.sleep(0)
            yielded_at = loop.time()
    if not parser.done:  # the stream ended: its last line may have had no newline
        assembler.feed(*parser.end())
    if parser.error is not None:  # after the text that came before it
        raise UpstreamError.from_status(500, parser.error)
    if not parser.done and not assembler.finished:
        raise UpstreamError(
            "upstream_disconnected", "the upstream stream ended before it finished", retryable=True
        )
    return assembler.result()
