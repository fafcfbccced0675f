"""The Anthropic-compatible front door: ``POST /v1/messages`` in Anthropic's request and response
formats, for any upstream (Claude or not, the bundled model included), so that the official
``anthropic`` SDK works against hookline with only its ``base_url`` changed (its ``x-api-key``
header carries the hookline key).

Every call is a durable job, as the OpenAI facade's are (:mod:`hookline.api.openai_compat`,
whose accept it shares): a ``chat.completions`` job that :mod:`hookline.messages` translates the
request into and the answer out of, named in the ``Hookline-Job-Id`` header. A client that goes
away leaves the job running; it can reattach through the job API. With ``stream: true`` the
answer comes as Anthropic's streaming events. Errors carry Anthropic's shape (``{"type":
"error", "error": {"type", "message"}}``) inside an RFC 9457 problem.
"""

from __future__ import annotations

import http
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from hookline.api.anthropic_schemas import AnthropicMessage, AnthropicMessageCreate
from hookline.api.deps import get_caller
from hookline.api.limits import json_body
from hookline.api.openai_compat import (
    ON_DISCONNECT_HEADER,
    _accept,
    _FacadeCall,
    cancels_on_disconnect,
    disconnected,
    until_done,
)
from hookline.api.openapi import model_schema
from hookline.api.problems import PROBLEM_MEDIA_TYPE, RequestProblem, error_response, json_response
from hookline.api.sse_relay import SSERelayResponse
from hookline.delivery.streams import job_stream
from hookline.errors import Conflict, HooklineError, InvalidRequest, NotFound, TooLarge
from hookline.events import EventType
from hookline.gateway import Gateway
from hookline.jobs import Job, JobStatus, Operation
from hookline.live.hub import LiveDelta, StreamCursor, Subscription
from hookline.messages import (
    VIA,
    MessageEvents,
    MessagesRequestError,
    chat_request,
    error_type,
    failure,
    message_json,
)
from hookline.queue import SubmitRequest

router = APIRouter(prefix="/v1", tags=["anthropic"])

_JOB_HEADER = {
    "Hookline-Job-Id": {
        "schema": {"type": "string"},
        "description": "The job: reattach to it at /v1/jobs/{id} rather than call again.",
    }
}
_DOCS: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model_schema(AnthropicMessageCreate)}},
        },
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 256},
                "description": "Same key and body: the first job's answer. Same key, other body: 409.",
            },
            ON_DISCONNECT_HEADER,
        ],
    },
    "responses": {
        200: {
            "description": (
                "Anthropic's Message; with stream: true, Anthropic's streaming events "
                "(message_start … message_stop) as SSE."
            ),
            "content": {
                "application/json": {"schema": model_schema(AnthropicMessage)},
                "text/event-stream": {},
            },
            "headers": _JOB_HEADER,
        },
        400: {"description": "invalid_request_error: the request is not a Messages request."},
        404: {"description": "not_found_error: no upstream serves the model."},
        409: {"description": "The job was cancelled, or the Idempotency-Key was reused."},
        "4XX": {"description": "The upstream refused the request: its status, its message."},
        502: {
            "description": (
                "The upstream failed after its retries (error.type overloaded_error: it was "
                "overloaded, 529)."
            )
        },
        504: {"description": "The job expired before it started."},
    },
}


@router.post("/messages", summary="Anthropic Messages, as a durable job", **_DOCS)
async def create_message(request: Request) -> Response:
    """Run the Messages request as a chat job on the upstream its model routes to; answer with
    Anthropic's Message when it is done, or stream Anthropic's events as it runs."""
    gateway: Gateway = request.app.state.gateway
    caller = await get_caller(request)
    tenant = caller.tenant
    try:
        call = _understand(gateway, request, await json_body(request))
        job, watching = await _accept(gateway, tenant, call, caller)
    except HooklineError as exc:
        return _error(exc, request)
    headers = {"Hookline-Job-Id": job.id}
    if call.stream:
        events = _events(gateway, tenant, job, watching)
        heartbeat = gateway.settings.streams.heartbeat_seconds
        on_disconnect = disconnected(gateway, tenant, job, call)
        return SSERelayResponse(
            events, heartbeat_seconds=heartbeat, headers=headers, on_disconnect=on_disconnect
        )
    job = await until_done(gateway, tenant, job, request, call)
    if job.status is JobStatus.SUCCEEDED:
        return json_response(message_json(job), 200, headers)
    status, kind, message = failure(job)
    return anthropic_error(status, kind, message, headers)


