"""Request models (validated by FastAPI) and the JSON shapes of jobs and events."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from hookline.api.openai_schemas import REQUEST_MODELS
from hookline.api.problems import RequestProblem
from hookline.events import EventType
from hookline.ids import has_prefix
from hookline.jobs import PASSTHROUGH_NAME_MAX, JobStatus, Operation
from hookline.responses import WEBHOOK_EVENT_TYPES


class JobOperation(enum.StrEnum):
    """The operations a caller may submit: every :class:`Operation` but the batch anchor row,
    which only a batch makes."""

    CHAT_COMPLETIONS = Operation.CHAT_COMPLETIONS.value
    COMPLETIONS = Operation.COMPLETIONS.value
    EMBEDDINGS = Operation.EMBEDDINGS.value
    IMAGES_GENERATIONS = Operation.IMAGES_GENERATIONS.value

    @property
    def operation(self) -> Operation:
        return Operation(self.value)


MAX_MODEL_CHARS = 256

# What each operation's OpenAI request body must contain at the least.
_REQUIRED_INPUT: dict[JobOperation, tuple[str, type | tuple[type, ...]]] = {
    JobOperation.CHAT_COMPLETIONS: ("messages", list),
    JobOperation.COMPLETIONS: ("prompt", (str, list)),
    JobOperation.EMBEDDINGS: ("input", (str, list)),
    JobOperation.IMAGES_GENERATIONS: ("prompt", str),
}
_JSON_KIND: dict[type, str] = {list: "an array", str: "a string", dict: "an object"}


def _json_kind(value: object) -> str:
    """How JSON names ``value``'s type, for an error message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    for kind, name in _JSON_KIND.items():
        if isinstance(value, kind):
            return name
    return "null"


# Any other operation is a passthrough one (hookline.jobs.Operation): an upstream must declare it.
PassthroughOperation = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$",
        max_length=PASSTHROUGH_NAME_MAX,
        description="An operation an upstream declares in its `operations` (e.g. rerank).",
    ),
]


def page_cursor(cursor: str | None, prefix: str) -> str | None:
    """A list's ``cursor`` parameter, which must be an id the list handed out as ``next_cursor``
    (``prefix_…``); a 400 problem otherwise, rather than a page that is silently empty."""
    if cursor is not None and not has_prefix(cursor, prefix):
        raise RequestProblem(
            400,
            f"cursor {cursor[:64]!r} is not a cursor this list gave: pass its next_cursor back",
            slug="invalid-cursor",
        )
    return cursor


KNOWN_EVENT_FILTERS = frozenset(
    {*(e.value for e in EventType), "*", "job.*", "endpoint.disabled", *WEBHOOK_EVENT_TYPES,
     "response.*"}
)  # fmt: skip


def check_event_filters(events: list[str] | None) -> list[str] | None:
    unknown = sorted(set(events or ()) - KNOWN_EVENT_FILTERS)
    if unknown:
        raise ValueError(f"unknown event types {unknown}; known: {sorted(KNOWN_EVENT_FILTERS)}")
    return events


def _needs(field: str) -> dict[str, Any]:
    """The JSON schema of an OpenAI request body with ``field`` (see ``_REQUIRED_INPUT``)."""
    if field == "messages":
        message = {
            "type": "object",
            "required": ["role"],
            "properties": {"role": {"type": "string"}},
        }
        kind: dict[str, Any] = {"type": "array", "minItems": 1, "items": message}
    else:
        kind = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1}]}
    return {"required": [field], "properties": {field: kind}}


