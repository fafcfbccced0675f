"""Live, resumable event streams: SSE per job, WebSocket per job, and the tenant-wide SSE stream.

Every message carries a resume token as its id (the event's ``seq`` for durable events, with a
character count appended for live output, see :mod:`hookline.live.hub`); sending it back as
``Last-Event-ID`` (or ``?after=``) resumes right after it, without a lost or doubled token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from sse_starlette import EventSourceResponse
from starlette.responses import Response

from hookline.api.deps import GatewayDep, TenantDep
from hookline.api.problems import json_response
from hookline.delivery.streams import StreamItem, job_stream, tenant_stream
from hookline.errors import HooklineError, InvalidRequest, NotFound, Unauthorized
from hookline.events import event_json
from hookline.gateway import Gateway
from hookline.jobs import JobStatus
from hookline.live.hub import BadResumeToken, StreamCursor

router = APIRouter(prefix="/v1", tags=["streams"])

_AFTER = Query(
    description="Resume after this event id (as Last-Event-ID); for the JSON list, a seq",
    max_length=200,
)


def wants_event_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def resume_cursor(last_event_id: str | None, after: str | None) -> StreamCursor:
    token = last_event_id if last_event_id not in (None, "") else after
    try:
        return StreamCursor.parse(token)
    except BadResumeToken as exc:
        raise InvalidRequest(f"bad Last-Event-ID or after: {exc}") from exc


def sse_response(gateway: Gateway, batches: AsyncIterator[list[StreamItem]]) -> EventSourceResponse:
    async def events() -> AsyncIterator[bytes]:
        async for batch in batches:
            yield b"".join(encode_sse(item) for item in batch)  # one write per batch

    return EventSourceResponse(
        events(),
        ping=gateway.settings.streams.heartbeat_seconds,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def encode_sse(item: StreamItem) -> bytes:
    body = orjson.dumps(item.body)
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (item.id.encode(), item.type.encode(), body)


@router.get(
    "/jobs/{job_id}/events",
    summary="The job's events: a JSON list, or a live SSE stream",
    responses={200: {"content": {"text/event-stream": {}, "application/json": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    gateway: GatewayDep,
    tenant: TenantDep,
    after: Annotated[str | None, _AFTER] = None,
) -> Response:
    """With ``Accept: text/event-stream``: the job's events as SSE (``id``, ``event``, ``data``),
    history first, then live (output text as the upstream produces it), ending after the terminal
    event; resumable with ``Last-Event-ID`` or ``?after=``; a comment heartbeat keeps idle
    streams open. Otherwise: the event log as a JSON list (``?after=`` a seq)."""
    cursor = resume_cursor(request.headers.get("last-event-id"), after)
    if not wants_event_stream(request):
        events = await gateway.queue.events(tenant, job_id, cursor.seq)
        return json_response({"object": "list", "data": [event_json(event) for event in events]})
    stream = job_stream(
        gateway.queue, tenant, job_id, cursor, poll_seconds=gateway.settings.streams.poll_seconds
    )
    first = await anext(stream, None)  # NotFound surfaces here, as a 404 problem, not mid-stream
    response = sse_response(gateway, _prepend(first, stream))
    if first is not None and not first[-1].terminal:
        response.body_iterator = _with_position(gateway, tenant, job_id, response.body_iterator)
    return response


# How often a stream looks at where its queued job stands (job.progress when it moved).
POSITION_SECONDS = 2.0


async def _with_position(
    gateway: Gateway, tenant: str, job_id: str, encoded: AsyncIterable[Any]
) -> AsyncIterator[Any]:
    """The stream, and while its job is queued, after each ``POSITION_SECONDS`` without an
    event, a ``job.progress`` event with its ``queue`` position (as ``GET /v1/jobs/{id}``
    shows it) when that changed. Not a durable event: it has no id, so it never moves the point
    a reconnect resumes from."""
    source = aiter(encoded)
    upcoming: asyncio.Future[Any] = asyncio.ensure_future(anext(source, None))
    shown: dict[str, Any] | None = None
    waiting = True
    try:
        while True:
            done, _ = await asyncio.wait({upcoming}, timeout=POSITION_SECONDS if waiting else None)
            if upcoming in done:
                chunk = upcoming.result()
                if chunk is None:
                    return
                yield chunk
                upcoming = asyncio.ensure_future(anext(source, None))
                continue
            job = await gateway.queue.get(tenant, job_id)  # a quiet spell: where does it stand?
            waiting = job.status is JobStatus.QUEUED
            queue = await gateway.queue.position(job) if waiting else None
            if queue is not None and queue != shown:
                shown = queue
                data = {"job_id": job_id, "type": "job.progress", "data": {"queue": queue}}
                yield b"event: job.progress\ndata: %s\n\n" % orjson.dumps(data)
    finally:
        upcoming.cancel()


async def _prepend(
    first: list[StreamItem] | None, rest: AsyncIterator[list[StreamItem]]
) -> AsyncIterator[list[StreamItem]]:
    if first is None:
        return
    yield first
    if not first[-1].terminal:
        async for batch in rest:
            yield batch


@router.get(
    "/events",
    summary="Every event of the caller's tenant, as a live SSE stream",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def tenant_events(
    request: Request,
    gateway: GatewayDep,
    tenant: TenantDep,
    after: Annotated[
        str | None, Query(description="Resume after this event id; 'latest': only new events")
    ] = None,
    type: Annotated[
        list[str] | None, Query(description="Only these event types (repeatable)")
    ] = None,
) -> Response:
    """Every durable event of the tenant's jobs, in order, without end; each SSE id is the
    event's store-wide id, so ``Last-Event-ID`` resumes. Live output arrives as the coalesced
    ``job.output.delta`` events (per job streams carry it token by token)."""
    token = request.headers.get("last-event-id") or after or "0"
    if token == "latest":  # only what happens from now on
        token = str(await gateway.store.latest_tenant_event_id(tenant))
    if not (token.isascii() and token.isdigit() and len(token) <= 18):
        raise InvalidRequest(f"bad Last-Event-ID or after: {token[:60]!r} is not an event id")
    stream = tenant_stream(
        gateway.queue,
        tenant,
        int(token),
        frozenset(type or ()),
        poll_seconds=gateway.settings.streams.poll_seconds,
        resync_seconds=gateway.settings.streams.resync_seconds,
    )
    return sse_response(gateway, stream)


@router.websocket("/jobs/{job_id}/ws")
async def job_websocket(websocket: WebSocket, job_id: str, after: str | None = None) -> None:
    """The job's events as JSON messages (``{"id", "event", "data"}``), same order and resume
    tokens as SSE (``?after=``). The key goes in the ``Authorization`` header or, for browsers,
    ``?access_token=``. Closes with 1000 after the terminal event; 4401/4404/4400 on errors."""
    gateway: Gateway = websocket.app.state.gateway
    authorization = websocket.headers.get("authorization")
    if authorization is None and "access_token" in websocket.query_params:
        authorization = f"Bearer {websocket.query_params['access_token']}"
    try:
        tenant = await gateway.keys.tenant_for(authorization)
        cursor = resume_cursor(None, after)
        stream = job_stream(
            gateway.queue,
            tenant,
            job_id,
            cursor,
            poll_seconds=gateway.settings.streams.poll_seconds,
        )
        first = await anext(stream, None)
    except HooklineError as exc:
        # 4000 + the HTTP status the same request would have had.
        code = (
            4401 if isinstance(exc, Unauthorized) else 4404 if isinstance(exc, NotFound) else 4400
        )
        await websocket.accept()  # closing before accepting could only answer 403, not why
        await websocket.close(code=code, reason=str(exc)[:120])
        return
    await websocket.accept()

    async def send_all() -> None:
        async for batch in _prepend(first, stream):
            for item in batch:
                message = {"id": item.id, "event": item.type, "data": item.body}
                await websocket.send_text(orjson.dumps(message).decode())
        await websocket.close(code=1000)

    async def until_closed() -> None:
        # Notice a client that leaves while the job is quiet, and let go of its subscription.
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    sending = asyncio.create_task(send_all())
    watching = asyncio.create_task(until_closed())
    try:
        await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, watching):
            task.cancel()
        results = await asyncio.gather(sending, watching, return_exceptions=True)
        await stream.aclose()  # its subscription ends now, not when garbage is collected
        sent = results[0]  # a client gone mid-send is a normal end; anything else is not
        gone = watching.done() and not watching.cancelled()
        expected = (
            (WebSocketDisconnect, OSError, RuntimeError) if gone else (WebSocketDisconnect, OSError)
        )
        if isinstance(sent, Exception) and not isinstance(sent, expected):
            raise sent
