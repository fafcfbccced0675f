"""The Batch API's formats (OpenAI's): the JSON of a file and of a batch, a batch request, the
JSONL line reader, and an item's line in the output or error file."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from hookline.jobs import Job, JobStatus, Operation
from hookline.store.base_batches import (
    BatchRecord,
    FileRecord,
)

ENDPOINTS = {
    "/v1/chat/completions": Operation.CHAT_COMPLETIONS,
    "/v1/completions": Operation.COMPLETIONS,
    "/v1/embeddings": Operation.EMBEDDINGS,
    "/v1/images/generations": Operation.IMAGES_GENERATIONS,
}
ANCHOR_LEASE = "batch"
# An item run in a provider batch (hookline.batches.provider) is written running under this
# lease, never claimed, never lapsing; its ``upstream`` column is :func:`at_provider`'s name, so
# that it counts against none of the upstream's limits (which are about calls in flight).
PROVIDER_LEASE = "provider"
_AT_PROVIDER = "#batch"
EXECUTIONS = ("auto", "single", "provider_batch")


def at_provider(upstream: str) -> str:
    """The ``jobs.upstream`` of an item that runs in ``upstream``'s provider batch."""
    return upstream + _AT_PROVIDER


def provider_of(upstream: str) -> str | None:
    """The upstream whose provider batch runs an item of this ``jobs.upstream``, if any."""
    return upstream.removesuffix(_AT_PROVIDER) if upstream.endswith(_AT_PROVIDER) else None


def file_json(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at // 1000,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
    }


def batch_json(batch: BatchRecord) -> dict[str, Any]:
    """The batch as OpenAI's API shows it (times in epoch seconds)."""

    def seconds(ms: int | None) -> int | None:
        return None if ms is None else ms // 1000

    errors = {"object": "list", "data": batch.errors} if batch.errors else None
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": seconds(batch.created_at),
        "in_progress_at": seconds(batch.in_progress_at),
        "expires_at": seconds(batch.expires_at),
        "finalizing_at": seconds(batch.finalizing_at),
        "completed_at": seconds(batch.completed_at),
        "failed_at": seconds(batch.failed_at),
        "expired_at": seconds(batch.expired_at),
        "cancelling_at": seconds(batch.cancelling_at),
        "cancelled_at": seconds(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "metadata": batch.metadata or {},
    }


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    input_file_id: str
    endpoint: str | None
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    webhook: dict[str, Any] | None = None  # {"url", "events"}
    # auto: items of an upstream with batch_api run as its provider batch; single: as calls;
    # provider_batch: as provider batches wherever the upstream has a batch API.
    execution: str | None = None


async def read_lines(
    chunks: AsyncIterator[bytes], max_line: int
) -> AsyncIterator[tuple[int, bytes | None]]:
    """(line number, line) of a JSONL stream, blank lines skipped but counted. A line longer than
    ``max_line`` bytes comes as None, and is not held in memory meanwhile."""
    pending = bytearray()  # the start of a line that goes on in the next chunk
    too_long = False
    number = 0
    async for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        for part in complete:
            number += 1
            if too_long or len(pending) + len(part) > max_line:
                yield number, None
            else:
                raw = bytes(pending + part) if pending else part
                if raw and not raw.isspace():
                    yield number, raw
            pending.clear()
            too_long = False
        if not too_long:
            pending += rest
            if len(pending) > max_line:
                too_long = True
                pending.clear()
    if too_long:
        yield number + 1, None
    elif pending and not pending.isspace():
        yield number + 1, bytes(pending)


def result_line(item: Job) -> tuple[dict[str, Any], bool]:
    """An item's line in OpenAI's output format, and whether it belongs in the output file (else
    the error file)."""
    base = {"id": f"batch_req_{item.id.removeprefix('job_')}", "custom_id": item.custom_id}
    if item.status is JobStatus.SUCCEEDED:
        response = {"status_code": 200, "request_id": item.id, "body": item.output}
        return {**base, "response": response, "error": None}, True
    if item.status is JobStatus.FAILED:
        error = item.error or {}
        status = int(error.get("upstream_status") or 500)
        body = error.get("upstream_body") or {
            "error": {"message": error.get("message"), "type": error.get("type"), "code": None}
        }
        response = {"status_code": status, "request_id": item.id, "body": body}
        return {**base, "response": response, "error": None}, False
    code, message = {
        JobStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
        JobStatus.EXPIRED: (
            "batch_expired",
            "this request could not run within the completion window",
        ),
    }.get(item.status, ("batch_expired", "this request could not run within the completion window"))
    return {**base, "response": None, "error": {"code": code, "message": message}}, False
