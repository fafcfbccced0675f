"""The job as OpenAI's Response object, and the ``response.*`` webhook its end reports."""

from __future__ import annotations

from typing import Any

from hookline.events import Event, EventType
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, iso
from hookline.responses.request import (
    VIA,
    ResponseFields,
    choice_of,
    message_id,
    output_text,
    response_id,
)

WEBHOOK_EVENT_TYPES = (
    "response.cancelled",
    "response.completed",
    "response.failed",
    "response.incomplete",
)
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def status_of(job: Job) -> str:
    """The Response status of the job (``incomplete``: it stopped at its token limit)."""
    if job.status is JobStatus.SUCCEEDED:
        return "incomplete" if choice_of(job).get("finish_reason") in _INCOMPLETE else "completed"
    return {
        JobStatus.QUEUED: "queued",
        JobStatus.RUNNING: "in_progress",
        JobStatus.CANCELLED: "cancelled",
    }.get(job.status, "failed")


def output_item(job: Job) -> dict[str, Any]:
    """The response's output message, as it finished."""
    message = choice_of(job).get("message") or {}
    text = output_text(job) or ""
    content: list[dict[str, Any]] = []
    refusal = message.get("refusal")
    if text or not refusal:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if isinstance(refusal, str) and refusal:
        content.append({"type": "refusal", "refusal": refusal})
    status = "incomplete" if status_of(job) == "incomplete" else "completed"
    return {"id": message_id(job.id), "type": "message", "role": "assistant",
            "status": status, "content": content}  # fmt: skip


def response_json(job: Job, fields: ResponseFields, status: str | None = None) -> dict[str, Any]:
    """OpenAI's Response object for the job; ``status`` (a stream's early snapshots): the
    response as it stood then, without output."""
    final = status is None
    status = status or status_of(job)
    ended = final and job.status.is_terminal
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": _INCOMPLETE.get(choice_of(job).get("finish_reason") or "")}
    finished_at = job.finished_at // 1000 if job.finished_at is not None else None
    return {
        "id": response_id(job.id),
        "object": "response",
        "created_at": job.created_at // 1000,
        "status": status,
        "background": fields.background,
        "completed_at": finished_at if status == "completed" else None,
        "error": _error(job) if ended and status == "failed" else None,
        "incomplete_details": incomplete,
        "instructions": fields.instructions,
        "max_output_tokens": fields.max_output_tokens,
        "max_tool_calls": None,
        "metadata": dict(fields.metadata),
        "model": job.model,
        "output": [output_item(job)] if ended and job.status is JobStatus.SUCCEEDED else [],
        "parallel_tool_calls": True,
        "previous_response_id": fields.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": fields.store,
        "temperature": 1.0 if fields.temperature is None else fields.temperature,
        "text": {"format": dict(fields.text_format or {"type": "text"}), "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0 if fields.top_p is None else fields.top_p,
        "truncation": "disabled",
        "usage": _usage(job) if ended else None,
        # OpenAI's schema types `user` as a string (not null): left out when not given.
        **({"user": fields.user} if fields.user is not None else {}),
    }


def _error(job: Job) -> dict[str, Any]:
    if job.status is JobStatus.EXPIRED:
        return {"code": "server_error", "message": "the response expired before it started"}
    error = job.error or {}
    upstream_status = error.get("upstream_status")
    code = "server_error"
    if upstream_status == 429:
        code = "rate_limit_exceeded"
    elif isinstance(upstream_status, int) and 400 <= upstream_status < 500:
        code = "invalid_prompt"
    return {"code": code, "message": str(error.get("message") or "the response failed")}


def _usage(job: Job) -> dict[str, Any] | None:
    usage = (job.output or {}).get("usage")
    if not isinstance(usage, dict):
        return None

    def count(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    given = count(usage.get("prompt_tokens"))
    made = count(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details") or {}
    cached, written = details.get("cached_tokens"), details.get("cache_write_tokens")
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return {
        "input_tokens": given,
        "input_tokens_details": {
            "cached_tokens": count(cached),
            "cache_write_tokens": count(written),
        },
        "output_tokens": made,
        "output_tokens_details": {"reasoning_tokens": count(reasoning)},
        "total_tokens": count(usage.get("total_tokens")) or given + made,
    }


# --- webhooks


def webhook_message(event: Event, job: Job | None) -> tuple[str, dict[str, Any]] | None:
    """The ``response.*`` webhook (its type and OpenAI's body) that a terminal event of a
    response's job also reports; None for every other event."""
    if job is None or not event.type.is_terminal or job.metadata.get("via") != VIA:
        return None
    if event.type is EventType.SUCCEEDED:
        kind = "response.incomplete" if status_of(job) == "incomplete" else "response.completed"
    elif event.type is EventType.CANCELLED:
        kind = "response.cancelled"
    else:
        kind = "response.failed"
    body = {
        "id": new_id("evt"),
        "object": "event",
        "created_at": event.created_at // 1000,
        "type": kind,
        "timestamp": iso(event.created_at),
        "data": {"id": response_id(job.id)},
    }
    return kind, body
