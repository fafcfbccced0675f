"""The Python client: :class:`Client` and :class:`AsyncClient`, the same methods, httpx underneath.

    from hookline import Client

    with Client() as client:                       # HOOKLINE_URL, HOOKLINE_API_KEY
        job = client.submit("chat.completions", {"messages": [{"role": "user", "content": "Hi"}]},
                            model="local")
        print(client.wait(job).text)

Every submit carries an idempotency key (a fresh one unless you give yours), so the client can
retry it after a dropped connection without making two jobs. Only such calls are retried
(submits, reads, cancels), and only on transient network errors and 502/503/504, with backoff.
:meth:`Client.stream` follows a job's events and text, reconnecting with ``Last-Event-ID``
after a dropped connection: the text it yields concatenates to exactly the output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

__all__ = [
    "AsyncClient",
    "AuthError",
    "Batch",
    "BatchResult",
    "Client",
    "ClientError",
    "Event",
    "Job",
    "JobFailed",
    "NotFound",
    "RateLimited",
    "TextDelta",
    "Timeout",
]

DEFAULT_URL = "http://127.0.0.1:8000"
_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
_BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_RETRY_STATUSES = frozenset({502, 503, 504})
_LONG_POLL_MAX = 60.0
_Http = TypeVar("_Http", httpx.Client, httpx.AsyncClient)


# --- results


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    status: str
    operation: str
    model: str
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    metadata: dict[str, str]
    raw: dict[str, Any] = dataclasses.field(repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Job:
        return cls(
            id=body["id"], status=body["status"], operation=body["operation"],
            model=body["model"], output=body.get("output"), error=body.get("error"),
            attempts=body.get("attempts", 0), metadata=body.get("metadata") or {}, raw=dict(body),
        )  # fmt: skip

    @property
    def done(self) -> bool:
        return self.status in _TERMINAL

    @property
    def text(self) -> str | None:
        """The generated text (first choice) of a finished chat or completion job."""
        for choice in (self.output or {}).get("choices") or []:
            message = choice.get("message")
            text = message.get("content") if message else choice.get("text")
            if text is not None:
                return str(text)
        return None


@dataclasses.dataclass(frozen=True)
class Event:
    """One event of a job's stream; ``id`` is its resume token."""

    id: str | None
    type: str
    data: dict[str, Any]
    seq: int | None


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """Output text as the model produced it. A ``job.started`` event with a higher ``attempt``
    means the job started over: text of earlier attempts is superseded."""

    text: str
    index: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class Batch:
    id: str
    status: str
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]]
    raw: dict[str, Any] = dataclasses.field(repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Batch:
        counts = body.get("request_counts") or {}
        return cls(
            id=body["id"], status=body["status"], total=counts.get("total", 0),
            completed=counts.get("completed", 0), failed=counts.get("failed", 0),
            output_file_id=body.get("output_file_id"), error_file_id=body.get("error_file_id"),
            errors=(body.get("errors") or {}).get("data") or [], raw=dict(body),
        )  # fmt: skip

    @property
    def done(self) -> bool:
        return self.status in _BATCH_TERMINAL


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """One line of a batch's results: ``ok`` with the upstream's ``body``, or the ``error``."""

    custom_id: str
    ok: bool
    status_code: int | None
    body: dict[str, Any] | None
    error: dict[str, Any] | None

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> BatchResult:
        response = line.get("response") or {}
        status = response.get("status_code")
        ok = status is not None and 200 <= status < 300
        return cls(line["custom_id"], ok, status, response.get("body"), line.get("error"))


# --- errors


class ClientError(Exception):
    """A call to hookline failed; ``status`` and ``problem`` (the problem+json body) if it
    answered."""

    def __init__(
        self, message: str, status: int | None = None, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}


class AuthError(ClientError):
    """The API key is missing, wrong or revoked (401)."""


class NotFound(ClientError):
    """No such job, batch or file for this key's tenant (404)."""


class RateLimited(ClientError):
    """Too many requests (429): try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Timeout(ClientError):
    """The job (or batch) did not finish in the time given; it keeps running."""


class JobFailed(ClientError):
    """The job ended without a result: ``job.status`` is failed, cancelled or expired, and
    ``job.error`` carries the upstream's error."""

    def __init__(self, job: Job) -> None:
        error = job.error or {}
        super().__init__(f"job {job.id} {job.status}: {error.get('message') or error}")
        self.job = job
        self.error = error


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text}
    detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    message = f"{response.status_code}: {detail}"
    kwargs = {"status": response.status_code, "problem": problem}
    if response.status_code == 401:
        raise AuthError(message, **kwargs)
    if response.status_code == 404:
        raise NotFound(message, **kwargs)
    if response.status_code == 429:
        retry_after = response.headers.get("retry-after")
        seconds = float(retry_after) if retry_after and retry_after.isdigit() else None
        raise RateLimited(message, seconds, **kwargs)
    raise ClientError(message, **kwargs)


