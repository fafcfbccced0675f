"""The blocking client. Each method runs a flow of :mod:`hookline.client._core`; this module only
does the I/O (see :meth:`Client._drive`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
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


class Client:
    """hookline over HTTP, blocking. ``url`` and ``api_key`` default to ``HOOKLINE_URL`` and
    ``HOOKLINE_API_KEY``; ``timeout`` is each request's (long-polls add their wait to it);
    ``retries`` bounds the retries of a transient failure."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._calls = _core.Calls(url, api_key, timeout=timeout, retries=retries)
        self.url = self._calls.url
        self.retries = retries
        self._http = self._calls.aim(http_client or httpx.Client(timeout=timeout))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # jobs

    def submit(
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
        """Queue a job; ``webhook`` a URL or ``{"url", "events"}``. Without an
        ``idempotency_key`` one is made, so that a retried submit makes one job."""
        return self._run(
            self._calls.submit(
                operation, input, model=model, webhook=webhook, metadata=metadata,
                priority=priority, ttl_seconds=ttl_seconds, idempotency_key=idempotency_key,
            )
        )  # fmt: skip

    def get(self, job: Job | str) -> Job:
        """The job now."""
        return self._run(self._calls.get(job))

    def wait(
        self, job: Job | str, timeout: float | None = None, *, raise_on_failure: bool = True
    ) -> Job:
        """The job once it has ended (long-polling); :class:`JobFailed` if it failed,
        :class:`Timeout` if ``timeout`` seconds passed first."""
        return self._run(self._calls.wait(job, timeout, raise_on_failure))

    def cancel(self, job: Job | str) -> Job:
        """Cancel the job (a running job's upstream call is aborted); the job after it."""
        return self._run(self._calls.cancel(job))

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        operation: str | Sequence[str] | None = None,
        page_size: int = 100,
    ) -> Iterator[Job]:
        """Every job of the tenant, newest first, page after page."""
        return self._drive(self._calls.list(status, operation, page_size))

    def list_page(
        self,
        *,
        status: str | Sequence[str] | None = None,
        operation: str | Sequence[str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of the job list, newest first; pass its ``next_cursor`` for the next."""
        return self._run(self._calls.list_page(status, operation, limit, cursor))

    def stream(self, job: Job | str) -> Iterator[Event | TextDelta]:
        """The job's events and text as they happen, until it ends; a dropped connection is
        resumed where it stopped (``Last-Event-ID``), up to ``retries`` times in a row."""
        return self._drive(self._calls.stream(job))

    def events(self, *, after: str | int = "latest", types: Sequence[str] = ()) -> Iterator[Event]:
        """Every event of the tenant's jobs and batches after event ``after`` ("latest": from
        now on), only ``types`` if given, without end; resumed like :meth:`stream`."""
        return self._drive(self._calls.events(after, types))

    def webhook_secret(self) -> str:
        """The tenant's secret that signs its jobs' webhooks."""
        return self._run(self._calls.webhook_secret())

    def upstreams(self) -> Sequence[dict[str, Any]]:
        """Every upstream's health, circuit, concurrency in use and queue depth, as
        ``GET /v1/admin/upstreams`` gives them (an admin key only)."""
        return self._run(self._calls.upstreams())

    def deliveries(self, job: Job | str) -> Sequence[Delivery]:
        """The webhook messages of ``job``, newest first, as they stand now."""
        return self._run(self._calls.deliveries(job))

    # batches

    def submit_batch(
        self,
        lines: Iterable[Mapping[str, Any]] | str | Path,
        *,
        endpoint: str | None = None,
        webhook: str | None = None,
        completion_window: str = "24h",
    ) -> Batch:
        """A batch from request lines (``{custom_id, method, url, body}``) or a JSONL file, which
        is streamed. Not retried: its body is sent once."""
        return self._run(self._calls.submit_batch(lines, endpoint, webhook, completion_window))

    def get_batch(self, batch: Batch | str) -> Batch:
        """The batch now."""
        return self._run(self._calls.get_batch(batch))

    def wait_batch(
        self, batch: Batch | str, timeout: float | None = None, *, poll: float = 1.0
    ) -> Batch:
        """The batch once it has ended, read every ``poll`` seconds; :class:`Timeout` if
        ``timeout`` seconds passed first."""
        return self._run(self._calls.wait_batch(batch, timeout, poll))

    def batch_results(self, batch: Batch | str) -> Iterator[BatchResult]:
        """Every line of the batch's output file, then of its error file (streamed)."""
        return self._drive(self._calls.batch_results(batch))

    def file_content(self, file_id: str) -> Iterator[bytes]:
        """A file's bytes (a batch's input, output or errors), streamed."""
        return self._drive(self._calls.file_content(file_id))

    # the I/O

    def _run(self, flow: _core.Flow[T]) -> T:
        with contextlib.closing(self._drive(_core.returning(flow))) as items:
            for result in items:
                return cast(T, result)
        raise AssertionError("a call's flow ends with its result")

    def _drive(self, flow: _core.Items) -> Generator[Any, None, None]:
        """Run ``flow``: do what it asks, hand out what it emits."""
        with contextlib.closing(flow), contextlib.ExitStack() as opened:
            pieces: Iterator[Any] = iter(())
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
                        time.sleep(step.seconds)
                    elif isinstance(step, _core.Send):
                        reply = self._http.send(self._request(step))
                    elif isinstance(step, _core.Open):
                        opened.close()  # the answer opened before
                        reply = self._http.send(self._request(step.send), stream=True)
                        opened.callback(reply.close)
                        if reply.is_error:
                            reply.read()
                        reader = _read(reply, step.read)
                        opened.callback(reader.close)
                        pieces = reader
                    else:
                        reply = next(pieces, None)
                except httpx.TransportError as exc:
                    reply = exc

    def _request(self, send: _core.Send) -> httpx.Request:
        return _core.build_request(self._http, send, send.content)


def _read(response: httpx.Response, read: str) -> Generator[Any, None, None]:
    if read == "events":
        yield from EventSource(response).iter_sse()
    elif read == "lines":
        yield from response.iter_lines()
    else:
        yield from response.iter_bytes()
