"""OpenAI's Responses API (``/v1/responses``), every response a durable job, for any upstream.

``POST /v1/responses`` runs the request as a chat completion job (:mod:`hookline.responses`
translates both ways): with ``background: true`` it answers at once (``queued``), with
``stream: true`` it streams OpenAI's events as the job's stream brings its text, and otherwise
it answers when the job is done. ``GET /v1/responses/{id}`` is the response as it stands, or
with ``stream=true`` its events replayed and followed from ``starting_after`` (any process,
any time: the job's event log does not expire); ``cancel``, ``DELETE`` and ``input_items`` do
what OpenAI's do. Errors carry OpenAI's ``error`` object (``invalid_request_error``, ``param``)
inside the usual problem+json. The job is named in the ``Hookline-Job-Id`` header.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from hookline.api.deps import GatewayDep, TenantDep, get_caller
from hookline.api.limits import json_body
from hookline.api.openai_compat import _accept, _FacadeCall
from hookline.api.openapi import model_schema
from hookline.api.problems import RequestProblem, error_response, json_response, problem
from hookline.api.responses_schemas import (
    DeletedResponse,
    InputItemList,
    ResponseCreate,
    ResponseObject,
)
from hookline.api.sse_relay import SSERelayResponse
from hookline.delivery.streams import job_stream
from hookline.errors import Conflict, HooklineError, InvalidRequest, NotFound, TooLarge
from hookline.events import EventType
from hookline.gateway import Gateway
from hookline.jobs import Job, JobStatus, Operation
from hookline.live.hub import LiveDelta, StreamCursor, Subscription
from hookline.queue import SubmitRequest
from hookline.responses import (
    ResponseEvents,
    ResponseFields,
    ResponseRequestError,
    chat_request,
    fields_of,
    input_items,
    job_id_of,
    response_json,
)

router = APIRouter(prefix="/v1", tags=["responses"])

POLL_AFTER_MS = 1000  # openai-poll-after-ms, while a response is queued or in progress
_UNSUPPORTED = ("conversation", "prompt")  # fields of OpenAI's request hookline cannot honour


class _Refused(HooklineError):
    """A request answered with OpenAI's error object: its status, ``param`` and ``code``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# --- the OpenAPI spec

_JOB_HEADER = {
    "Hookline-Job-Id": {
        "schema": {"type": "string"},
        "description": "The response's job (its events, at /v1/jobs/{id}/events).",
    }
}
_POLL_HEADER = {
    "openai-poll-after-ms": {
        "schema": {"type": "string"},
        "description": "While queued or in progress: wait this long before polling again.",
    }
}
_REFUSED = {"description": "Invalid: OpenAI's `error` object names the parameter (`param`)."}
_NOT_FOUND = {"description": "No stored response with this id (or it is another tenant's)."}


def _answers(*, streams: bool, poll: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": model_schema(ResponseObject)}}
    description = "OpenAI's Response object."
    if streams:
        content["text/event-stream"] = {}
        description += " With stream: OpenAI's streaming events, each with its sequence_number."
    headers = {**_JOB_HEADER, **(_POLL_HEADER if poll else {})}
    return {"description": description, "content": content, "headers": headers}


_CREATE_DOCS: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model_schema(ResponseCreate)}},
        },
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 256},
                "description": (
                    "Same key and body: the first call's response (a stream from its start); "
                    "same key, other body: 409."
                ),
            }
        ],
    },
    "responses": {
        200: _answers(streams=True, poll=True),
        400: _REFUSED,
        404: {"description": "previous_response_id names no stored response."},
        409: {"description": "The Idempotency-Key was used with another body."},
        "4XX": {"description": "The upstream refused the request: its status, its message."},
    },
}


# --- routes