# --- what both clients share


def _settings(url: str | None, api_key: str | None) -> tuple[str, str]:
    url = url or os.environ.get("HOOKLINE_URL") or DEFAULT_URL
    api_key = api_key or os.environ.get("HOOKLINE_API_KEY")
    if not api_key:
        raise AuthError("no API key: pass api_key= or set HOOKLINE_API_KEY")
    return url.rstrip("/"), api_key


def _point_at(http: _Http, url: str, api_key: str) -> _Http:
    """Aim an httpx client (either kind) at hookline, with the API key."""
    http.base_url = httpx.URL(url)
    http.headers["Authorization"] = f"Bearer {api_key}"
    return http


def _submit_request(
    operation: str,
    input: Mapping[str, Any],
    model: str | None,
    webhook: str | Mapping[str, Any] | None,
    metadata: Mapping[str, str] | None,
    priority: int,
    idempotency_key: str | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    body: dict[str, Any] = {"operation": operation, "input": dict(input), "priority": priority}
    if model is not None:
        body["model"] = model
    if webhook is not None:
        body["webhook"] = {"url": webhook} if isinstance(webhook, str) else dict(webhook)
    if metadata:
        body["metadata"] = dict(metadata)
    return body, {"Idempotency-Key": idempotency_key or f"hk-client-{uuid.uuid4()}"}


def _list_params(status: str | None, operation: str | None, page_size: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": page_size}
    if status:
        params["status"] = status
    if operation:
        params["operation"] = operation
    return params


def _stream_headers(last_id: str | None) -> dict[str, str]:
    """An event stream's request headers; after a drop, where to resume."""
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    return headers


def _backoff(attempt: int) -> float:
    return float(min(4.0, 0.25 * 2**attempt))


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


def _batch_id(batch: Batch | str) -> str:
    return batch.id if isinstance(batch, Batch) else batch


def _jsonl(lines: Iterable[Mapping[str, Any]] | str | Path) -> Iterator[bytes]:
    """The JSONL body, a piece at a time (a file is read in 1 MB chunks, never whole)."""
    if isinstance(lines, str | Path):
        return _file_chunks(Path(lines))
    return (orjson.dumps(line) + b"\n" for line in lines)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            yield chunk


async def _async_chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _batch_params(
    endpoint: str | None, webhook: str | None, completion_window: str
) -> dict[str, str]:
    params = {"completion_window": completion_window}
    if endpoint:
        params["endpoint"] = endpoint
    if webhook:
        params["webhook_url"] = webhook
    return params


class _SSEDecoder:
    """SSE lines in, messages out (``id``, ``event``, ``data``)."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def feed(self, line: str) -> dict[str, str] | None:
        if line == "":
            message, self.fields = self.fields, {}
            return message if "data" in message else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        self.fields[name] = f"{self.fields[name]}\n{value}" if name in self.fields else value
        return None


def _stream_item(message: dict[str, str]) -> Event | TextDelta:
    body = orjson.loads(message["data"])
    if body.get("type") == "job.output.delta":
        data = body["data"]
        return TextDelta(data.get("text", ""), data.get("index", 0), data.get("attempt", 1))
    return Event(message.get("id"), body["type"], body.get("data") or {}, body.get("seq"))


def _is_end(item: Event | TextDelta) -> bool:
    return isinstance(item, Event) and item.type.removeprefix("job.") in _TERMINAL


def _finished(job: Job, raise_on_failure: bool) -> Job:
    if raise_on_failure and job.status in ("failed", "cancelled", "expired"):
        raise JobFailed(job)
    return job


# --- the blocking client


class Client:
    """hookline over HTTP, blocking. ``url`` and ``api_key`` default to ``HOOKLINE_URL`` and
    ``HOOKLINE_API_KEY``; ``retries`` bounds the retries of a transient failure."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.url, api_key = _settings(url, api_key)
        self.retries = retries
        self._http = _point_at(http_client or httpx.Client(timeout=timeout), self.url, api_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One idempotent call, retried on transient failures."""
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(_backoff(attempt))
                continue
            if response.status_code in _RETRY_STATUSES and attempt < self.retries:
                time.sleep(_backoff(attempt))
                continue
            _raise_for(response)
            return response.json()
        raise AssertionError("unreachable")

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
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a job; ``webhook`` a URL or ``{"url", "events"}``."""
        body, headers = _submit_request(
            operation, input, model, webhook, metadata, priority, idempotency_key
        )
        return Job.from_json(self._call("POST", "/v1/jobs", json=body, headers=headers))

    def get(self, job: Job | str) -> Job:
        return Job.from_json(self._call("GET", f"/v1/jobs/{_job_id(job)}"))

    def wait(
        self, job: Job | str, timeout: float | None = None, *, raise_on_failure: bool = True
    ) -> Job:
        """The job once it has ended (long-polling); :class:`JobFailed` if it failed,
        :class:`Timeout` if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _LONG_POLL_MAX if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"job {_job_id(job)} still running after {timeout} s")
            wait = min(left, _LONG_POLL_MAX)
            found = Job.from_json(
                self._call("GET", f"/v1/jobs/{_job_id(job)}", params={"wait": int(max(1, wait))})
            )
            if found.done:
                return _finished(found, raise_on_failure)

    def cancel(self, job: Job | str) -> Job:
        return Job.from_json(self._call("POST", f"/v1/jobs/{_job_id(job)}/cancel"))

    def list(
        self, *, status: str | None = None, operation: str | None = None, page_size: int = 100
    ) -> Iterator[Job]:
        """Every job of the tenant, newest first, page after page."""
        params = _list_params(status, operation, page_size)
        while True:
            page = self._call("GET", "/v1/jobs", params=params)
            yield from (Job.from_json(job) for job in page["data"])
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def stream(self, job: Job | str) -> Iterator[Event | TextDelta]:
        """The job's events and text as they happen, until it ends; a dropped connection is
        resumed where it stopped (``Last-Event-ID``), up to ``retries`` times in a row."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = _stream_headers(last_id)
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{_job_id(job)}/events", headers=headers, timeout=None
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    decoder = _SSEDecoder()
                    for line in response.iter_lines():
                        message = decoder.feed(line)
                        if message is None:
                            continue
                        failures = 0
                        last_id = message.get("id", last_id)
                        item = _stream_item(message)
                        yield item
                        if _is_end(item):
                            return
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise
                time.sleep(_backoff(failures - 1))

    # batches

    def submit_batch(
        self,
        lines: Iterable[Mapping[str, Any]] | str | Path,
        *,
        endpoint: str | None = None,
        webhook: str | None = None,
        completion_window: str = "24h",
    ) -> Batch:
        """A batch from request lines (``{custom_id, method, url, body}``) or a JSONL file."""
        response = self._http.post(
            "/v1/batches", content=_jsonl(lines),
            params=_batch_params(endpoint, webhook, completion_window),
            headers={"Content-Type": "application/jsonl"},
        )  # fmt: skip
        _raise_for(response)
        return Batch.from_json(response.json())

    def get_batch(self, batch: Batch | str) -> Batch:
        return Batch.from_json(self._call("GET", f"/v1/batches/{_batch_id(batch)}"))

    def wait_batch(
        self, batch: Batch | str, timeout: float | None = None, *, poll: float = 1.0
    ) -> Batch:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (found := self.get_batch(batch)).done:
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"batch {found.id} still {found.status} after {timeout} s")
            time.sleep(poll)
        return found

    def batch_results(self, batch: Batch | str) -> Iterator[BatchResult]:
        """Every line of the batch's output file, then of its error file (streamed)."""
        found = batch if isinstance(batch, Batch) and batch.done else self.get_batch(batch)
        for file_id in (found.output_file_id, found.error_file_id):
            if file_id is None:
                continue
            with self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield BatchResult.from_json(orjson.loads(line))


# --- the asyncio client


class AsyncClient:
    """:class:`Client`'s methods for asyncio (``async with``, ``await``, ``async for``)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url, api_key = _settings(url, api_key)
        self.retries = retries
        self._http = _point_at(http_client or httpx.AsyncClient(timeout=timeout), self.url, api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(_backoff(attempt))
                continue
            if response.status_code in _RETRY_STATUSES and attempt < self.retries:
                await asyncio.sleep(_backoff(attempt))
                continue
            _raise_for(response)
            return response.json()
        raise AssertionError("unreachable")

    async def submit(
        self,
        operation: str,
        input: Mapping[str, Any],
        *,
        model: str | None = None,
        webhook: str | Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> Job:
        body, headers = _submit_request(
            operation, input, model, webhook, metadata, priority, idempotency_key
        )
        return Job.from_json(await self._call("POST", "/v1/jobs", json=body, headers=headers))

    async def get(self, job: Job | str) -> Job:
        return Job.from_json(await self._call("GET", f"/v1/jobs/{_job_id(job)}"))

    async def wait(
        self, job: Job | str, timeout: float | None = None, *, raise_on_failure: bool = True
    ) -> Job:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = _LONG_POLL_MAX if deadline is None else deadline - loop.time()
            if left <= 0:
                raise Timeout(f"job {_job_id(job)} still running after {timeout} s")
            params = {"wait": int(max(1, min(left, _LONG_POLL_MAX)))}
            found = Job.from_json(
                await self._call("GET", f"/v1/jobs/{_job_id(job)}", params=params)
            )
            if found.done:
                return _finished(found, raise_on_failure)

    async def cancel(self, job: Job | str) -> Job:
        return Job.from_json(await self._call("POST", f"/v1/jobs/{_job_id(job)}/cancel"))

    async def list(
        self, *, status: str | None = None, operation: str | None = None, page_size: int = 100
    ) -> AsyncIterator[Job]:
        params = _list_params(status, operation, page_size)
        while True:
            page = await self._call("GET", "/v1/jobs", params=params)
            for job in page["data"]:
                yield Job.from_json(job)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    async def stream(self, job: Job | str) -> AsyncIterator[Event | TextDelta]:
        last_id: str | None = None
        failures = 0
        while True:
            headers = _stream_headers(last_id)
            try:
                async with self._http.stream(
                    "GET", f"/v1/jobs/{_job_id(job)}/events", headers=headers, timeout=None
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    decoder = _SSEDecoder()
                    async for line in response.aiter_lines():
                        message = decoder.feed(line)
                        if message is None:
                            continue
                        failures = 0
                        last_id = message.get("id", last_id)
                        item = _stream_item(message)
                        yield item
                        if _is_end(item):
                            return
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise
                await asyncio.sleep(_backoff(failures - 1))

    async def submit_batch(
        self,
        lines: Iterable[Mapping[str, Any]] | str | Path,
        *,
        endpoint: str | None = None,
        webhook: str | None = None,
        completion_window: str = "24h",
    ) -> Batch:
        response = await self._http.post(
            "/v1/batches", content=_async_chunks(_jsonl(lines)),
            params=_batch_params(endpoint, webhook, completion_window),
            headers={"Content-Type": "application/jsonl"},
        )  # fmt: skip
        _raise_for(response)
        return Batch.from_json(response.json())

    async def get_batch(self, batch: Batch | str) -> Batch:
        return Batch.from_json(await self._call("GET", f"/v1/batches/{_batch_id(batch)}"))

    async def wait_batch(
        self, batch: Batch | str, timeout: float | None = None, *, poll: float = 1.0
    ) -> Batch:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not (found := await self.get_batch(batch)).done:
            if deadline is not None and loop.time() >= deadline:
                raise Timeout(f"batch {found.id} still {found.status} after {timeout} s")
            await asyncio.sleep(poll)
        return found

    async def batch_results(self, batch: Batch | str) -> AsyncIterator[BatchResult]:
        found = batch if isinstance(batch, Batch) and batch.done else await self.get_batch(batch)
        for file_id in (found.output_file_id, found.error_file_id):
            if file_id is None:
                continue
            async with self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield BatchResult.from_json(orjson.loads(line))