SinkName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class WebhookSpec(BaseModel):
    """Where to POST this job's events; signed with the tenant's secret (GET /v1/webhook-secret)."""

    model_config = ConfigDict(extra="forbid")

    # No control characters: a multipart batch's webhook is not JSON, whose limits refuse a NUL.
    url: str = Field(min_length=1, max_length=2048, pattern=r"^[^\x00-\x1f\x7f]*$")
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

    operation: JobOperation | PassthroughOperation = Field(union_mode="left_to_right")
    input: dict[str, Any] = Field(
        description=(
            "The OpenAI-compatible request body: with messages for chat.completions, prompt for "
            "completions, input for embeddings."
        ),
        json_schema_extra={"anyOf": [_needs(field) for field in ("messages", "prompt", "input")]},
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MODEL_CHARS,
        description="Defaults to input.model.",
    )
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    # Strict: "5" or true is not a priority, and a number is a finite one.
    priority: StrictInt = Field(default=0, ge=-100, le=100, description="Higher runs first.")
    ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        strict=True,
        allow_inf_nan=False,
        description="Expire the job if it has not started by then.",
    )
    webhook: WebhookSpec | None = None
    sinks: list[SinkName] | None = Field(
        default=None,
        max_length=16,
        description="Data sinks (GET /v1/sinks) to send this job's events to, besides those "
        "that receive every job.",
    )

    @model_validator(mode="after")
    def _check(self) -> JobCreate:
        field, kind = _REQUIRED_INPUT.get(self.operation, ("", object))  # type: ignore[call-overload]
        value = self.input.get(field) if field else None
        if field and value is None:
            raise ValueError(f"input.{field} is required for {self.operation}")
        if field and not isinstance(value, kind):
            kinds = " or ".join(
                _JSON_KIND[k] for k in (kind if isinstance(kind, tuple) else (kind,))
            )
            raise ValueError(
                f"input.{field} must be {kinds} for {self.operation}, not {_json_kind(value)}"
            )
        if isinstance(value, list) and not value:
            raise ValueError(f"input.{field} must not be empty")
        if (
            isinstance(value, list)
            and field == "messages"
            and not all(
                isinstance(message, dict) and isinstance(message.get("role"), str)
                for message in value
            )
        ):  # what no upstream takes is refused before it is a job, not by the upstream after
            raise ValueError("input.messages: each message is an object with a role")
        if self.model is None:
            model = self.input.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("model is required (as model or input.model)")
            if len(model) > MAX_MODEL_CHARS:  # as for model itself: the store keeps no more
                raise ValueError(f"input.model is longer than {MAX_MODEL_CHARS} characters")
            self.model = model
        request = REQUEST_MODELS.get(str(self.operation))
        if request is not None:  # what no upstream takes is refused before it is a job
            try:
                request.model_validate({**self.input, "model": self.model})
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in ("input", *error["loc"]))
                raise ValueError(f"{where}: {error['msg']}") from None
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


class QueuePosition(BaseModel):
    """Where a queued job stands (``GET /v1/jobs/{id}``)."""

    position: int = Field(description="Among the jobs waiting for the same upstream; 1: next.")
    upstream: str
    estimated_start_seconds: float | None = Field(
        description="From the upstream's recent throughput; null while it has finished none."
    )


class AttemptOut(BaseModel):
    """One attempt of a job, from its event log."""

    attempt: int = Field(description="Its number, as `job.started` carries it (1, 2, …).")
    upstream: str | None
    model: str | None = Field(
        description="What its upstream is asked for under the current routes (a route's "
        "target model; else the job's own)."
    )
    outcome: Literal["running", "retried", "succeeded", "failed", "cancelled", "expired"] = Field(
        description="running; retried (it failed and the job was tried again, here or on a "
        "route's next target); or how the job ended with it."
    )
    started_at: str
    ended_at: str | None
    error: JobError | None = Field(description="Why it failed (retried or failed).")


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    queue: QueuePosition | None = Field(
        default=None, description="A queued job's position (GET of one job only)."
    )
    operation: JobOperation | PassthroughOperation = Field(union_mode="left_to_right")
    model: str
    upstream: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: JobError | None
    metadata: dict[str, str]
    priority: int
    lane: Literal["interactive", "default", "batch"] = Field(
        description="Who waits on it, which decides what it may wait behind (docs/fairness.md)."
    )
    attempts: int = Field(description="How many attempts have started (the count).")
    attempt_log: list[AttemptOut] | None = Field(
        default=None,
        description="Every attempt that counts, oldest first (GET of one job only: the list "
        "and the other answers leave it out).",
    )
    max_attempts: int
    idempotency_key: str | None
    webhook: dict[str, Any] | None = Field(description="The job's own webhook (url, events).")
    sinks: list[str] = Field(default_factory=list, description="The data sinks it named.")
    batch_id: str | None = Field(description="The batch this job is an item of.")
    custom_id: str | None = Field(description="The item's custom_id in its batch.")
    created_at: str
    started_at: str | None
    finished_at: str | None
    expires_at: str | None
    waiting_for: (
        Literal[
            "tenant_concurrency", "tenant_rpm", "tenant_tpm", "key_concurrency", "key_rpm",
            "key_tpm", "upstream_tpm",
        ]
        | None
    ) = Field(
        default=None,
        description="The limit a queued job waits for, if one holds it back: its tenant's, its "
        "API key's own, or its upstream's.",
    )  # fmt: skip
    expected_start_at: str | None = Field(
        default=None, description="When that limit may let it start (per-minute limits)."
    )
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
