"""``/v1/files`` and ``/v1/batches``: OpenAI's Files and Batch APIs (the official SDK's
``files`` and ``batches`` calls work unchanged), plus a one-call submit of a JSONL body and the
batch's events as SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import Response, StreamingResponse

from hookline.api.deps import GatewayDep, TenantDep
from hookline.api.problems import json_response
from hookline.api.schemas import SinkName, WebhookSpec
from hookline.api.sinks import with_sinks
from hookline.api.streams import resume_cursor, sse_response, wants_event_stream
from hookline.batches import BatchRequest, batch_json, file_json
from hookline.delivery.streams import job_stream
from hookline.delivery.webhooks.ssrf import check_url
from hookline.errors import InvalidRequest, NotFound
from hookline.events import event_json
from hookline.gateway import Gateway

router = APIRouter(prefix="/v1", tags=["batches"])
_MAX_PAGE = 100
_READ_BYTES = 256 * 1024


class BatchCreate(BaseModel):
    """OpenAI's batch request (its ``input_file_id`` from ``POST /v1/files``), plus a webhook."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str | None = Field(default=None, description="e.g. /v1/chat/completions")
    completion_window: str = Field(default="24h", description="hours, like '24h'")
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    webhook: WebhookSpec | None = Field(
        default=None,
        description=(
            "Called with batch.completed (and the other terminal batch events), batch.progress "
            "if listed, and the items' job.* events only if listed."
        ),
    )
    sinks: list[SinkName] | None = Field(
        default=None,
        max_length=16,
        description="Data sinks (GET /v1/sinks) that get every item's events and the batch's.",
    )
    execution: Literal["auto", "single", "provider_batch"] | None = Field(
        default=None,
        description=(
            "auto (default): the items of an upstream with batch_api run as its provider batch; "
            "single: as calls; provider_batch: as provider batches (docs/async-upstreams.md)."
        ),
    )


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_READ_BYTES):
        yield chunk


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


# --- files

_UPLOAD = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL lines"},
        "purpose": {"type": "string", "enum": ["batch"]},
    },
}


@router.post(
    "/files",
    summary="Upload a file (purpose 'batch'): multipart, as OpenAI's",
    responses={
        400: {"description": "The multipart body is malformed."},
        422: {"description": "No file, or a purpose other than batch."},
    },
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _UPLOAD}}}
    },
)
async def upload_file(request: Request, gateway: GatewayDep, tenant: TenantDep) -> Response:
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("send the file as the multipart field 'file'")
        if not isinstance(purpose, str):
            raise InvalidRequest("send the multipart field 'purpose' (batch)")
        record = await gateway.batches.upload(
            tenant, upload.filename or "upload.jsonl", purpose, _upload_chunks(upload)
        )
    return json_response(file_json(record))


@router.get("/files", summary="List files")
async def list_files(
    gateway: GatewayDep,
    tenant: TenantDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 20,
) -> Response:
    page = await gateway.store.batches.list_files(tenant, purpose, after, limit + 1)
    data = [file_json(record) for record in page[:limit]]
    return json_response({"object": "list", "data": data, "has_more": len(page) > limit})


@router.get("/files/{file_id}", summary="Get a file's description")
async def get_file(file_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    return json_response(file_json(await gateway.batches.file(tenant, file_id)))


@router.get(
    "/files/{file_id}/content",
    summary="Download a file (streamed)",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}}},
)
async def file_content(file_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    record = await gateway.batches.file(tenant, file_id)
    return StreamingResponse(
        gateway.store.batches.read_file(record.id),
        media_type="application/jsonl",
        headers={"Content-Length": str(record.bytes)},
    )


@router.delete("/files/{file_id}", summary="Delete a file")
async def delete_file(file_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    if not await gateway.store.batches.delete_file(tenant, file_id):
        raise NotFound(f"no file {file_id!r}")
    return json_response({"id": file_id, "object": "file", "deleted": True})


# --- batches

_MULTIPART_BATCH = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL lines"},
        "endpoint": {"type": "string", "description": "e.g. /v1/chat/completions"},
        "completion_window": {"type": "string", "description": "hours, like '24h'"},
        "metadata": {"type": "string", "description": "a JSON object of strings"},
        "webhook": {"type": "string", "description": "a JSON webhook: {url, events}"},
        "webhook_url": {"type": "string"},
        "webhook_events": {"type": "string", "description": "comma-separated"},
        "execution": {"type": "string", "enum": ["auto", "single", "provider_batch"]},
    },
}


