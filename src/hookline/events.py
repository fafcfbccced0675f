"""The per-job event log: the one contract every delivery channel (poll, SSE, webhook, sink) reads.

Each event has a per-job ``seq`` (1, 2, 3, … with no gaps) and a store-wide ``id`` that grows with
insertion order (for tenant-wide streams). ``job.output.delta`` events carry the ``attempt`` that made
them: when a retry starts over, a new ``job.started`` with a higher attempt tells readers to discard the
deltas of the earlier attempt.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
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
