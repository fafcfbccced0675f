"""What :class:`~hookline.client.Client` and :class:`~hookline.client.AsyncClient` share: every
call, written once as a *flow* that does no I/O itself.

A flow is a generator that says what to do next and is handed what came of it, the way httpx's
``Auth.auth_flow`` is run by its blocking and its asyncio client alike:

    response = yield Send(...)          the answer, read whole (a transport error is thrown in)
    yield Sleep(seconds)
    response = yield Open(send, read)   the answer, its body unread unless it is an error; then
    item = yield NEXT                     its next SSE event, line or chunk (``read``), None at
                                          the end; an open answer is closed by the next Open or
                                          when the flow ends
    yield Emit(item)                    an item for the caller of an iterating method

``sync.Client._drive`` and ``aio.AsyncClient._drive`` run flows; they differ only in how they
wait. Here are request building, response decoding, retries with backoff, long-polling,
pagination, resuming streams (SSE decoded by httpx-sse) and file chunking.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import httpx
from httpx_sse import ServerSentEvent

from hookline.client.errors import AuthError, JobFailed, Timeout, raise_for_status
from hookline.client.models import (
    JOB_FAILED,
    JOB_TERMINAL,
    Batch,
    BatchResult,
    Delivery,
    Event,
    Job,
    JobPage,
    TextDelta,
)

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({502, 503, 504})
LONG_POLL_MAX = 60.0  # the longest wait the API grants a GET of a job
FILE_CHUNK = 1024 * 1024

T = TypeVar("T")
H = TypeVar("H", httpx.Client, httpx.AsyncClient)


# --- the steps a flow takes


class _ClientDefault(enum.Enum):
    TIMEOUT = enum.auto()


CLIENT_TIMEOUT = _ClientDefault.TIMEOUT  # the timeout the client was made with


@dataclasses.dataclass(frozen=True)
class Send:
    """One request; ``path`` is relative to the gateway's URL."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    content: Iterable[bytes] | None = None
    timeout: float | Literal[_ClientDefault.TIMEOUT] | None = CLIENT_TIMEOUT  # None: no timeout


@dataclasses.dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclasses.dataclass(frozen=True)
class Open:
    """A request whose answer is read a piece at a time: SSE ``events``, ``lines`` or ``bytes``."""

    send: Send
    read: Literal["events", "lines", "bytes"]


class Next:
    """Ask for the next piece of the open answer."""


NEXT = Next()


@dataclasses.dataclass(frozen=True)
class Emit(Generic[T]):
    item: T


Step = Send | Sleep | Open | Next | Emit[Any]
Flow = Generator[Step, Any, T]  # a call: its result is the generator's return value
Items = Generator[Step, Any, None]  # an iterating method: its results are emitted


def advance(flow: Flow[Any], reply: Any) -> Step:
    """The flow's next step, given what came of the last one (an exception is thrown in)."""
    if isinstance(reply, BaseException):
        return flow.throw(reply)
    return flow.send(reply)


def returning(flow: Flow[Any]) -> Items:
    """The flow with its result emitted at the end: how the drivers get a call's result (an
    async generator cannot return one)."""
    yield Emit((yield from flow))


def build_request(
    http: httpx.Client | httpx.AsyncClient, send: Send, content: Any = None
) -> httpx.Request:
    """The httpx request for ``send``; ``content`` is its body as the client type needs it."""
    timeout = httpx.USE_CLIENT_DEFAULT if send.timeout is CLIENT_TIMEOUT else send.timeout
    return http.build_request(
        send.method, send.path, params=send.params, json=send.json, headers=send.headers,
        content=content, timeout=timeout,
    )  # fmt: skip


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (from 0): 0.25, 0.5, 1, 2, then 4 at most."""
    return float(min(4.0, 0.25 * 2**attempt))


def decode_sse(sse: ServerSentEvent) -> Event | TextDelta:
    """A job stream's message as an event or, for output text, a :class:`TextDelta`."""
    body = json.loads(sse.data)
    if body.get("type") == "job.output.delta":
        data = body["data"]
        return TextDelta(data.get("text", ""), data.get("index", 0), data.get("attempt", 1))
    return Event.from_json(sse.id or None, body)


def _ends_job(item: Event | TextDelta) -> bool:
    return isinstance(item, Event) and item.type.removeprefix("job.") in JOB_TERMINAL


