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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from hookline.api.deps import get_caller, get_tenant
from hookline.api.limits import json_body
from hookline.api.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
    UpstreamAnswer,
)
from hookline.api.openapi import model_schema
from hookline.api.problems import json_response, problem
from hookline.api.schemas import JobCreate, JobOut
from hookline.api.sse_relay import SSERelayResponse
from hookline.auth import Caller
from hookline.config import UpstreamConfig
from hookline.delivery.streams import job_stream
from hookline.errors import InvalidRequest
from hookline.events import EventType
from hookline.gateway import Gateway
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Lane, Operation, job_json
from hookline.live.hub import LiveDelta, StreamCursor, Subscription
from hookline.queue import SubmitRequest

router = APIRouter(prefix="/v1", tags=["openai"])

ON_DISCONNECT_HEADER = {
    "name": "Hookline-On-Disconnect",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "enum": ["continue", "cancel"]},
    "description": (
        "What the client going away does to the job: continue (the answer is kept, reattach "
        "at /v1/jobs/{id}) or cancel (the upstream call ends at once). Default: the "
        "upstream's on_disconnect."
    ),
}

_JOB_HEADERS = {
    "Hookline-Job-Id": {
        "schema": {"type": "string"},
        "description": "The job: reattach to it at /v1/jobs/{id} rather than call again.",
    },
    "Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"},
}
_FACADE_HEADERS = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "maxLength": 256},
        "description": "Same key and body: the first job's answer. Same key, other body: 409.",
    },
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "respond-async: answer 202 with the job at once.",
    },
    ON_DISCONNECT_HEADER,
]


def _documented(request: type[BaseModel], *, streams: bool) -> dict[str, Any]:
    """The route's request body, headers and answers, for the OpenAPI spec."""
    answer: dict[str, Any] = {"application/json": {"schema": model_schema(UpstreamAnswer)}}
    description = "The upstream's answer, in OpenAI's format."
    if streams:
        answer["text/event-stream"] = {}
        description += " With stream: true, OpenAI's chunks as SSE, then data: [DONE]."
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": model_schema(request)}},
            },
            "parameters": _FACADE_HEADERS,
        },
        "responses": {
            200: {
                "description": description,
                "content": answer,
                "headers": _JOB_HEADERS,
            },
            202: {
                "description": "With Prefer: respond-async, the job, at once.",
                "model": JobOut,
                "headers": _JOB_HEADERS,
            },
            409: {"description": "The job was cancelled, or the Idempotency-Key was reused."},
            "4XX": {"description": "The upstream refused the request: its status, its message."},
            502: {"description": "The upstream failed (after its retries)."},
            504: {"description": "The job expired before it started."},
        },
    }


@router.post(
    "/chat/completions",
    summary="OpenAI chat completions, as a durable job",
    **_documented(ChatCompletionRequest, streams=True),
)
async def chat_completions(request: Request) -> Response:
    return await _call(request, Operation.CHAT_COMPLETIONS)


@router.post(
    "/completions",
    summary="OpenAI completions, as a durable job",
    **_documented(CompletionRequest, streams=True),
)
async def completions(request: Request) -> Response:
    return await _call(request, Operation.COMPLETIONS)


@router.post(
    "/embeddings",
    summary="OpenAI embeddings, as a durable job",
    **_documented(EmbeddingRequest, streams=False),
)
async def embeddings(request: Request) -> Response:
    return await _call(request, Operation.EMBEDDINGS)


@router.post(
    "/images/generations",
    summary="OpenAI image generation, as a durable job",
    **_documented(ImageGenerationRequest, streams=False),
)
async def images_generations(request: Request) -> Response:
    return await _call(request, Operation.IMAGES_GENERATIONS)


@router.get("/models", summary="The models the configured upstreams serve (OpenAI format)")
async def models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    await get_tenant(request)
    data = [  # routes, then the upstreams' models (patterns route; they are not models)
        {"id": model, "object": "model", "created": 0, "owned_by": owner}
        for model, owner in gateway.queue.router.models()
    ]
    return json_response({"object": "list", "data": data})


@dataclasses.dataclass(frozen=True)
class _FacadeCall:
    """An OpenAI request, understood: the job to submit and how the caller wants the answer."""

    submission: SubmitRequest
    stream: bool
    include_usage: bool
    respond_async: bool
    cancel_on_disconnect: bool = False  # Hookline-On-Disconnect: cancel (or the upstream's)


async def _call(request: Request, operation: Operation) -> Response:
    gateway: Gateway = request.app.state.gateway
    caller = await get_caller(request)
    tenant = caller.tenant
    call = _understand(gateway, request, await json_body(request), operation)
    job, watching = await _accept(gateway, tenant, call, caller)
    job_headers = {"Hookline-Job-Id": job.id, "Location": f"/v1/jobs/{job.id}"}
    if call.respond_async:
        applied = {**job_headers, "Preference-Applied": "respond-async"}
        return json_response(job_json(job), 202, applied)
    if call.stream:
        relay = _chunks(gateway, tenant, job, operation, call.include_usage, watching)
        response = _openai_sse(gateway, relay, disconnected(gateway, tenant, job, call))
        response.headers.update(job_headers)
        return response
    job = await until_done(gateway, tenant, job, request, call)
    if job.status is JobStatus.SUCCEEDED:
        return json_response(job.output, 200, job_headers)
    status, kind, message = _failure(job)
    return problem(status, message, slug=kind, headers=job_headers, openai=True, job=job_json(job))