@router.post("/responses", summary="Create a response (OpenAI Responses API)", **_CREATE_DOCS)
async def create_response(request: Request) -> Response:
    """Run the request as a durable job: ``background`` answers at once, ``stream`` streams
    OpenAI's events, and otherwise the answer comes when the job is done."""
    gateway: Gateway = request.app.state.gateway
    caller = await get_caller(request)
    tenant = caller.tenant
    try:
        call = await _understand(gateway, tenant, request)
        job, watching = await _accept(gateway, tenant, call.facade, caller)
        fields = fields_of(job) or call.fields  # a replayed key: the first call's response
        headers = {"Hookline-Job-Id": job.id}
        if call.stream:
            return _event_stream(gateway, tenant, job, fields, None, watching, headers)
        if call.background:
            return json_response(response_json(job, fields), 200, {**headers, **_poll_after(job)})
        while not job.status.is_terminal:  # a client that goes away leaves the job running
            job = await gateway.queue.wait_until_terminal(tenant, job.id, 60)
    except HooklineError as exc:
        return _error(exc, request)
    answer = response_json(job, fields)
    refused = (job.error or {}).get("upstream_status")
    if job.status is JobStatus.FAILED and isinstance(refused, int) and 400 <= refused < 500:
        message = answer["error"]["message"]
        return _openai_error(refused, message, code=answer["error"]["code"], response=answer)
    return json_response(answer, 200, headers)


@router.get(
    "/responses/{response_id}",
    summary="Retrieve a response, or stream its events from any point",
    responses={200: _answers(streams=True, poll=True), 404: _NOT_FOUND},
)
async def retrieve_response(
    response_id: str,
    request: Request,
    gateway: GatewayDep,
    tenant: TenantDep,
    stream: Annotated[bool, Query(description="Stream the response's events (SSE).")] = False,
    starting_after: Annotated[
        int | None,
        Query(ge=0, le=2**53, description="With stream: the events after this sequence_number."),
    ] = None,
    include: Annotated[list[str] | None, Query(description="Accepted, ignored.")] = None,
) -> Response:
    """The response as it stands (``openai-poll-after-ms`` while it runs), or with ``stream``
    its events from the start (or after ``starting_after``, or the SSE ``Last-Event-ID``),
    live until it ends."""
    try:
        job, fields = await _find(gateway, tenant, response_id)
    except HooklineError as exc:
        return _error(exc, request)
    headers = {"Hookline-Job-Id": job.id}
    if not stream:
        return json_response(response_json(job, fields), 200, {**headers, **_poll_after(job)})
    if starting_after is None:
        resume = request.headers.get("last-event-id", "")
        starting_after = int(resume) if resume.isascii() and resume.isdigit() else None
    return _event_stream(gateway, tenant, job, fields, starting_after, None, headers)


@router.post(
    "/responses/{response_id}/cancel",
    summary="Cancel a response (one already ended is answered as it is)",
    responses={200: _answers(streams=False), 404: _NOT_FOUND},
)
async def cancel_response(
    response_id: str, request: Request, gateway: GatewayDep, tenant: TenantDep
) -> Response:
    """A queued response is cancelled at once, a running one has its upstream call aborted;
    cancelling twice answers the response as it ended."""
    try:
        job, fields = await _find(gateway, tenant, response_id)
        job = await gateway.queue.cancel(tenant, job.id)
    except HooklineError as exc:
        return _error(exc, request)
    return json_response(response_json(job, fields), 200, {"Hookline-Job-Id": job.id})


@router.delete(
    "/responses/{response_id}",
    summary="Delete a response (one still running is cancelled first)",
    responses={200: {"model": DeletedResponse, "description": "Deleted."}, 404: _NOT_FOUND},
)
async def delete_response(
    response_id: str, request: Request, gateway: GatewayDep, tenant: TenantDep
) -> Response:
    """The response and its job (with its events) are gone: its id is a 404 from now on."""
    try:
        job, _ = await _find(gateway, tenant, response_id)
        if not job.status.is_terminal:
            await gateway.queue.cancel(tenant, job.id)
        if not await gateway.queue.delete(tenant, job.id):
            raise _not_found(response_id)
    except HooklineError as exc:
        return _error(exc, request)
    return json_response({"id": response_id, "object": "response", "deleted": True})