@router.post(
    "/batches",
    summary="Create a batch: from an uploaded file (JSON), or a JSONL body / multipart file",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": BatchCreate.model_json_schema()},
                "application/jsonl": {"schema": {"type": "string"}},
                "multipart/form-data": {"schema": _MULTIPART_BATCH},
            }
        }
    },
    responses={404: {"description": "No such input file."}},
)
async def create_batch(request: Request, gateway: GatewayDep, tenant: TenantDep) -> Response:
    """Three ways in, one batch out:

    - ``application/json``: OpenAI's ``{input_file_id, endpoint, completion_window, metadata}``
      (plus ``webhook``), the file uploaded before with ``POST /v1/files``;
    - ``application/jsonl`` (or ``application/x-ndjson``): the JSONL lines as the body, the rest as
      query parameters (``endpoint``, ``completion_window``, ``webhook_url``, ``webhook_events``
      comma-separated, ``metadata`` as JSON);
    - ``multipart/form-data``: the lines as the field ``file``, the rest as fields.

    Every line is checked before anything runs; bad lines give a ``failed`` batch whose
    ``errors`` name them."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    service = gateway.batches
    if kind == "application/json":
        try:
            body = BatchCreate.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidRequest(_summary(exc)) from exc
        webhook = body.webhook.model_dump() if body.webhook else None
        if body.webhook is not None:
            await check_url(body.webhook.url, gateway.address_policy)
        webhook = with_sinks(gateway, tenant, webhook, body.sinks)
        batch_request = BatchRequest(
            body.input_file_id, body.endpoint, body.completion_window, body.metadata, webhook,
            body.execution,
        )  # fmt: skip
        batch = await service.create(tenant, batch_request)  # checks the rest
    elif kind in ("application/jsonl", "application/x-ndjson", "application/jsonlines"):
        batch_request = _from_fields(dict(request.query_params))
        await _check(gateway, tenant, batch_request)  # before the body is read
        chunks = _body_chunks(request)
        batch = await service.submit(tenant, batch_request, "batch.jsonl", chunks)
    elif kind == "multipart/form-data":
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("send the JSONL lines as the multipart field 'file'")
            batch_request = _from_fields({k: v for k, v in form.items() if isinstance(v, str)})
            await _check(gateway, tenant, batch_request)
            filename = upload.filename or "batch.jsonl"
            batch = await service.submit(tenant, batch_request, filename, _upload_chunks(upload))
    else:
        raise InvalidRequest(
            "send JSON (input_file_id), a JSONL body (Content-Type: application/jsonl), "
            f"or a multipart file; got {kind or 'no content type'!r}"
        )
    return json_response(batch_json(batch))


async def _check(gateway: Gateway, tenant: str, batch_request: BatchRequest) -> None:
    """Refuse wrong options before anything is stored."""
    gateway.batches.check(batch_request)
    if batch_request.webhook is not None:
        if batch_request.webhook.get("url"):
            await check_url(batch_request.webhook["url"], gateway.address_policy)
        with_sinks(gateway, tenant, None, batch_request.webhook.get("sinks"))  # known ones only


def _from_fields(fields: dict[str, str]) -> BatchRequest:
    """The options of a JSONL or multipart submit (its file is not stored yet)."""
    webhook = None
    if fields.get("webhook"):
        webhook = _parse(WebhookSpec, fields["webhook"]).model_dump()
    elif fields.get("webhook_url"):
        events = [e for e in fields.get("webhook_events", "").split(",") if e.strip()]
        spec = {"url": fields["webhook_url"], "events": [e.strip() for e in events] or None}
        webhook = _parse(WebhookSpec, orjson.dumps(spec).decode()).model_dump()
    if fields.get("sinks"):  # comma-separated names
        sinks = [name.strip() for name in fields["sinks"].split(",") if name.strip()]
        webhook = {**(webhook or {}), "sinks": sinks}
    metadata = None
    if fields.get("metadata"):
        try:
            metadata = orjson.loads(fields["metadata"])
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"metadata must be a JSON object: {exc}") from exc
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata must be a JSON object of strings")
    return BatchRequest(
        "", fields.get("endpoint"), fields.get("completion_window", "24h"), metadata, webhook,
        fields.get("execution"),
    )  # fmt: skip


def _parse(model: type[WebhookSpec], raw: str) -> WebhookSpec:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"webhook: {_summary(exc)}") from exc


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
    )


@router.get("/batches", summary="List batches (newest first)")
async def list_batches(
    gateway: GatewayDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 20,
) -> Response:
    page = await gateway.store.batches.list_batches(tenant, after, limit + 1)
    data = [batch_json(batch) for batch in page[:limit]]
    body: dict[str, Any] = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(page) > limit,
    }
    return json_response(body)


@router.get("/batches/{batch_id}", summary="Get a batch")
async def get_batch(batch_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    return json_response(batch_json(await gateway.batches.get(tenant, batch_id)))


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch (finished items are kept)")
async def cancel_batch(batch_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    return json_response(batch_json(await gateway.batches.cancel(tenant, batch_id)))


@router.get(
    "/batches/{batch_id}/events",
    summary="The batch's events: a JSON list, or a live SSE stream",
    responses={200: {"content": {"text/event-stream": {}, "application/json": {}}}},
)
async def batch_events(
    batch_id: str,
    request: Request,
    gateway: GatewayDep,
    tenant: TenantDep,
    after: str | None = None,
) -> Response:
    """``batch.progress`` (throttled) and the terminal ``batch.*`` event, like a job's events:
    SSE with ``Accept: text/event-stream`` (resumable), else a JSON list."""
    await gateway.batches.get(tenant, batch_id)  # 404 for another tenant's
    anchor = await gateway.store.get_job(batch_id, tenant)
    if anchor is None:
        raise NotFound(f"no batch {batch_id!r}")
    cursor = resume_cursor(request.headers.get("last-event-id"), after)
    if not wants_event_stream(request):
        events = await gateway.store.list_events(batch_id, cursor.seq)
        return json_response({"object": "list", "data": [event_json(e) for e in events]})
    return sse_response(gateway, _batch_stream(gateway, tenant, batch_id, cursor, anchor))


async def _batch_stream(
    gateway: Gateway, tenant: str, batch_id: str, cursor: Any, anchor: Any
) -> AsyncIterator[Any]:
    poll = gateway.settings.streams.poll_seconds
    async for batch in job_stream(
        gateway.queue, tenant, batch_id, cursor, poll_seconds=poll, subject=anchor
    ):
        yield batch
