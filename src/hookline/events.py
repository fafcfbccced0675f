"""The per-job event log: the one contract every delivery channel (poll, SSE, webhook, sink) reads.

Each event has a per-job ``seq`` (1, 2, 3, … with no gaps) and a store-wide ``id`` that grows with
insertion order (for tenant-wide streams). ``job.output.delta`` events carry the ``attempt`` that made
them: when a retry starts over, a new ``job.started`` with a higher attempt tells readers to discard the
deltas of the earlier attempt.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from hookline.jobs import iso


class EventType(enum.StrEnum):
    QUEUED = "job.queued"
    STARTED = "job.started"
    OUTPUT_DELTA = "job.output.delta"
    PROGRESS = "job.progress"
    LOG = "job.log"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"
    EXPIRED = "job.expired"
    BATCH_PROGRESS = "batch.progress"
    BATCH_COMPLETED = "batch.completed"
    BATCH_FAILED = "batch.failed"
    BATCH_CANCELLED = "batch.cancelled"
    BATCH_EXPIRED = "batch.expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EVENTS


TERMINAL_EVENTS = frozenset(
    {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED, EventType.EXPIRED,
     EventType.BATCH_COMPLETED, EventType.BATCH_FAILED, EventType.BATCH_CANCELLED,
     EventType.BATCH_EXPIRED}
)  # fmt: skip
BATCH_TERMINAL_EVENTS = frozenset(t for t in TERMINAL_EVENTS if t.value.startswith("batch."))


@dataclasses.dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be appended; the store gives it its ``seq`` and ``id``."""

    type: EventType
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    id: int
    job_id: str
    tenant: str
    seq: int
    type: EventType
    data: dict[str, Any]
    created_at: int

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Event:
        return cls(
            id=row["id"],
            job_id=row["job_id"],
            tenant=row["tenant"],
            seq=row["seq"],
            type=EventType(row["type"]),
            data=row["data"] or {},
            created_at=row["created_at"],
        )


def event_json(event: Event) -> dict[str, Any]:
    """An event as the API shows it (the job's log, SSE, WebSocket)."""
    return {
        "job_id": event.job_id,
        "seq": event.seq,
        "type": event.type.value,
        "data": event.data,
        "created_at": iso(event.created_at),
    }


# What an attempt's story is told by: its start, the log of a failed try, the job's ending.
ATTEMPT_EVENTS = (
    EventType.STARTED,
    EventType.LOG,
    *sorted(TERMINAL_EVENTS - BATCH_TERMINAL_EVENTS),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a job as its event log tells it. ``outcome``: ``running``, ``retried`` (it
    failed and the job was tried again), ``released`` (a stopping worker put the job back without
    counting the attempt), or the job's ending (``succeeded``, ``failed``, ``cancelled``,
    ``expired``). ``detail`` is the log's message, the error's or the ending's reason."""

    n: int
    upstream: str | None
    started_at: int
    ended_at: int | None = None
    outcome: str = "running"
    error: dict[str, Any] | None = None
    detail: str = ""


def attempts_of(events: Iterable[Event], counted: int | None = None) -> list[Attempt]:
    """Every attempt the events tell of, in order (events of other types are passed over).
    With ``counted`` (the job's ``attempts``), only the attempts that count: an attempt released
    and then started again under the same number is the later one, and one released and not yet
    started again is left out, so there are exactly ``counted`` of them."""
    attempts: list[Attempt] = []
    for event in events:
        data = event.data
        if event.type is EventType.STARTED:
            n = int(data.get("attempt") or len(attempts) + 1)
            attempts.append(Attempt(n, data.get("upstream"), event.created_at))
            continue
        if not attempts or attempts[-1].ended_at is not None:
            continue
        current = attempts[-1]
        if event.type is EventType.LOG:
            error = data.get("error")
            attempts[-1] = dataclasses.replace(
                current,
                ended_at=event.created_at,
                outcome="retried" if "attempt" in data else "released",
                error=error if isinstance(error, dict) else None,
                detail=str(data.get("message", "")),
            )
        elif event.type.is_terminal:
            error = data.get("error")
            error = error if isinstance(error, dict) else None
            attempts[-1] = dataclasses.replace(
                current,
                ended_at=event.created_at,
                outcome=event.type.value.removeprefix("job."),
                error=error,
                detail=str((error or {}).get("message") or data.get("reason") or ""),
            )
    if counted is None:
        return attempts
    latest = {attempt.n: attempt for attempt in attempts}  # a restart replaces a released try
    return [latest[n] for n in sorted(latest) if n <= counted]


def attempt_json(attempt: Attempt, model: str | None) -> dict[str, Any]:
    """An attempt as the API shows it (``attempt_log`` of ``GET /v1/jobs/{id}``): ``model`` is
    what its upstream was asked for."""
    return {
        "attempt": attempt.n,
        "upstream": attempt.upstream,
        "model": model,
        "outcome": attempt.outcome,
        "started_at": iso(attempt.started_at),
        "ended_at": iso(attempt.ended_at),
        "error": attempt.error,
    }