def jsonl(lines: Iterable[Mapping[str, Any]] | str | Path) -> Iterator[bytes]:
    """A JSONL body, a piece at a time: request dicts, or a file read in 1 MB chunks."""
    if isinstance(lines, str | Path):
        return file_chunks(Path(lines))
    return (json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)


def file_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes in 1 MB chunks, never whole in memory."""
    with path.open("rb") as handle:
        while chunk := handle.read(FILE_CHUNK):
            yield chunk


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


def _batch_id(batch: Batch | str) -> str:
    return batch.id if isinstance(batch, Batch) else batch


def _stream_headers(last_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    return headers


# --- the calls


class Calls:
    """The client's methods as flows, for one gateway and key. ``url`` and ``api_key`` default to
    ``HOOKLINE_URL`` and ``HOOKLINE_API_KEY``; :class:`AuthError` without a key."""

    def __init__(self, url: str | None, api_key: str | None, *, timeout: float, retries: int):
        url = url or os.environ.get("HOOKLINE_URL") or DEFAULT_URL
        api_key = api_key or os.environ.get("HOOKLINE_API_KEY")
        if not api_key:
            raise AuthError("no API key: pass api_key= or set HOOKLINE_API_KEY")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries

    def aim(self, http: H) -> H:
        """Point an httpx client (either kind) at the gateway, with the API key."""
        http.base_url = httpx.URL(self.url)
        http.headers["Authorization"] = f"Bearer {self.api_key}"
        return http

    def call(self, send: Send) -> Flow[Any]:
        """``send``, retried on transport errors and on 502/503/504 up to ``retries`` times with
        backoff (only for requests safe to repeat); the answer's JSON, or its ClientError."""
        attempt = 0
        while True:
            try:
                response: httpx.Response = yield send
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    raise_for_status(response)
                    return response.json()
            yield Sleep(backoff(attempt))
            attempt += 1

    def call_once(self, send: Send) -> Flow[Any]:
        """``send`` once (its body can be sent only once); the answer's JSON, or its ClientError."""
        response: httpx.Response = yield send
        raise_for_status(response)
        return response.json()

    # jobs

    def submit(
        self,
        operation: str,
        input: Any,
        *,
        model: str | None,
        webhook: str | Mapping[str, Any] | None,
        metadata: Mapping[str, str] | None,
        priority: int,
        ttl_seconds: float | None,
        idempotency_key: str | None,
    ) -> Flow[Job]:
        body: dict[str, Any] = {"operation": operation, "input": input, "priority": priority}
        if model is not None:
            body["model"] = model
        if webhook is not None:
            body["webhook"] = {"url": webhook} if isinstance(webhook, str) else dict(webhook)
        if metadata:
            body["metadata"] = dict(metadata)
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        # Always a key: a submit retried after a lost answer finds the job the first one made.
        headers = {"Idempotency-Key": idempotency_key or f"hk-client-{uuid.uuid4()}"}
        created = yield from self.call(Send("POST", "/v1/jobs", json=body, headers=headers))
        return Job.from_json(created)

    def get(self, job: Job | str) -> Flow[Job]:
        found = yield from self.call(Send("GET", f"/v1/jobs/{_job_id(job)}"))
        return Job.from_json(found)

    def wait(self, job: Job | str, timeout: float | None, raise_on_failure: bool) -> Flow[Job]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL_MAX if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"job {_job_id(job)} still running after {timeout} s")
            wait = int(max(1, min(left, LONG_POLL_MAX)))
            poll = Send(
                "GET", f"/v1/jobs/{_job_id(job)}", params={"wait": wait},
                timeout=self.timeout + wait,  # the answer comes after up to `wait` seconds
            )  # fmt: skip
            found = Job.from_json((yield from self.call(poll)))
            if found.done:
                if raise_on_failure and found.status in JOB_FAILED:
                    raise JobFailed(found)
                return found

    def cancel(self, job: Job | str) -> Flow[Job]:
        cancelled = yield from self.call(Send("POST", f"/v1/jobs/{_job_id(job)}/cancel"))
        return Job.from_json(cancelled)

    def list_page(
        self,
        status: str | Sequence[str] | None,
        operation: str | Sequence[str] | None,
        limit: int,
        cursor: str | None,
    ) -> Flow[JobPage]:
        params: dict[str, Any] = {"limit": limit}
        for name, value in (("status", status), ("operation", operation), ("cursor", cursor)):
            if value:
                params[name] = value if isinstance(value, str) else list(value)
        page = yield from self.call(Send("GET", "/v1/jobs", params=params))
        return JobPage.from_json(page)

    def list(
        self,
        status: str | Sequence[str] | None,
        operation: str | Sequence[str] | None,
        page_size: int,
    ) -> Items:
        cursor = None
        while True:
            page = yield from self.list_page(status, operation, page_size, cursor)
            for job in page.jobs:
                yield Emit(job)
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def stream(self, job: Job | str) -> Items:
        """A job's events and text until its terminal event, reconnecting with ``Last-Event-ID``
        after a drop (``retries`` times in a row at most)."""
        path = f"/v1/jobs/{_job_id(job)}/events"
        last_id: str | None = None
        failures = 0
        while True:
            try:
                headers = _stream_headers(last_id)
                response = yield Open(Send("GET", path, headers=headers, timeout=None), "events")
                raise_for_status(response)
                while (sse := (yield NEXT)) is not None:
                    if not sse.data:  # a heartbeat's blank line
                        continue
                    failures = 0
                    last_id = sse.id or last_id
                    item = decode_sse(sse)
                    yield Emit(item)
                    if _ends_job(item):
                        return
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise
                yield Sleep(backoff(failures - 1))

    def events(self, after: str | int, types: Sequence[str]) -> Items:
        """Every event of the tenant after ``after`` (an event id, or "latest"), without end,
        reconnecting with ``Last-Event-ID`` after a drop (``retries`` times in a row at most)."""
        params = {"after": str(after), "type": list(types)}
        last_id: str | None = None
        failures = 0
        while True:
            try:
                headers = _stream_headers(last_id)
                send = Send("GET", "/v1/events", params=params, headers=headers, timeout=None)
                raise_for_status((yield Open(send, "events")))
                while (sse := (yield NEXT)) is not None:
                    if not sse.data:
                        continue
                    failures = 0
                    last_id = sse.id or last_id
                    yield Emit(Event.from_json(sse.id or None, json.loads(sse.data)))
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise
                yield Sleep(backoff(failures - 1))

    def webhook_secret(self) -> Flow[str]:
        found = yield from self.call(Send("GET", "/v1/webhook-secret"))
        return str(found["secret"])

    def upstreams(self) -> Flow[Sequence[dict[str, Any]]]:
        found = yield from self.call(Send("GET", "/v1/admin/upstreams"))
        data: Sequence[dict[str, Any]] = found["data"]
        return data

    def deliveries(self, job: Job | str) -> Flow[Sequence[Delivery]]:
        params = {"job_id": _job_id(job), "limit": 200}  # one per webhook and event type: a few
        found = yield from self.call(Send("GET", "/v1/deliveries", params=params))
        return [Delivery.from_json(body) for body in found["data"]]

    # batches

    def submit_batch(
        self,
        lines: Iterable[Mapping[str, Any]] | str | Path,
        endpoint: str | None,
        webhook: str | None,
        completion_window: str,
    ) -> Flow[Batch]:
        params = {"completion_window": completion_window}
        if endpoint:
            params["endpoint"] = endpoint
        if webhook:
            params["webhook_url"] = webhook
        send = Send(
            "POST", "/v1/batches", params=params, content=jsonl(lines),
            headers={"Content-Type": "application/jsonl"},
        )  # fmt: skip
        created = yield from self.call_once(send)
        return Batch.from_json(created)

    def get_batch(self, batch: Batch | str) -> Flow[Batch]:
        found = yield from self.call(Send("GET", f"/v1/batches/{_batch_id(batch)}"))
        return Batch.from_json(found)

    def wait_batch(self, batch: Batch | str, timeout: float | None, poll: float) -> Flow[Batch]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (found := (yield from self.get_batch(batch))).done:
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"batch {found.id} still {found.status} after {timeout} s")
            yield Sleep(poll)
        return found

    def batch_results(self, batch: Batch | str) -> Items:
        found = batch if isinstance(batch, Batch) and batch.done else None
        if found is None:
            found = yield from self.get_batch(batch)
        for file_id in (found.output_file_id, found.error_file_id):
            if file_id is None:
                continue
            raise_for_status((yield Open(Send("GET", f"/v1/files/{file_id}/content"), "lines")))
            while (line := (yield NEXT)) is not None:
                if line.strip():
                    yield Emit(BatchResult.from_json(json.loads(line)))

    def file_content(self, file_id: str) -> Items:
        raise_for_status((yield Open(Send("GET", f"/v1/files/{file_id}/content"), "bytes")))
        while (chunk := (yield NEXT)) is not None:
            yield Emit(chunk)
