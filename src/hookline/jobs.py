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


class Operation(enum.StrEnum):
    CHAT_COMPLETIONS = "chat.completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    # Not a call: the anchor row of a batch (see hookline.batches), never claimed, never shown.
    BATCH = "batch"

    @property
    def streams(self) -> bool:
        """Whether the upstream can stream this operation's output."""
        return self not in (Operation.EMBEDDINGS, Operation.BATCH)


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
    webhook: dict[str, Any] | None = None  # {"url": ..., "events": [...]}
    batch_id: str | None = None  # an item of this batch,
    batch_line: int | None = None  # from this line of its input file,
    custom_id: str | None = None  # with this custom_id

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Job:
        values = {f.name: row[f.name] for f in dataclasses.fields(cls)}
        values["status"] = JobStatus(values["status"])
        values["operation"] = Operation(values["operation"])
        values["metadata"] = values["metadata"] or {}
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
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "idempotency_key": job.idempotency_key,
        "webhook": job.webhook,
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "expires_at": iso(job.expires_at),
        "links": {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"},
    }
