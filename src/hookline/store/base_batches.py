"""The storage interface of files and batches, with their records.

A batch moves ``validating → in_progress → finalizing → completed | expired | cancelled``; a
cancel sends ``validating | in_progress → cancelling → finalizing``, and a batch whose items
cannot be written (or that is created with bad lines) ends ``failed``. Every change of status
goes through :meth:`Batches.transition`, a conditional UPDATE from the statuses allowed to move
there (:data:`ALLOWED_TRANSITIONS`), so two actors never both end one batch.

A batch's items are jobs (``jobs.batch_id``); its events go through the job store under its
anchor row (see :mod:`hookline.batches`). Each method is one transaction unless it says
otherwise. Raises only :mod:`hookline.errors` exceptions.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from hookline.jobs import Job
from hookline.store.database import Capabilities


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
# The batches a runner drives.
ACTIVE_STATUSES = frozenset(BatchStatus) - TERMINAL_STATUSES

ALLOWED_TRANSITIONS: Mapping[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset(
        {BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FAILED}
    ),
    BatchStatus.IN_PROGRESS: frozenset(
        {BatchStatus.CANCELLING, BatchStatus.FINALIZING, BatchStatus.FAILED}
    ),
    BatchStatus.CANCELLING: frozenset({BatchStatus.FINALIZING, BatchStatus.FAILED}),
    BatchStatus.FINALIZING: frozenset(
        {BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED, BatchStatus.FAILED}
    ),
}


def sources_for(new: BatchStatus) -> frozenset[BatchStatus]:
    """Every status from which a batch may move to ``new`` (the WHERE of a conditional
    UPDATE)."""
    return frozenset(s for s, targets in ALLOWED_TRANSITIONS.items() if new in targets)


@dataclasses.dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int

    @classmethod
    def from_row(cls, row: Any) -> FileRecord:
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    tenant: str
    status: BatchStatus
    endpoint: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    completion_window: str
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    item_events: list[str]
    total: int
    completed: int
    failed: int
    lines_queued: int
    created_at: int
    updated_at: int
    expires_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    progress_at: int | None
    # The upstreams whose items run as provider batches (docs/async-upstreams.md).
    provider_upstreams: list[str] | None = None

    @classmethod
    def from_row(cls, row: Any) -> BatchRecord:
        values = {f.name: row.get(f.name) for f in dataclasses.fields(cls)}
        values["status"] = BatchStatus(values["status"])
        return cls(**values)


class PartState(enum.StrEnum):
    """Where a provider batch stands, as hookline drives it."""

    PENDING = "pending"  # planned: not sent yet
    CREATING = "creating"  # a creation was tried: look it up before creating again
    SUBMITTED = "submitted"  # created (its ids recorded): followed by webhook and poll
    FETCHING = "fetching"  # ended at the provider: its results are being read
    DONE = "done"  # every item of the part has ended


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderPart:
    """One provider batch: the items of one upstream from ``first_line`` to ``last_line``."""

    id: str
    batch_id: str
    part: int
    upstream: str
    first_line: int
    last_line: int
    requests: int
    state: PartState
    provider_status: str | None
    provider_batch_id: str | None
    provider_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    results_url: str | None
    completed: int
    failed: int
    errors: list[dict[str, Any]] | None
    stop: str | None
    stop_sent: bool
    creating_at: int | None
    next_poll_at: int
    poll_ms: int
    polls: int
    created_at: int
    updated_at: int

    @classmethod
    def from_row(cls, row: Any) -> ProviderPart:
        values = {f.name: row[f.name] for f in dataclasses.fields(cls)}
        values["state"] = PartState(values["state"])
        values["stop_sent"] = bool(values["stop_sent"])
        return cls(**values)


class Batches(abc.ABC):
    """Files (kept in chunks, never whole in memory) and batches."""

    capabilities: Capabilities  # the database's (see hookline.store.database)

    # --- files

    @abc.abstractmethod
    async def create_file(
        self, record: FileRecord, chunks: AsyncIterator[bytes], max_bytes: int
    ) -> FileRecord | None:
        """Store a file from its chunks, a short transaction per piece; the record as stored
        (its ``bytes`` counted). None, and nothing kept, once it passes ``max_bytes``; nothing
        kept either if reading ``chunks`` fails (the error goes on)."""

    @abc.abstractmethod
    async def write_file(self, record: FileRecord, chunks: AsyncIterator[bytes]) -> FileRecord:
        """:meth:`create_file` without a limit."""

    @abc.abstractmethod
    def read_file(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's content, as it was stored (nothing for an unknown file)."""

    @abc.abstractmethod
    async def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        """The tenant's file; None if it has none of that id."""

    @abc.abstractmethod
    async def list_files(
        self, tenant: str, purpose: str | None, after: str | None, limit: int
    ) -> list[FileRecord]:
        """The tenant's files (of ``purpose``, when given), newest first, strictly older than
        ``after`` when given."""

    @abc.abstractmethod
    async def delete_file(self, tenant: str, file_id: str) -> bool:
        """Delete the tenant's file and its content; False if it has none of that id."""

    # --- batches

    @abc.abstractmethod
    async def insert_batch(self, row: dict[str, Any], anchor: Job) -> None:
        """The batch (every column of ``row``) and its anchor job row, together."""

    @abc.abstractmethod
    async def delete_batch(self, batch_id: str) -> None:
        """Take back a batch that could not be created whole: its row, its anchor, the items
        written so far, their events and the webhook messages reporting them, together."""

    @abc.abstractmethod
    async def get_batch(self, batch_id: str, tenant: str | None = None) -> BatchRecord | None:
        """The batch (the tenant's, when given); None if there is no such one."""

    @abc.abstractmethod
    async def list_batches(self, tenant: str, after: str | None, limit: int) -> list[BatchRecord]:
        """The tenant's batches, newest first, strictly older than ``after`` when given."""

    @abc.abstractmethod
    async def update_batch(self, batch_id: str, values: dict[str, Any]) -> BatchRecord | None:
        """Change a batch's fields other than its status (which only :meth:`transition`
        changes: a ``status`` in ``values`` is a ValueError); the batch after, or None if there
        is no such batch."""

    @abc.abstractmethod
    async def transition(
        self, batch_id: str, new_status: BatchStatus, values: dict[str, Any]
    ) -> BatchRecord | None:
        """Move the batch to ``new_status``, with ``values``, if its status may move there
        (:data:`ALLOWED_TRANSITIONS`); the batch after. None, and nothing changed, if it may
        not (or there is no such batch)."""

    @abc.abstractmethod
    async def any_in(self, statuses: Collection[BatchStatus]) -> bool:
        """Whether some batch is in one of ``statuses`` (a read: no write lock taken)."""

    @abc.abstractmethod
    async def claim_batches(
        self,
        statuses: Collection[BatchStatus],
        now: int,
        lease_token: str,
        lease_expires_at: int,
    ) -> list[BatchRecord]:
        """Lease until ``lease_expires_at`` (or renew) the batches in ``statuses`` that this
        ``lease_token`` holds, that no runner holds, or whose runner's lease lapsed by ``now``:
        one runner at a time drives each. Up to 100 at a time."""

    @abc.abstractmethod
    async def release_batches(self, lease_token: str) -> None:
        """Give back every batch leased under ``lease_token``: another runner may take them at
        once."""

    @abc.abstractmethod
    async def item_counts(self, batch_id: str) -> dict[str, int]:
        """How many of the batch's items are in each job status (absent: none)."""

    @abc.abstractmethod
    async def items(self, batch_id: str, after_line: int, limit: int) -> list[Job]:
        """Up to ``limit`` of the batch's items after line ``after_line``, in line order."""

    @abc.abstractmethod
    async def ended_without_event(self) -> list[BatchRecord]:
        """Batches whose row has ended (a terminal status) while their anchor still runs: the
        terminal event is still to be written. Up to 100 at a time."""

    @abc.abstractmethod
    async def queued_item_ids(self, batch_id: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of the batch's items still queued."""

    @abc.abstractmethod
    async def renew_batch_lease(self, batch_id: str, lease_token: str, until: int) -> bool:
        """Extend the runner's lease of one batch; False if ``lease_token`` no longer holds it."""

    # --- provider batches (hookline.batches.provider)

    @abc.abstractmethod
    async def insert_parts(self, rows: list[dict[str, Any]]) -> None:
        """A batch's provider batches as planned (every column of each row), together."""

    @abc.abstractmethod
    async def parts(self, batch_id: str) -> list[ProviderPart]:
        """The batch's provider batches, in part order."""

    @abc.abstractmethod
    async def update_part(self, part_id: str, values: dict[str, Any]) -> ProviderPart | None:
        """Change a provider batch's row; the row after (None if there is none)."""

    @abc.abstractmethod
    async def part_items(
        self, batch_id: str, upstream: str, after_line: int, last_line: int, limit: int
    ) -> list[Job]:
        """Up to ``limit`` of the batch's items run by ``upstream`` (its ``jobs.upstream``)
        with lines in ``(after_line, last_line]``, in line order."""

    @abc.abstractmethod
    async def open_part_items(
        self, batch_id: str, upstream: str, first_line: int, last_line: int, limit: int
    ) -> list[Job]:
        """Up to ``limit`` of those items that have not ended."""

    @abc.abstractmethod
    async def provider_batch_ids(self, upstream: str) -> set[str]:
        """The ids of every provider batch of ``upstream`` that a part has recorded: a lookup for
        a creation whose answer was lost must not take one of them."""

    @abc.abstractmethod
    async def poke_part(self, upstream: str, provider_batch_id: str, now: int) -> str | None:
        """Have the provider batch of that id looked at now (an inbound webhook said it
        changed); the hookline batch it belongs to, or None if it is none of ours."""

    @abc.abstractmethod
    async def record_inbound(self, upstream: str, webhook_id: str, now: int, forget: int) -> bool:
        """Remember an inbound webhook's id; False (a replay) if it was seen before. Ids
        received before ``forget`` are let go."""