def _understand(gateway: Gateway, request: Request, body: Any, operation: Operation) -> _FacadeCall:
    """Validate the body and headers (nothing is written before this passes)."""
    headers = request.headers
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
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
    upstream = gateway.queue.router.choose(spec.model, operation.value)
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
    cancel = cancels_on_disconnect(request, upstream)
    return _FacadeCall(submission, stream, include_usage, respond_async, cancel)


def cancels_on_disconnect(request: Request, upstream: UpstreamConfig) -> bool:
    """Whether the job is cancelled when its caller goes away: the Hookline-On-Disconnect
    header, or the upstream's ``on_disconnect``."""
    given = (request.headers.get("hookline-on-disconnect") or upstream.on_disconnect).lower()
    if given not in ("continue", "cancel"):
        raise InvalidRequest("Hookline-On-Disconnect must be continue or cancel")
    return given == "cancel"


def disconnected(
    gateway: Gateway, tenant: str, job: Job, call: _FacadeCall
) -> Callable[[], Awaitable[object]] | None:
    """What a streaming response does when its client goes away: cancel the job, if asked."""
    if not call.cancel_on_disconnect:
        return None
    return lambda: gateway.queue.cancel(tenant, job.id)


async def until_done(
    gateway: Gateway, tenant: str, job: Job, request: Request, call: _FacadeCall
) -> Job:
    """The job once it has ended, or as it stands when the client went away (then cancelled,
    with Hookline-On-Disconnect: cancel; else it runs on and its answer is kept)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # (the body, replayed to a route that did not read it)

    receiving = asyncio.ensure_future(gone())
    try:
        while not job.status.is_terminal:
            waiting = asyncio.ensure_future(gateway.queue.wait_until_terminal(tenant, job.id, 60))
            await asyncio.wait((waiting, receiving), return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
                if call.cancel_on_disconnect:
                    return await gateway.queue.cancel(tenant, job.id)
                return job  # nobody will read the answer; the job runs on
            job = waiting.result()
    finally:
        receiving.cancel()
    return job


async def _accept(
    gateway: Gateway, tenant: str, call: _FacadeCall, caller: Caller | None = None
) -> tuple[Job, tuple[Subscription, list[LiveDelta]] | None]:
    """Submit the job, and for a caller waiting on it, get it going as early as possible:

    - a stream watches the job before it exists, so the first token goes out the moment it
      arrives (no read of the store first);
    - when this process's worker has room, the job is accepted already claimed (no claim
      transaction before the upstream call), unless the upstream's limit is reached across all
      processes; on SQLite and without an idempotency key (a replay would be another job), the
      upstream call even starts while the accept commits (its text is shown once it has).
    """
    # Someone waits on the answer unless it was asked for in the background.
    lane = Lane.DEFAULT if call.respond_async else Lane.INTERACTIVE
    submission = dataclasses.replace(call.submission, lane=lane)
    upstream = submission.upstream
    job_id = new_id("job")
    watching = (
        gateway.queue.live.watch_job(job_id) if call.stream and not call.respond_async else None
    )
    # A key with limits of its own has its jobs started by a claim, which holds them to those.
    limited_key = caller is not None and caller.limits.in_claim
    worker = gateway.worker if not call.respond_async and not limited_key else None
    # Processes on other hosts share the upstream's limit: no call before the accept counts it;
    # and with an idempotency key the accept may be a replay (another job).
    overlap = (
        submission.idempotency_key is None and not gateway.store.capabilities.shared_across_hosts
    )
    early = worker.early_start(upstream, overlap=overlap) if worker is not None else None
    try:
        job, created = await gateway.queue.submit(
            tenant,
            submission,
            job_id=job_id,
            lease_token=early.lease_token if early is not None else None,
            on_built=early.on_built if early is not None and early.overlaps else None,
            # A caller waiting on the answer would rather be told to come back (429 and
            # Retry-After, which the SDKs honour) than wait in the queue.
            refuse_when_held=not call.respond_async,
            key_id=caller.key_id if caller is not None else None,
            key_limits=caller.limits if caller is not None else None,
        )
    except BaseException:
        if watching is not None:
            watching[0].close()
        if early is not None:
            early.abandon()
        raise
    if early is not None:
        early.settle(job, created)
    if watching is not None and not created:  # an idempotent replay: another job, from its start
        watching[0].close()
        watching = None
    return job, watching


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


def _openai_sse(
    gateway: Gateway,
    chunks: AsyncIterator[list[str]],
    on_disconnect: Callable[[], Awaitable[object]] | None = None,
) -> SSERelayResponse:
    async def events() -> AsyncIterator[bytes]:
        async for batch in chunks:  # what is ready at once goes out in one write
            yield b"".join(b"data: %s\n\n" % data.encode() for data in batch)

    heartbeat = gateway.settings.streams.heartbeat_seconds
    return SSERelayResponse(events(), heartbeat_seconds=heartbeat, on_disconnect=on_disconnect)


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