def _understand(gateway: Gateway, request: Request, body: Any) -> _FacadeCall:
    """Check the request and build its job (nothing is written before this passes)."""
    if not isinstance(body, dict):
        raise MessagesRequestError("the request body must be a JSON object")
    try:
        checked = AnthropicMessageCreate.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise MessagesRequestError(f"{where}: {error['msg']}") from exc
    chat = chat_request(checked.model_dump(exclude_none=True))
    try:
        upstream = gateway.queue.router.choose(checked.model, Operation.CHAT_COMPLETIONS.value)
    except InvalidRequest as exc:
        raise NotFound(f"model: {checked.model} ({exc})") from exc
    key = request.headers.get("idempotency-key") or None
    if key is not None and len(key) > 256:
        raise MessagesRequestError("the Idempotency-Key header is longer than 256 characters")
    submission = SubmitRequest(
        operation=Operation.CHAT_COMPLETIONS,
        input=chat,
        model=checked.model,
        upstream=upstream.name,
        metadata={"via": VIA},
        idempotency_key=key,
    )
    cancel = cancels_on_disconnect(request, upstream)
    return _FacadeCall(submission, bool(checked.stream), False, False, cancel)


# --- errors


def anthropic_error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """Anthropic's error body (``type: error`` and its ``error`` object), which is also an RFC
    9457 problem (``type`` a relative URI reference, ``title``, ``status``, ``detail``)."""
    try:
        title = http.HTTPStatus(status).phrase
    except ValueError:  # 529, Anthropic's own
        title = "Overloaded"
    body = {
        "type": "error",
        "error": {"type": kind, "message": message},
        "title": title,
        "status": status,
        "detail": message,
    }
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def _error(exc: HooklineError, request: Request) -> Response:
    status = None
    if isinstance(exc, RequestProblem):  # not JSON (400), or not sent as JSON (415)
        status = exc.status
    elif isinstance(exc, TooLarge):
        status = 413
    elif isinstance(exc, InvalidRequest):
        status = 400
    elif isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, Conflict):
        status = 409
    if status is None:  # the database: 503 with Retry-After, as everywhere
        return error_response(exc, f"{request.method} {request.url.path}")
    return anthropic_error(status, error_type(status), str(exc))


# --- streaming


async def _events(
    gateway: Gateway,
    tenant: str,
    job: Job,
    watching: tuple[Subscription, list[LiveDelta]] | None,
) -> AsyncIterator[bytes]:
    """Anthropic's streaming events, from the job's stream (watched since its accept, or from
    the start of its log for a replayed Idempotency-Key)."""
    events = MessageEvents(job)
    yield _encode(events.opening())
    cursor = StreamCursor(seq=job.event_seq) if watching is not None else StreamCursor()
    poll = gateway.settings.streams.poll_seconds
    stream = job_stream(gateway.queue, tenant, job.id, cursor, poll_seconds=poll, watching=watching)
    try:
        async for batch in stream:
            out: list[tuple[str, dict[str, Any]]] = []
            for item in batch:
                message = item.message
                if isinstance(message, LiveDelta):
                    out += events.delta(message.attempt, message.index, message.text)
                elif message.type is EventType.OUTPUT_DELTA:
                    data = message.data
                    out += events.delta(
                        int(data.get("attempt", 0)),
                        int(data.get("index", 0)),
                        str(data.get("text", "")),
                    )
                elif message.type.is_terminal:
                    ended = gateway.queue.live.finished(job.id) or await gateway.queue.get(
                        tenant, job.id
                    )
                    out += events.finished(ended)
                if events.ended:
                    break
            if out:
                yield _encode(out)
            if events.ended:
                return
    finally:
        await stream.aclose()


def _encode(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    """SSE as Anthropic sends it: ``event`` and ``data``."""
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(data)) for kind, data in events
    )
