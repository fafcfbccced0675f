"""The asyncio client: :class:`~hookline.client.Client`'s methods, awaited. Each runs the same
flow of :mod:`hookline.client._core`; this module only does the I/O (see
:meth:`AsyncClient._drive`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
from httpx_sse import EventSource

from hookline.client import _core
from hookline.client.models import (
    Batch,
    BatchResult,
    Delivery,
    Event,
    Job,
    JobPage,
    TextDelta,
)

T = TypeVar("T")


class AsyncClient:
    """:class:`~hookline.client.Client`'s methods for asyncio (``async with``, ``await``,
    ``async for``)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._calls = _core.Calls(url, api_key, timeout=timeout, retries=retries)
        self.url = self._calls.url
        self.retries = retries
        self._http = self._calls.aim(http_client or httpx.AsyncClient(timeout=timeout))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # jobs

    async def submit(
        self,
        operation: str,
        input: Mapping[str, Any],
        *,
        model: str | None = None,
        webhook: str | Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        priority: int = 0,
        ttl_seconds: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """See :meth:`Client.submit`."""
        return await self._run(
            self._calls.submit(
                operation, input, model=model, webhook=webhook, metadata=metadata,
                priority=priority, ttl_seconds=ttl_seconds, idempotency_key=idempotency_key,
            )
        )  # fmt: skip

    async def get(self, job: Job | str) -> Job:
        return await self._run(self._calls.get(job))

    async def wait(
        self, job: Job | str, timeout: float | None = None, *, raise_on_failure: bool = True
    ) -> Job:
        """See :meth:`Client.wait`."""
        return await self._run(self._calls.wait(job, timeout, raise_on_failure))

    async def cancel(self, job: Job | str) -> Job:
        return await self._run(self._calls.cancel(job))

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        operation: str | Sequence[str] | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Job]:
        """See :meth:`Client.list`."""
        return self._drive(self._calls.list(status, operation, page_size))

    async def list_page(
        self,
        *,
        status: str | Sequence[str] | None = None,
        operation: str | Sequence[str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """See :meth:`Client.list_page`."""
        return await self._run(self._calls.list_page(status, operation, limit, cursor))

    def stream(self, job: Job | str) -> AsyncIterator[Event | TextDelta]:
        """See :meth:`Client.stream`."""
        return self._drive(self._calls.stream(job))

    def events(
        self, *, after: str | int = "latest", types: Sequence[str] = ()
    ) -> AsyncIterator[Event]:
        """See :meth:`Client.events`."""
        return self._drive(self._calls.events(after, types))

    async def webhook_secret(self) -> str:
        return await self._run(self._calls.webhook_secret())

    async def upstreams(self) -> Sequence[dict[str, Any]]:
        """Every upstream's health, circuit, concurrency in use and queue depth, as
        ``GET /v1/admin/upstreams`` gives them (an admin key only)."""
        return await self._run(self._calls.upstreams())

    async def deliveries(self, job: Job | str) -> Sequence[Delivery]:
        """See :meth:`Client.deliveries`."""
        return await self._run(self._calls.deliveries(job))

    # batches

    async def submit_batch(
        self,
        lines: Iterable[Mapping[str, Any]] | str | Path,
        *,
        endpoint: str | None = None,
        webhook: str | None = None,
        completion_window: str = "24h",
    ) -> Batch:
        """See :meth:`Client.submit_batch`."""
        return await self._run(
            self._calls.submit_batch(lines, endpoint, webhook, completion_window)
        )

    async def get_batch(self, batch: Batch | str) -> Batch:
        return await self._run(self._calls.get_batch(batch))

    async def wait_batch(
        self, batch: Batch | str, timeout: float | None = None, *, poll: float = 1.0
    ) -> Batch:
        """See :meth:`Client.wait_batch`."""
        return await self._run(self._calls.wait_batch(batch, timeout, poll))

    def batch_results(self, batch: Batch | str) -> AsyncIterator[BatchResult]:
        """See :meth:`Client.batch_results`."""
        return self._drive(self._calls.batch_results(batch))

    def file_content(self, file_id: str) -> AsyncIterator[bytes]:
        """See :meth:`Client.file_content`."""
        return self._drive(self._calls.file_content(file_id))

    # the I/O

    async def _run(self, flow: _core.Flow[T]) -> T:
        async with contextlib.aclosing(self._drive(_core.returning(flow))) as items:
            async for result in items:
                return cast(T, result)
        raise AssertionError("a call's flow ends with its result")

    async def _drive(self, flow: _core.Items) -> AsyncGenerator[Any, None]:
        """Run ``flow``: do what it asks, hand out what it emits."""
        with contextlib.closing(flow):
            async with contextlib.AsyncExitStack() as opened:
                pieces: AsyncIterator[Any] = _read_nothing()
                reply: Any = None
                while True:
                    try:
                        step = _core.advance(flow, reply)
                    except StopIteration:
                        return
                    reply = None
                    if isinstance(step, _core.Emit):
                        yield step.item
                        continue
                    try:
                        if isinstance(step, _core.Sleep):
                            await asyncio.sleep(step.seconds)
                        elif isinstance(step, _core.Send):
                            reply = await self._http.send(self._request(step))
                        elif isinstance(step, _core.Open):
                            await opened.aclose()  # the answer opened before
                            reply = await self._http.send(self._request(step.send), stream=True)
                            opened.push_async_callback(reply.aclose)
                            if reply.is_error:
                                await reply.aread()
                            reader = _read(reply, step.read)
                            opened.push_async_callback(reader.aclose)
                            pieces = reader
                        else:
                            reply = await anext(pieces, None)
                    except httpx.TransportError as exc:
                        reply = exc

    def _request(self, send: _core.Send) -> httpx.Request:
        content = None if send.content is None else _chunks(send.content)
        return _core.build_request(self._http, send, content)


async def _chunks(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:  # a file's chunks are read in the loop: 1 MB at a time, from disk cache
        yield chunk


async def _read_nothing() -> AsyncIterator[Any]:
    return
    yield


async def _read(response: httpx.Response, read: str) -> AsyncGenerator[Any, None]:
    if read == "events":
        async with contextlib.aclosing(EventSource(response).aiter_sse()) as events:
            async for event in events:
                yield event
    elif read == "lines":
        async for line in response.aiter_lines():
            yield line
    else:
        async for chunk in response.aiter_bytes():
            yield chunk