@router.get(
    "/responses/{response_id}/input_items",
    summary="The response's input items",
    response_model=InputItemList,
    responses={
        400: {"description": "after names no input item of this response."},
        404: _NOT_FOUND,
    },
)
async def list_input_items(
    response_id: str,
    request: Request,
    gateway: GatewayDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    after: Annotated[str | None, Query(max_length=128, description="An item id.")] = None,
    include: Annotated[list[str] | None, Query(description="Accepted, ignored.")] = None,
) -> Response:
    """The input of this response (not its instructions, nor what came from the previous
    response), as OpenAI lists it: newest first unless ``order=asc``."""
    try:
        job, fields = await _find(gateway, tenant, response_id)
        items = input_items(job, fields)
        if order == "desc":
            items.reverse()
        if after is not None:
            position = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if position is None:
                raise _Refused(
                    400, f"after: no input item {after!r} in {response_id}", param="after"
                )
            items = items[position + 1 :]
    except HooklineError as exc:
        return _error(exc, request)
    page = items[:limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


# --- the request


@dataclasses.dataclass(frozen=True)
class _Call:
    # ``facade``: what the facade's accept takes (``_accept``: the job watched before it exists,
    # and started by this process's worker while the accept commits, when it has room).
    facade: _FacadeCall
    fields: ResponseFields
    stream: bool
    background: bool


async def _understand(gateway: Gateway, tenant: str, request: Request) -> _Call:
    """Check the request and build its job (nothing is written before this passes)."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ResponseRequestError("the request body must be a JSON object")
    try:
        checked = ResponseCreate.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc) from exc
    for name in _UNSUPPORTED:
        if body.get(name) is not None:
            raise ResponseRequestError(f"{name} is not supported by hookline", param=name)
    if checked.background and checked.store is False:
        raise ResponseRequestError("a background response must be stored", param="store")
    previous = None
    if checked.previous_response_id is not None:
        previous = await _find(gateway, tenant, checked.previous_response_id, previous=True)
        if not previous[0].status.is_terminal:
            raise ResponseRequestError(
                f"previous response {checked.previous_response_id} has not finished yet",
                param="previous_response_id",
            )
    try:
        upstream = gateway.queue.router.choose(checked.model, Operation.CHAT_COMPLETIONS.value)
    except InvalidRequest as exc:
        message = f"The requested model '{checked.model}' does not exist ({exc})."
        raise ResponseRequestError(message, param="model", code="model_not_found") from exc
    chat, fields = chat_request(checked.model_dump(by_alias=True, exclude_none=True), previous)
    key = request.headers.get("idempotency-key") or None
    if key is not None and len(key) > 256:
        raise ResponseRequestError("the Idempotency-Key header is longer than 256 characters")
    submission = SubmitRequest(
        operation=Operation.CHAT_COMPLETIONS,
        input=chat,
        model=checked.model,
        upstream=upstream.name,
        metadata=fields.as_metadata(),
        idempotency_key=key,
    )
    stream, background = bool(checked.stream), bool(checked.background)
    # A background response is queued, as OpenAI's are: no slot of this process is taken for it.
    facade = _FacadeCall(submission, stream and not background, False, background)
    return _Call(facade, fields, stream, background)


def _invalid(exc: ValidationError) -> ResponseRequestError:
    """The first error, with the parameter named as OpenAI names them (``input[0].content``)."""
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = ""
    for part in error["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _FIELD_NAMES:  # (not a union's branch)
            param += f".{part}" if param else str(part)
    return ResponseRequestError(f"{param or 'body'}: {error['msg']}", param=param or None)


_FIELD_NAMES = frozenset(
    {"model", "input", "instructions", "previous_response_id", "max_output_tokens",
     "temperature", "top_p", "metadata", "stream", "background", "store", "user", "text",
     "tools", "type", "role", "content", "image_url", "file_id", "detail", "refusal",
     "format", "name", "schema", "strict", "description"}
)  # fmt: skip


async def _find(
    gateway: Gateway, tenant: str, given: str, *, previous: bool = False
) -> tuple[Job, ResponseFields]:
    """The stored response ``given`` names (not one with ``store: false``)."""
    job_id = job_id_of(given)
    job = None
    if job_id is not None:
        with contextlib.suppress(NotFound):
            job = await gateway.queue.get(tenant, job_id)
    fields = fields_of(job) if job is not None else None
    if job is None or fields is None or not fields.store:
        if previous:
            raise _Refused(404, f"Previous response with id '{given}' not found.",
                           param="previous_response_id", code="previous_response_not_found")  # fmt: skip
        raise _not_found(given)
    return job, fields


def _not_found(given: str) -> _Refused:
    return _Refused(404, f"Response with id '{given}' not found.")


def _poll_after(job: Job) -> dict[str, str]:
    return {} if job.status.is_terminal else {"openai-poll-after-ms": str(POLL_AFTER_MS)}


# --- errors


def _openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    **extensions: Any,
) -> Response:
    """problem+json carrying OpenAI's error object, which the OpenAI SDKs read."""
    slug = (code or {404: "not-found", 409: "conflict"}.get(status, "invalid-request")).replace(
        "_", "-"
    )
    error = {"message": message, "type": kind, "param": param, "code": code}
    return problem(status, message, slug=slug, error=error, **extensions)


def _error(exc: HooklineError, request: Request) -> Response:
    if isinstance(exc, _Refused):
        return _openai_error(exc.status, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ResponseRequestError):
        return _openai_error(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, RequestProblem):  # not JSON (400), or not sent as JSON (415)
        return _openai_error(exc.status, str(exc))
    if isinstance(exc, NotFound):
        return _openai_error(404, str(exc))
    if isinstance(exc, Conflict):
        return _openai_error(409, str(exc), code="idempotency_key_reused")
    if isinstance(exc, InvalidRequest) and not isinstance(exc, TooLarge):
        return _openai_error(400, str(exc))
    return error_response(exc, f"{request.method} {request.url.path}", openai=True)


# --- streaming


def _event_stream(
    gateway: Gateway,
    tenant: str,
    job: Job,
    fields: ResponseFields,
    starting_after: int | None,
    watching: tuple[Subscription, list[LiveDelta]] | None,
    headers: dict[str, str],
) -> SSERelayResponse:
    events = _events(gateway, tenant, job, fields, starting_after, watching)
    heartbeat = gateway.settings.streams.heartbeat_seconds
    return SSERelayResponse(events, heartbeat_seconds=heartbeat, headers=headers)


async def _events(
    gateway: Gateway,
    tenant: str,
    job: Job,
    fields: ResponseFields,
    starting_after: int | None,
    watching: tuple[Subscription, list[LiveDelta]] | None,
) -> AsyncIterator[bytes]:
    """The response's streaming events, encoded, from the job's stream: its history (all of it:
    :class:`~hookline.responses.ResponseEvents` leaves out what the caller has), then live."""
    events = ResponseEvents(job, fields, starting_after)
    running = watching is not None and job.status is JobStatus.RUNNING  # accepted claimed
    opening = events.opening(running=running)
    if opening:
        yield _encode(opening)
    # A watched job's stream begins after its accept, whose events are not published.
    cursor = StreamCursor(seq=job.event_seq) if watching is not None else StreamCursor()
    poll = gateway.settings.streams.poll_seconds
    stream = job_stream(gateway.queue, tenant, job.id, cursor, poll_seconds=poll, watching=watching)
    try:
        async for batch in stream:
            out: list[dict[str, Any]] = []
            for item in batch:
                message = item.message
                if isinstance(message, LiveDelta):
                    out += events.delta(
                        message.attempt, message.index, message.offset, message.text
                    )
                elif message.type is EventType.OUTPUT_DELTA:
                    data = message.data
                    out += events.delta(
                        int(data.get("attempt", 0)), int(data.get("index", 0)),
                        int(data.get("offset", 0)), str(data.get("text", "")),
                    )  # fmt: skip
                elif message.type is EventType.STARTED:
                    out += events.started_attempt(int(message.data.get("attempt", 0)))
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


def _encode(events: list[dict[str, Any]]) -> bytes:
    """SSE as OpenAI sends it (``event`` and ``data``), with the sequence number as the ``id``,
    so that a generic SSE client resumes with ``Last-Event-ID``."""
    return b"".join(
        b"id: %d\nevent: %s\ndata: %s\n\n"
        % (event["sequence_number"], event["type"].encode(), orjson.dumps(event))
        for event in events
    )
