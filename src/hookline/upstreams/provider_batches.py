"""Providers' own batch APIs, as clients: OpenAI's Batch API (``/files`` + ``/batches``, also
offered by OpenAI-compatible servers such as vLLM's and Azure's) and Anthropic's Message Batches
(``/messages/batches``). :mod:`hookline.batches.provider` drives them; each client only speaks its
provider's protocol: a request line for an item, create (upload first, for OpenAI), look up by
the hookline batch it belongs to, retrieve, cancel, and the results, read a line at a time.

Every answer is bounded before it is kept: a results line longer than the upstream's
``max_output_bytes`` is that item's failure, never held whole in memory; a JSON answer is read
up to the same limit. Failures are :class:`~hookline.upstreams.base.UpstreamError`, retryable
or not, with the provider's ``retry-after`` when it gave one.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any, ClassVar, Literal, Protocol

import aiohttp
import orjson

from hookline.config import UpstreamConfig
from hookline.httputil import parse_retry_after
from hookline.jobs import Operation
from hookline.upstreams.anthropic import chat_completion, messages_request
from hookline.upstreams.base import UpstreamError, bad_response
from hookline.upstreams.openai import json_object, read_body, read_error_body

ResultKind = Literal["succeeded", "failed", "cancelled", "expired"]
# How a provider batch ended, as far as its items that have no result line go.
Outcome = Literal["completed", "failed", "expired", "cancelled"]
_LOOKUP_SLACK_S = 300  # a batch created this long before the recorded attempt still matches
_LOOKUP_PAGES = 20  # of 100 batches each


@dataclasses.dataclass(frozen=True)
class ProviderState:
    """A provider batch as its provider shows it."""

    id: str
    status: str  # the provider's own word
    ended: bool
    outcome: Outcome | None  # once ended
    completed: int
    failed: int
    total: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    poll_after: float | None = None  # seconds the provider asked to wait before the next look


@dataclasses.dataclass(frozen=True)
class ProviderResult:
    """One item's result: ``custom_id`` is the item's job id."""

    custom_id: str
    kind: ResultKind
    output: dict[str, Any] | None = None
    status: int | None = None
    body: Any = None
    message: str = ""


class Uploads(Protocol):
    """Where a part keeps the id of the file its lines were uploaded as."""

    @property
    def file_id(self) -> str | None: ...

    async def keep(self, file_id: str) -> None: ...


class ProviderBatchAPI(abc.ABC):
    """One upstream's batch API."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        assert config.base_url is not None
        self.base_url = config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0  # HTTP requests made (the benchmark reports them)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"User-Agent": "hookline", **self._auth_headers()}
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10.0, sock_read=self.config.idle_timeout_seconds
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @abc.abstractmethod
    def _auth_headers(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def line(self, custom_id: str, operation: Operation, body: dict[str, Any]) -> bytes:
        """The request of one item as this provider's batch takes it (raises
        :class:`UpstreamError` for a request it cannot express)."""

    @abc.abstractmethod
    async def create(
        self,
        lines: AsyncIterator[bytes],
        endpoint: str,
        metadata: Mapping[str, str],
        uploads: Uploads | None = None,
    ) -> ProviderState:
        """Send the lines (from :meth:`line`) as one provider batch. Where the provider takes
        them as a file first, ``uploads`` keeps the file's id: an attempt after a crash creates
        the batch from the file already uploaded instead of uploading it again."""

    @abc.abstractmethod
    async def find(
        self,
        metadata: Mapping[str, str],
        since_ms: int,
        requests: int,
        taken: Collection[str] = frozenset(),
    ) -> ProviderState | None:
        """The provider batch created for ``metadata`` (a creation whose answer was lost), if
        any, created at or after ``since_ms`` (less some slack) with ``requests`` requests, and
        none of ``taken`` (the ids other parts have recorded)."""

    @abc.abstractmethod
    async def retrieve(self, batch_id: str) -> ProviderState: ...

    @abc.abstractmethod
    async def cancel(self, batch_id: str) -> ProviderState: ...

    @abc.abstractmethod
    def results(self, state: ProviderState) -> AsyncIterator[ProviderResult]:
        """Every result line of an ended batch, in the provider's order."""

    # --- HTTP

    async def _json(
        self, method: str, path_or_url: str, *, limit: int = 16 * 1024 * 1024, **kwargs: Any
    ) -> tuple[dict[str, Any], float | None]:
        """The JSON object an endpoint answers, and the wait it asks for before the next look."""
        url = path_or_url if "://" in path_or_url else self.base_url + path_or_url
        self.calls += 1
        return await request_json(self.session, method, url, limit, **kwargs)

    async def _lines(self, url: str) -> AsyncIterator[bytes | None]:
        """The lines of a JSONL download, each at most ``max_output_bytes`` (a longer one comes
        as None and is never held whole)."""
        limit = self.config.max_output_bytes
        self.calls += 1
        try:
            async with self.session.get(url) as response:
                if response.status >= 400:
                    raise UpstreamError.from_status(
                        response.status,
                        await read_error_body(response),
                        _poll_hint(response.headers),
                    )
                pending = bytearray()
                too_long = False
                async for chunk in response.content.iter_any():
                    *complete, rest = chunk.split(b"\n")
                    for part in complete:
                        if too_long or len(pending) + len(part) > limit:
                            yield None
                        elif (raw := bytes(pending + part) if pending else part).strip():
                            yield raw
                        pending.clear()
                        too_long = False
                    if not too_long:
                        pending += rest
                        if len(pending) > limit:
                            too_long = True
                            pending.clear()
                if too_long:
                    yield None
                elif pending.strip():
                    yield bytes(pending)
        except UpstreamError:
            raise
        except TimeoutError as exc:
            raise UpstreamError("upstream_timeout", "the results stopped coming",
                                retryable=True) from exc  # fmt: skip
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                "upstream_unreachable", f"reading the results failed: {exc}", retryable=True
            ) from exc


