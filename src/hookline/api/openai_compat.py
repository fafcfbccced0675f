"""The OpenAI-compatible front door: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models``, in OpenAI's request and response formats.

Every call is a durable job (its id in the ``Hookline-Job-Id`` header). The upstream call belongs
to the job, not to the HTTP connection: a client that disconnects does not abort it, and can
reattach to the result and events through the job API instead of paying twice. With
``stream: true`` the job's live output is relayed as ``chat.completion.chunk`` (or
``text_completion``) events ending with ``data: [DONE]``; ``Prefer: respond-async`` answers
``202`` with the job at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from hookline.api.problems import json_response, problem
from hookline.api.schemas import JobCreate
from hookline.api.sse_relay import SSERelayResponse
from hookline.errors import InvalidRequest
from hookline.events import EventType
from hookline.gateway import Gateway
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation, job_json
from hookline.live import LiveDelta, StreamCursor, Subscription
from hookline.queue import SubmitRequest
from hookline.streams import job_stream

router = APIRouter(prefix="/v1", tags=["openai"])

_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


@router.post(
    "/chat/completions",
    summary="OpenAI chat completions, as a durable job",
    openapi_extra=_REQUEST_BODY,
)
async def chat_completions(request: Request) -> Response:
    return await _call(request, Operation.CHAT_COMPLETIONS)


@router.post(
    "/completions", summary="OpenAI completions, as a durable job", openapi_extra=_REQUEST_BODY
)
async def completions(request: Request) -> Response:
    return await _call(request, Operation.COMPLETIONS)


@router.post(
    "/embeddings", summary="OpenAI embeddings, as a durable job", openapi_extra=_REQUEST_BODY
)
async def embeddings(request: Request) -> Response:
    return await _call(request, Operation.EMBEDDINGS)


@router.get("/models", summary="The models the configured upstreams serve (OpenAI format)")
async def models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    await gateway.keys.tenant_for(request.headers.get("authorization"))
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": upstream.name}
        for upstream in gateway.settings.upstreams
        for model in upstream.models
        if not any(c in model for c in "*?[")  # patterns route; they are not models
    ]
    return json_response({"object": "list", "data": data})


@dataclasses.dataclass(frozen=True)
class _FacadeCall:
    """An OpenAI request, understood: the job to submit and how the caller wants the answer."""

    submission: SubmitRequest
    stream: bool
    include_usage: bool
    respond_async: bool


async def _call(request: Request, operation: Operation) -> Response:
    gateway: Gateway = request.app.state.gateway
    tenant = await gateway.keys.tenant_for(request.headers.get("authorization"))
    call = _understand(gateway, request, await request.body(), operation)
    job, watching = await _accept(gateway, tenant, call)
    job_headers = {"Hookline-Job-Id": job.id, "Location": f"/v1/jobs/{job.id}"}
    if call.respond_async:
        applied = {**job_headers, "Preference-Applied": "respond-async"}
        return json_response(job_json(job), 202, applied)
    if call.stream:
        relay = _chunks(gateway, tenant, job, operation, call.include_usage, watching)
        response = _openai_sse(gateway, relay)
        response.headers.update(job_headers)
        return response
    while not job.status.is_terminal:  # a client that goes away leaves the job running
        job = await gateway.queue.wait_until_terminal(tenant, job.id, 60)
    if job.status is JobStatus.SUCCEEDED:
        return json_response(job.output, 200, job_headers)
    status, kind, message = _failure(job)
    return problem(status, message, slug=kind, headers=job_headers, openai=True, job=job_json(job))


def _understand(
    gateway: Gateway, request: Request, raw: bytes, operation: Operation
) -> _FacadeCall:
    """Validate the body and headers (nothing is written before this passes)."""
    headers = request.headers
    body = _parse_body(raw, headers.get("content-type", ""))
    stream = body.pop("stream", False) is True and operation.streams
    stream_options = body.pop("stream_options", None)
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    try:
        spec = JobCreate.model_validate({"operation": operation, "input": body})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "input")
        raise InvalidRequest(f"{where + ': ' if where else ''}{first['msg']}") from exc
    assert spec.model is not None
    upstream = gateway.settings.upstream_for(spec.model)
    idempotency_key = headers.get("idempotency-key") or None
    if idempotency_key is not None and len(idempotency_key) > 256:
        raise InvalidRequest("the Idempotency-Key header is longer than 256 characters")
    submission = SubmitRequest(
        operation=operation,
        input={k: v for k, v in body.items() if k != "model"},
        model=spec.model,
        upstream=upstream.name,
        metadata={"via": "openai"},
        idempotency_key=idempotency_key,
    )
    respond_async = "respond-async" in (headers.get("prefer") or "").lower()
    return _FacadeCall(submission, stream, include_usage, respond_async)


async def _accept(
    gateway: Gateway, tenant: str, call: _FacadeCall
) -> tuple[Job, tuple[Subscription, list[LiveDelta]] | None]:
    """Submit the job, and for a caller waiting on it, get it going as early as possible:

    - a stream watches the job before it exists, so the first token goes out the moment it
      arrives (no read of the store first);
    - when this process's worker has room, the job is accepted already claimed (no claim
      transaction before the upstream call), unless the upstream's limit is reached across all
      processes; on SQLite and without an idempotency key (a replay would be another job), the
      upstream call even starts while the accept commits (its text is shown once it has).
    """
    submission = call.submission
    upstream = submission.upstream
    job_id = new_id("job")
    watching = (
        gateway.queue.live.watch_job(job_id) if call.stream and not call.respond_async else None
    )
    worker = gateway.worker if not call.respond_async else None
    lease_token = new_id("lease") if worker is not None and worker.reserve(upstream) else None
    accepted: asyncio.Future[bool] | None = None
    if (
        worker is not None
        and lease_token is not None
        and submission.idempotency_key is None
        and gateway.store.dialect == "sqlite"
    ):  # on PostgreSQL other processes share the upstream's limit: no call before the count
        accepted = asyncio.get_running_loop().create_future()

    def start(built: Job) -> None:
        assert worker is not None and lease_token is not None
        worker.adopt(built, lease_token, accepted)

    try:
        job, created = await gateway.queue.submit(
            tenant,
            submission,
            job_id=job_id,
            lease_token=lease_token,
            on_built=start if accepted is not None else None,
        )
    except BaseException:
        if watching is not None:
            watching[0].close()
        if accepted is not None and job_id in gateway.queue.live.running:
            accepted.set_result(False)  # the started call is aborted and its slot freed
        elif worker is not None and lease_token is not None:
            worker.unreserve(upstream)
        raise
    claimed = created and job.lease_token == lease_token  # else: queued, the upstream was full
    if accepted is not None:
        accepted.set_result(claimed)
    elif worker is not None and lease_token is not None:
        if claimed:
            worker.adopt(job, lease_token)
        else:
            worker.unreserve(upstream)
    if watching is not None and not created:  # an idempotent replay: another job, from its start
        watching[0].close()
        watching = None
    return job, watching


def _parse_body(raw: bytes, content_type: str) -> dict[str, Any]:
    if "json" not in content_type:
        raise InvalidRequest(
            f"the request body must be JSON: send 'Content-Type: application/json' (got {content_type or 'none'!r})"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _failure(job: Job) -> tuple[int, str, str]:
    """The HTTP status, kind and message a finished, unsuccessful job answers with."""
    if job.status is JobStatus.CANCELLED:
        return 409, "job-cancelled", f"job {job.id} was cancelled"
    if job.status is JobStatus.EXPIRED:
        return 504, "job-expired", f"job {job.id} expired before it started"
    error = job.error or {}
    upstream_status = error.get("upstream_status")
    status = (
        upstream_status
        if isinstance(upstream_status, int) and 400 <= upstream_status < 500
        else 502
    )
    return (
        status,
        str(error.get("type") or "upstream-error"),
        str(error.get("message") or "the job failed"),
    )


def _openai_sse(gateway: Gateway, chunks: AsyncIterator[list[str]]) -> SSERelayResponse:
    async def events() -> AsyncIterator[bytes]:
        async for batch in chunks:  # what is ready at once goes out in one write
            yield b"".join(b"data: %s\n\n" % data.encode() for data in batch)

    return SSERelayResponse(events(), heartbeat_seconds=gateway.settings.streams.heartbeat_seconds)


async def _chunks(
    gateway: Gateway,
    tenant: str,
    job: Job,
    operation: Operation,
    include_usage: bool,
    watching: tuple[Subscription, list[LiveDelta]] | None,
) -> AsyncIterator[list[str]]:
    """The job's events as OpenAI stream chunks (JSON text of each ``data:`` line), in batches."""
    chat = operation is Operation.CHAT_COMPLETIONS
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": job.created_at // 1000,
        "model": job.model,
    }
    started: set[int] = set()  # choices whose first chunk (with the role) went out
    attempt: int | None = None  # the attempt whose text the client is getting
    stream = job_stream(
        gateway.queue,
        tenant,
        job.id,
        StreamCursor(seq=job.event_seq) if watching else StreamCursor(),
        poll_seconds=gateway.settings.streams.poll_seconds,
        watching=watching,
    )
    async for batch in stream:
        out: list[str] = []
        for item in batch:
            message = item.message
            if isinstance(message, LiveDelta) or message.type is EventType.OUTPUT_DELTA:
                if isinstance(message, LiveDelta):
                    delta_attempt, index, text = message.attempt, message.index, message.text
                else:
                    data = message.data
                    delta_attempt, index, text = data["attempt"], data["index"], data["text"]
                if attempt is not None and delta_attempt != attempt:
                    # The upstream broke off and the job started over: the text sent so far is not a
                    # prefix of the new answer, which OpenAI's stream format cannot express.
                    reason = (
                        f"the upstream connection broke and job {job.id} was retried; its result "
                        f"is at /v1/jobs/{job.id}"
                    )
                    yield [*out, _error_chunk("upstream_retry", reason)]
                    return
                attempt = delta_attempt
                out.append(orjson.dumps(_delta_chunk(base, chat, index, text, started)).decode())
            elif item.type == "job.succeeded":
                finished = gateway.queue.live.finished(job.id) or await gateway.queue.get(
                    tenant, job.id
                )
                final = finished.output or {}
                for choice in final.get("choices") or []:
                    index = choice.get("index", 0)
                    finish = {"finish_reason": choice.get("finish_reason"), "logprobs": None}
                    if chat:
                        delta: dict[str, Any] = {}
                        if index not in started:
                            delta["role"] = "assistant"
                        tool_calls = (choice.get("message") or {}).get("tool_calls")
                        if (
                            tool_calls
                        ):  # relayed whole at the end: the live text carries no tool calls
                            delta["tool_calls"] = [
                                {**call, "index": i} for i, call in enumerate(tool_calls)
                            ]
                        chunk_choice = {"index": index, "delta": delta, **finish}
                    else:
                        chunk_choice = {"index": index, "text": "", **finish}
                    out.append(orjson.dumps({**base, "choices": [chunk_choice]}).decode())
                if include_usage and final.get("usage") is not None:
                    out.append(
                        orjson.dumps({**base, "choices": [], "usage": final["usage"]}).decode()
                    )
                yield [*out, "[DONE]"]
                return
            elif item.terminal:
                finished = await gateway.queue.get(tenant, job.id)
                _, kind, reason = _failure(finished)
                yield [*out, _error_chunk(kind, reason)]
                return
        if out:
            yield out


def _delta_chunk(
    base: dict[str, Any], chat: bool, index: int, text: str, started: set[int]
) -> dict[str, Any]:
    if not chat:
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": None,
        }
        return {**base, "choices": [choice]}
    delta = {"content": text}
    if index not in started:
        started.add(index)
        delta = {"role": "assistant", "content": text}
    return {
        **base,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}],
    }


def _error_chunk(kind: str, message: str) -> str:
    return orjson.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    ).decode()
