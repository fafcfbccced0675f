"""The storage interface: a few atomic operations that the queue logic (``hookline.queue``) composes.

Each method is one transaction. Status changes are conditional (``WHERE status IN …`` and, for a
worker, ``AND lease_token = …``) and append their events in the same transaction, so the event log and
the job row never disagree and two actors can never both finish one job.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from hookline.config import RateLimit
from hookline.events import Event, NewEvent
from hookline.jobs import Job, JobStatus


@dataclasses.dataclass(frozen=True, slots=True)
class AcceptOutcome:
    """Result of inserting one new job: ``duplicate`` when its idempotency key was already taken."""

    job: Job  # as inserted: queued, when a job accepted running had no room (see insert_jobs)
    duplicate: bool = False
    deliveries: int = 0  # webhook messages its transaction wrote (for the whole batch)


@dataclasses.dataclass(frozen=True, slots=True)
class Transitioned:
    job: Job
    events: list[Event]
    deliveries: int = 0  # webhook messages written with the events


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    jobs: list[Transitioned]
    # Set when the upstream's rate limit held claims back: when the next call may start (ms).
    next_token_at: int | None = None


@dataclasses.dataclass(frozen=True)
class Appended:
    events: list[Event]
    deliveries: int = 0  # webhook messages written with the events


class Store(abc.ABC):
    """Durable jobs, events and API keys. Raises only :mod:`hookline.errors` exceptions."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`~hookline.errors.StoreUnavailable` unless the database answers."""

    # API keys

    @abc.abstractmethod
    async def insert_api_key(
        self, key_id: str, tenant: str, key_hash: str, prefix: str, now: int
    ) -> None: ...

    @abc.abstractmethod
    async def tenant_for_key_hash(self, key_hash: str) -> str | None: ...

    # Jobs

    @abc.abstractmethod
    async def insert_jobs(
        self,
        items: Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]],
        running_limits: Mapping[str, int] | None = None,
    ) -> list[AcceptOutcome]:
        """Insert new jobs with their first events (the last has ``job.event_seq``), in as few
        transactions as possible.

        An item whose ``(tenant, idempotency_key)`` exists already is not inserted and comes back with
        ``duplicate=True``; the others are inserted regardless. A job accepted already running
        (claimed by the accepting process) is inserted queued instead, with only its first event,
        when its upstream already runs its ``running_limits`` number of jobs.
        """

    @abc.abstractmethod
    async def get_job(self, job_id: str, tenant: str | None = None) -> Job | None: ...

    @abc.abstractmethod
    async def find_job_by_idempotency_key(self, tenant: str, key: str) -> Job | None: ...

    @abc.abstractmethod
    async def list_jobs(
        self,
        tenant: str,
        *,
        statuses: Collection[JobStatus] = (),
        operations: Collection[str] = (),
        before_id: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """The tenant's jobs, newest first, strictly older than ``before_id`` when given."""

    @abc.abstractmethod
    async def list_events(
        self, job_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[Event]: ...

    @abc.abstractmethod
    async def list_tenant_events(
        self, tenant: str, after_id: int = 0, limit: int = 1000
    ) -> list[Event]:
        """The tenant's events with store-wide ``id`` > ``after_id``, in id order."""

    @abc.abstractmethod
    async def latest_tenant_event_id(self, tenant: str) -> int:
        """The store-wide id of the tenant's newest event (0 if none)."""

    @abc.abstractmethod
    async def claim_jobs(
        self,
        upstream: str,
        limit: int,
        *,
        now: int,
        lease_token: str,
        lease_expires_at: int,
        max_running: int | None = None,
        rate: RateLimit | None = None,
    ) -> Claimed:
        """Move up to ``limit`` runnable queued jobs of ``upstream`` to running under ``lease_token``.

        Highest priority first, then oldest first. Each claimed job gets ``attempts + 1`` and a
        ``job.started`` event. Jobs whose TTL has passed are never claimed. With ``max_running``,
        no more are claimed than keep the upstream's running jobs, across every process, at most
        that many; with ``rate``, no more than the upstream's shared token bucket allows.
        """

    @abc.abstractmethod
    async def renew_leases(
        self, job_ids: Collection[str], lease_token: str, lease_expires_at: int, now: int
    ) -> set[str]:
        """Extend the leases still held; return the ids of the jobs still running under the token."""

    @abc.abstractmethod
    async def transition(
        self,
        job_id: str,
        new_status: JobStatus,
        *,
        now: int,
        changes: dict[str, Any] | None = None,
        events: Sequence[NewEvent] = (),
        tenant: str | None = None,
        lease_token: str | None = None,
    ) -> Transitioned | None:
        """Apply an allowed status change with ``changes`` and append ``events``, atomically.

        Returns ``None`` (and changes nothing) when the job is not in a status that may move to
        ``new_status``, belongs to another tenant, or is no longer held under ``lease_token``.
        """

    @abc.abstractmethod
    async def append_events(
        self, job_id: str, lease_token: str, events: Sequence[NewEvent], now: int
    ) -> Appended | None:
        """Append events to a running job held under ``lease_token``; ``None`` if it is not."""

    @abc.abstractmethod
    async def append_events_many(
        self, items: Sequence[tuple[str, str, Sequence[NewEvent]]], now: int
    ) -> list[Appended | None]:
        """:meth:`append_events` for several jobs ``(job_id, lease_token, events)``, in one
        transaction."""

    @abc.abstractmethod
    async def ids_past_ttl(self, now: int, limit: int) -> list[str]:
        """Queued jobs whose ``expires_at`` has passed."""

    @abc.abstractmethod
    async def lapsed_leases(self, now: int, limit: int) -> list[Job]:
        """Running jobs whose lease ran out (their worker died or stalled)."""

    # Retention

    @abc.abstractmethod
    async def delete_finished_jobs(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` jobs finished before ``before``, with their events, in one
        short transaction; the number deleted."""

    @abc.abstractmethod
    async def delete_settled_deliveries(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` webhook messages settled before ``before``, with their attempt
        log, in one short transaction; the number deleted."""