async def request_json(
    session: aiohttp.ClientSession, method: str, url: str, limit: int, **kwargs: Any
) -> tuple[dict[str, Any], float | None]:
    """The JSON object a provider's endpoint answers (at most ``limit`` bytes), and the wait it
    asks for before the next look; every failure as an :class:`UpstreamError`."""
    try:
        async with session.request(method, url, **kwargs) as response:
            hint = _poll_hint(response.headers)
            if response.status >= 400:
                raise UpstreamError.from_status(
                    response.status, await read_error_body(response), hint
                )
            return json_object(await read_body(response, limit)), hint
    except UpstreamError:
        raise
    except TimeoutError as exc:
        raise UpstreamError("upstream_timeout", f"{method} {url}: no answer in time",
                            retryable=True) from exc  # fmt: skip
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(
            "upstream_unreachable", f"cannot reach the upstream: {exc}", retryable=True
        ) from exc


def _poll_hint(headers: Mapping[str, str]) -> float | None:
    """The wait a provider asks for: ``openai-poll-after-ms``, else ``retry-after``."""
    after_ms = headers.get("openai-poll-after-ms")
    if after_ms:
        try:
            return max(0.0, float(after_ms) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _too_long(custom_id: str = "") -> ProviderResult:
    return ProviderResult(custom_id, "failed", status=502,
                          message="the provider's result line passed max_output_bytes")  # fmt: skip


# --- OpenAI


class OpenAIBatches(ProviderBatchAPI):
    """OpenAI's Batch API: the lines uploaded as a file (purpose ``batch``), a batch created
    from it with ``metadata``, its ``output_file_id`` and ``error_file_id`` read at the end."""

    _ENDED: ClassVar[dict[str, Outcome]] = {
        "completed": "completed", "failed": "failed", "expired": "expired",
        "cancelled": "cancelled",
    }  # fmt: skip

    def _auth_headers(self) -> dict[str, str]:
        key = self.config.resolved_api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def line(self, custom_id: str, operation: Operation, body: dict[str, Any]) -> bytes:
        request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        url = "/v1" + operation.path
        return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": request})

    async def create(
        self,
        lines: AsyncIterator[bytes],
        endpoint: str,
        metadata: Mapping[str, str],
        uploads: Uploads | None = None,
    ) -> ProviderState:
        file_id = uploads.file_id if uploads is not None else None
        if file_id is None:
            file_id = await self._upload(lines, metadata)
            if uploads is not None:
                await uploads.keep(file_id)
        request = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                   "metadata": dict(metadata)}  # fmt: skip
        created, hint = await self._json("POST", "/batches", json=request)
        return dataclasses.replace(self._state(created, hint), file_id=file_id)

    async def _upload(self, lines: AsyncIterator[bytes], metadata: Mapping[str, str]) -> str:
        async def jsonl() -> AsyncIterator[bytes]:
            async for line in lines:
                yield line + b"\n"

        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        name = f"hookline-{'-'.join(metadata.values())}.jsonl"
        form.add_field("file", jsonl(), filename=name, content_type="application/jsonl")
        uploaded, _ = await self._json("POST", "/files", data=form)
        file_id = str(uploaded.get("id") or "")
        if not file_id:
            raise bad_response("the file upload answered no id")
        return file_id

    async def find(
        self,
        metadata: Mapping[str, str],
        since_ms: int,
        requests: int,
        taken: Collection[str] = frozenset(),
    ) -> ProviderState | None:
        after: str | None = None
        since = since_ms // 1000 - _LOOKUP_SLACK_S
        for _ in range(_LOOKUP_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            page, _ = await self._json("GET", "/batches", params=params)
            data = page.get("data") or []
            for batch in data:
                found = batch.get("metadata") or {}
                if batch.get("id") in taken:
                    continue
                if all(found.get(k) == v for k, v in metadata.items()):
                    return self._state(batch, None)
            if not page.get("has_more") or not data:
                return None
            if _int(data[-1].get("created_at")) < since:  # newest first: older ones follow
                return None
            after = str(data[-1].get("id"))
        return None

    async def retrieve(self, batch_id: str) -> ProviderState:
        return self._state(*await self._json("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> ProviderState:
        return self._state(*await self._json("POST", f"/batches/{batch_id}/cancel"))

    def _state(self, batch: dict[str, Any], hint: float | None) -> ProviderState:
        status = str(batch.get("status") or "")
        counts = batch.get("request_counts") or {}
        errors = (batch.get("errors") or {}).get("data") if batch.get("errors") else None
        outcome = self._ENDED.get(status)
        return ProviderState(
            id=str(batch.get("id")), status=status, ended=outcome is not None,
            outcome=outcome,
            completed=_int(counts.get("completed")), failed=_int(counts.get("failed")),
            total=_int(counts.get("total")), output_file_id=batch.get("output_file_id"),
            error_file_id=batch.get("error_file_id"), file_id=batch.get("input_file_id"),
            errors=errors if isinstance(errors, list) else None, poll_after=hint,
        )  # fmt: skip

    async def results(self, state: ProviderState) -> AsyncIterator[ProviderResult]:
        for file_id in (state.output_file_id, state.error_file_id):
            if not file_id:
                continue
            async for raw in self._lines(f"{self.base_url}/files/{file_id}/content"):
                yield _openai_result(raw)


def _openai_result(raw: bytes | None) -> ProviderResult:
    if raw is None:
        return _too_long()
    try:
        line = orjson.loads(raw)
        custom_id = str(line["custom_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise bad_response(f"a result line is not a batch result: {exc}") from exc
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict) and response.get("status_code") is not None:
        status = _int(response.get("status_code"))
        body = response.get("body")
        if status < 400 and isinstance(body, dict):
            return ProviderResult(custom_id, "succeeded", output=body, status=status)
        message = str((body or {}).get("error", {}).get("message") if isinstance(body, dict)
                      and isinstance(body.get("error"), dict) else f"HTTP {status}")  # fmt: skip
        return ProviderResult(custom_id, "failed", status=status, body=body, message=message)
    error = error if isinstance(error, dict) else {}
    code = str(error.get("code") or "")
    message = str(error.get("message") or code or "the provider reported no result")
    kind: ResultKind = {"batch_expired": "expired", "batch_cancelled": "cancelled"}.get(
        code, "failed"
    )  # type: ignore[assignment]
    return ProviderResult(custom_id, kind, status=None, body={"error": error}, message=message)


# --- Anthropic


class AnthropicBatches(ProviderBatchAPI):
    """Anthropic's Message Batches: the requests posted together, the batch followed by its
    ``processing_status``, the results read from its ``results_url`` (in any order), each
    translated as the Anthropic upstream translates one call. A Message Batch has no metadata:
    a creation whose answer was lost is found by its time and its number of requests."""

    def _auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.config.anthropic_version}
        if key := self.config.resolved_api_key():
            headers["x-api-key"] = key
        return headers

    def line(self, custom_id: str, operation: Operation, body: dict[str, Any]) -> bytes:
        if operation is not Operation.CHAT_COMPLETIONS:
            raise UpstreamError("unsupported_operation",
                                f"Anthropic's batches run chat.completions, not {operation.value}")  # fmt: skip
        params = messages_request(body, self.config.default_max_tokens)
        return orjson.dumps({"custom_id": custom_id, "params": params})

    async def create(
        self,
        lines: AsyncIterator[bytes],
        endpoint: str,
        metadata: Mapping[str, str],
        uploads: Uploads | None = None,
    ) -> ProviderState:
        async def body() -> AsyncIterator[bytes]:
            yield b'{"requests":['
            first = True
            async for line in lines:
                yield line if first else b"," + line
                first = False
            yield b"]}"

        headers = {"Content-Type": "application/json"}
        return self._state(
            *await self._json("POST", "/messages/batches", data=body(), headers=headers)
        )

    async def find(
        self,
        metadata: Mapping[str, str],
        since_ms: int,
        requests: int,
        taken: Collection[str] = frozenset(),
    ) -> ProviderState | None:
        # Message batches carry no metadata: the match is one created since the attempt, of the
        # same number of requests, that no other part has recorded.
        after: str | None = None
        since = since_ms / 1000 - _LOOKUP_SLACK_S
        for _ in range(_LOOKUP_PAGES):
            params = {"limit": "100", **({"after_id": after} if after else {})}
            page, _ = await self._json("GET", "/messages/batches", params=params)
            data = page.get("data") or []
            for batch in data:
                state = self._state(batch, None)
                if state.id in taken:
                    continue
                if _seconds(batch.get("created_at")) >= since and state.total == requests:
                    return state
            if not page.get("has_more") or not data:
                return None
            if _seconds(data[-1].get("created_at")) < since:
                return None
            after = str(page.get("last_id") or data[-1].get("id"))
        return None

    async def retrieve(self, batch_id: str) -> ProviderState:
        return self._state(*await self._json("GET", f"/messages/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> ProviderState:
        return self._state(*await self._json("POST", f"/messages/batches/{batch_id}/cancel"))

    def _state(self, batch: dict[str, Any], hint: float | None) -> ProviderState:
        status = str(batch.get("processing_status") or "")
        counts = batch.get("request_counts") or {}
        succeeded = _int(counts.get("succeeded"))
        failed = sum(_int(counts.get(k)) for k in ("errored", "canceled", "expired"))
        ended = status == "ended"
        return ProviderState(
            id=str(batch.get("id")), status=status, ended=ended,
            outcome="completed" if ended else None, completed=succeeded, failed=failed,
            total=succeeded + failed + _int(counts.get("processing")),
            results_url=batch.get("results_url"), poll_after=hint,
        )  # fmt: skip

    async def results(self, state: ProviderState) -> AsyncIterator[ProviderResult]:
        if not state.results_url:
            return
        async for raw in self._lines(state.results_url):
            yield _anthropic_result(raw)


def _seconds(value: Any) -> float:
    """An RFC 3339 time as epoch seconds (0 when it is not one)."""
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _anthropic_result(raw: bytes | None) -> ProviderResult:
    if raw is None:
        return _too_long()
    try:
        line = orjson.loads(raw)
        custom_id = str(line["custom_id"])
        result = line["result"]
        kind = result["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise bad_response(f"a result line is not a Message Batch result: {exc}") from exc
    if kind == "succeeded":
        try:
            return ProviderResult(custom_id, "succeeded", output=chat_completion(result["message"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            message = f"the result is not a Message: {exc!r}"[:300]
            return ProviderResult(custom_id, "failed", status=502, message=message)
    if kind == "canceled":
        return ProviderResult(custom_id, "cancelled", message="cancelled at the provider")
    if kind == "expired":
        return ProviderResult(custom_id, "expired", message="expired at the provider")
    error = result.get("error")
    error = error if isinstance(error, dict) else {}
    inner = error["error"] if isinstance(error.get("error"), dict) else error
    message = str(inner.get("message") or "the provider reported an error")
    status = 400 if inner.get("type") == "invalid_request_error" else 500
    return ProviderResult(custom_id, "failed", status=status, body=error, message=message)


def batch_client(config: UpstreamConfig) -> ProviderBatchAPI:
    """The batch API of an upstream (one whose ``runs_batches``)."""
    if config.type == "anthropic":
        return AnthropicBatches(config)
    if config.type == "openai":
        return OpenAIBatches(config)
    raise ValueError(f"upstream {config.name!r} (type {config.type}) has no batch API")
