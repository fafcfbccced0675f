"""The job record and its lifecycle.

A job moves ``queued → running → succeeded | failed``; a retry sends ``running → queued`` again;
``queued | running → cancelled`` on request and ``queued → expired`` when its TTL passes before it
starts. Every change of status goes through :func:`check_transition`, and the store applies it with a
conditional UPDATE so that two actors (a worker finishing, a caller cancelling) can never both win.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
from collections.abc import Mapping
from typing import Any

from hookline.errors import Conflict


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)

ALLOWED_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.EXPIRED, JobStatus.FAILED}
    ),
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
}


_PASSTHROUGH_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}(?:\.[a-z][a-z0-9_]{0,31})*")
PASSTHROUGH_NAME_MAX = 32  # (the column's width)


class Operation(enum.StrEnum):
    """What a job asks of its upstream. Besides the members, any other well-formed name
    (``rerank``, ``audio.speech``: lowercase words joined by dots) is a *passthrough*
    operation: one an upstream declares in its ``operations``, whose request body goes as it
    came to the upstream's endpoint of that path (``/rerank``, ``/audio/speech``)."""

    CHAT_COMPLETIONS = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    IMAGES_GENERATIONS = "images.generations"
    # Not a call: the anchor row of a batch (see hookline.batches), never claimed, never shown.
    BATCH = "batch"

    @classmethod
    def _missing_(cls, value: object) -> Operation | None:
        if (
            isinstance(value, str)
            and len(value) <= PASSTHROUGH_NAME_MAX
            and _PASSTHROUGH_NAME.fullmatch(value)
        ):  # a pseudo-member, not cached: names a caller makes up cost no memory
            member = str.__new__(cls, value)
            member._name_ = value.upper().replace(".", "_")
            member._value_ = value
            return member
        return None

    @property
    def passthrough(self) -> bool:
        """Not one hookline models: the upstream's endpoint of the same path, as it came."""
        return self.value not in _MODELLED

    @property
    def path(self) -> str:
        """The endpoint's path below an upstream's base URL (``/images/generations``)."""
        return "/" + self.value.replace(".", "/")

    @property
    def streams(self) -> bool:
        """Whether the upstream can stream this operation's output."""
        return self in (Operation.CHAT_COMPLETIONS, Operation.COMPLETIONS)


_MODELLED = frozenset(operation.value for operation in Operation)


class Lane(enum.StrEnum):
    """Who waits on a job, which decides what it may wait behind (hookline.fairness)."""

    INTERACTIVE = "interactive"  # someone is watching: facade calls, streams, Prefer: wait
    DEFAULT = "default"  # the job API
    BATCH = "batch"  # batch items: they fill what the other lanes leave idle


def check_transition(current: JobStatus, new: JobStatus) -> None:
    """Raise :class:`Conflict` unless a job may go from ``current`` to ``new``."""
    if new not in ALLOWED_TRANSITIONS.get(current, frozenset()):
        raise Conflict(f"a {current.value} job cannot become {new.value}")


def sources_for(new: JobStatus) -> frozenset[JobStatus]:
    """Every status from which a job may move to ``new`` (the WHERE of a conditional UPDATE)."""
    return frozenset(s for s, targets in ALLOWED_TRANSITIONS.items() if new in targets)


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    id: str
    tenant: str
    status: JobStatus
    operation: Operation
    model: str
    upstream: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    metadata: dict[str, str]
    priority: int
    attempts: int
    max_attempts: int
    idempotency_key: str | None
    request_hash: str | None
    created_at: int
    updated_at: int
    started_at: int | None
    finished_at: int | None
    expires_at: int | None
    run_after: int
    lease_token: str | None
    lease_expires_at: int | None
    event_seq: int
    # Its own deliveries: {"url": ..., "events": [...]} of its webhook, "sinks": [names].
    webhook: dict[str, Any] | None = None
    batch_id: str | None = None  # an item of this batch,
    batch_line: int | None = None  # from this line of its input file,
    custom_id: str | None = None  # with this custom_id
    traceparent: str | None = None  # the W3C trace context it was submitted in (tracing on)
    lane: Lane = Lane.DEFAULT
    # Tokens a start reserves under a token limit (input estimated, plus max_tokens); None when
    # no token limit applied at its accept (hookline.fairness).
    expected_tokens: int | None = None
    # The last attempt's usage as the upstream reported it.
    input_tokens: int | None = None
    output_tokens: int | None = None
    key_id: str | None = None  # the API key that submitted it (its limits hold it back too)

    @classmethod
    def new(
        cls,
        *,
        id: str,
        tenant: str,
        operation: Operation,
        now: int,
        max_attempts: int,
        model: str = "",
        upstream: str = "",
        input: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        priority: int = 0,
        expires_at: int | None = None,
        **fields: Any,
    ) -> Job:
        """A job as submitted: queued, no attempt yet, its ``job.queued`` event its first
        (``event_seq`` 1). ``fields`` sets any other field (``idempotency_key``, ``webhook``, a
        batch item's ``batch_id``…)."""
        values: dict[str, Any] = {
            "id": id, "tenant": tenant, "status": JobStatus.QUEUED, "operation": operation,
            "model": model, "upstream": upstream, "input": {} if input is None else input,
            "output": None, "error": None, "metadata": {} if metadata is None else metadata,
            "priority": priority, "attempts": 0, "max_attempts": max_attempts,
            "idempotency_key": None, "request_hash": None, "created_at": now, "updated_at": now,
            "started_at": None, "finished_at": None, "expires_at": expires_at, "run_after": now,
            "lease_token": None, "lease_expires_at": None, "event_seq": 1,
        }  # fmt: skip
        values.update(fields)
        return cls(**values)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Job:
        values = {f.name: row[f.name] for f in dataclasses.fields(cls)}
        values["status"] = JobStatus(values["status"])
        values["operation"] = Operation(values["operation"])
        values["metadata"] = values["metadata"] or {}
        values["lane"] = Lane(values["lane"])
        return cls(**values)

    def evolve(self, **changes: Any) -> Job:
        """A copy with ``changes`` applied; a status change must be an allowed transition."""
        if "status" in changes and changes["status"] != self.status:
            check_transition(self.status, changes["status"])
        return dataclasses.replace(self, **changes)

    def as_row(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict would deep-copy the input on the accept path.
        row = {name: getattr(self, name) for name in _FIELD_NAMES}
        row["status"] = self.status.value
        row["operation"] = self.operation.value
        row["lane"] = self.lane.value
        return row


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Job))


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_json(job: Job) -> dict[str, Any]:
    base = f"/v1/jobs/{job.id}"
    return {
        "id": job.id,
        "object": "job",
        "status": job.status.value,
        "operation": job.operation.value,
        "model": job.model,
        "upstream": job.upstream,
        "input": job.input,
        "output": job.output,
        "error": job.error,
        "metadata": job.metadata,
        "priority": job.priority,
        "lane": job.lane.value,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "idempotency_key": job.idempotency_key,
        "webhook": _own_webhook(job.webhook),
        "sinks": (job.webhook or {}).get("sinks") or [],
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "expires_at": iso(job.expires_at),
        "links": {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"},
    }


def _own_webhook(webhook: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's webhook as the API shows it: its URL and events (None without a URL)."""
    if not webhook or not webhook.get("url"):
        return None
    if "sinks" not in webhook:
        return webhook
    return {"url": webhook["url"], "events": webhook.get("events")}
