"""Request models (validated by FastAPI) and the JSON shapes of jobs and events."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hookline.events import EventType
from hookline.jobs import JobStatus, Operation

# What each operation's OpenAI request body must contain at the least.
_REQUIRED_INPUT: dict[Operation, tuple[str, type | tuple[type, ...]]] = {
    Operation.CHAT_COMPLETIONS: ("messages", list),
    Operation.COMPLETIONS: ("prompt", (str, list)),
    Operation.EMBEDDINGS: ("input", (str, list)),
}


KNOWN_EVENT_FILTERS = frozenset({*(e.value for e in EventType), "*", "job.*", "endpoint.disabled"})


def check_event_filters(events: list[str] | None) -> list[str] | None:
    unknown = sorted(set(events or ()) - KNOWN_EVENT_FILTERS)
    if unknown:
        raise ValueError(f"unknown event types {unknown}; known: {sorted(KNOWN_EVENT_FILTERS)}")
    return events


class WebhookSpec(BaseModel):
    """Where to POST this job's events; signed with the tenant's secret (GET /v1/webhook-secret)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[str] | None = Field(
        default=None,
        max_length=32,
        description="Event types to send; default: the terminal ones.",
    )

    @model_validator(mode="after")
    def _check_events(self) -> WebhookSpec:
        check_event_filters(self.events)
        return self


class JobCreate(BaseModel):
    """A new job: an OpenAI-compatible request body (``input``) for one ``operation``."""

    model_config = ConfigDict(extra="forbid")

    operation: Operation
    input: dict[str, Any] = Field(description="The OpenAI-compatible request body.")
    model: str | None = Field(
        default=None, min_length=1, max_length=256, description="Defaults to input.model."
    )
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    priority: int = Field(default=0, ge=-100, le=100, description="Higher runs first.")
    ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        description="Expire the job if it has not started by then.",
    )
    webhook: WebhookSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> JobCreate:
        field, kind = _REQUIRED_INPUT[self.operation]
        value = self.input.get(field)
        if not isinstance(value, kind) or (isinstance(value, list) and not value):
            raise ValueError(f"input.{field} is required for {self.operation.value}")
        if self.model is None:
            model = self.input.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("model is required (as model or input.model)")
            self.model = model
        for key, value in self.metadata.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are at most 64 characters and values 512")
        return self


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str


class JobError(BaseModel):
    type: str
    message: str
    upstream_status: int | None = None


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    operation: Operation
    model: str
    upstream: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: JobError | None
    metadata: dict[str, str]
    priority: int
    attempts: int
    max_attempts: int
    idempotency_key: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    expires_at: str | None
    links: JobLinks


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None


class EventOut(BaseModel):
    job_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: str


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
