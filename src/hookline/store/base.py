"""The storage interface: a few atomic operations that the queue logic (``hookline.queue``) composes.

Each method is one transaction. Status changes are conditional (``WHERE status IN …`` and, for a
worker, ``AND lease_token = …``) and append their events in the same transaction, so the event log and
the job row never disagree and two actors can never both finish one job.

A :class:`Store` holds jobs and their events, and carries the store of each other
aggregate on the same database: ``webhooks`` (:class:`~hookline.store.base_deliveries.Deliveries`)
and ``batches`` (:class:`~hookline.store.base_batches.Batches`), and ``insights``
(:class:`~hookline.store.base_insights.Insights`), what operators read of them all.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from hookline.config import RateLimit
from hookline.events import Event, EventType, NewEvent
from hookline.fairness import FairPolicy
from hookline.jobs import Job, JobStatus
from hookline.store.base_batches import Batches
from hookline.store.base_deliveries import Deliveries
from hookline.store.base_insights import Insights
from hookline.store.base_keys import Keys
from hookline.store.database import Capabilities


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
class Change:
    """One conditional status change of :meth:`Store.transition_many`."""

    job_id: str
    new_status: JobStatus
    changes: dict[str, Any]
    events: Sequence[NewEvent] = ()
    lease_token: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    jobs: list[Transitioned]
    # Set when the upstream's rate limit or a per-minute limit held claims back: when the next
    # call may start (ms).
    next_token_at: int | None = None
    # Runnable jobs were left queued because their tenant (or the upstream) is at a limit.
    held_back: bool = False


@dataclasses.dataclass(frozen=True)
class LimitState:
    """What a tenant (and some upstreams) use of their limits now (hookline.fairness)."""

    running: int  # the tenant's running jobs, on every upstream
    # scope (t:<tenant>, u:<upstream>, k:<key>) -> (starts, tokens, oldest start) of the last
    # minute
    window: Mapping[str, tuple[int, int, int]]
    key_running: int = 0  # the running jobs of the key asked about, on every upstream


@dataclasses.dataclass(frozen=True)
class QueueAhead:
    """The queued jobs that may start before one (``Store.queue_position``)."""

    earlier_lanes: int  # in the lanes served before its own
    own_tenant: int  # of its tenant, in its lane, before it
    other_tenants: Mapping[str, int]  # every other tenant's, in its lane
    finished: int  # jobs the upstream finished lately


@dataclasses.dataclass(frozen=True)
class TenantOverview:
    """A tenant as the operator sees it (``hookline tenants``)."""

    tenant: str
    queued: int
    running: int
    tokens_today: int  # of the jobs submitted today (UTC), and this month
    tokens_this_month: int


@dataclasses.dataclass(frozen=True)
class UsageRow:
    """A tenant's jobs of one model submitted on one UTC day, and their tokens."""

    day: int  # the day's first millisecond
    model: str
    jobs: int
    succeeded: int
    input_tokens: int
    output_tokens: int


@dataclasses.dataclass(frozen=True)
class Appended:
    events: list[Event]
    deliveries: int = 0  # webhook messages written with the events


class Store(abc.ABC):
    """Durable jobs and their events. Raises only :mod:`hookline.errors` exceptions."""

    capabilities: Capabilities  # the database's (see hookline.store.database)
    webhooks: Deliveries  # endpoints, secrets and the delivery outbox
    batches: Batches  # files and batches
    keys: Keys  # API keys (hookline.store.base_keys)
    insights: Insights  # what operators read: the gauges of /metrics, the dashboard's views

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`~hookline.errors.StoreUnavailable` unless the database answers."""

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
    async def accept_job(
        self,
        job: Job,
        first_events: Sequence[NewEvent],
        running_limit: int | None,
        policy: FairPolicy | None = None,
    ) -> AcceptOutcome:
        """Insert one new job as :meth:`insert_jobs` does (``running_limit``: its upstream's),
        written in one transaction with the other accepts that arrive meanwhile. A job accepted
        already running is inserted queued instead also when interactive jobs wait for its
        upstream's room, or when ``policy``'s limits of its tenant or upstream hold it back (a
        start within them is counted in the per-minute window)."""

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
        self,
        job_id: str,
        after_seq: int = 0,
        limit: int = 1000,
        types: Collection[EventType] = (),
    ) -> list[Event]:
        """The job's events with ``seq`` > ``after_seq``, in order; only of ``types`` if given."""

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
        policy: FairPolicy | None = None,
    ) -> Claimed:
        """Move up to ``limit`` runnable queued jobs of ``upstream`` to running under ``lease_token``.

        Lanes in order (interactive, default, batch, with the batch lane's floor share of the
        starts), tenants within a lane by their weighted share (:mod:`hookline.fairness`), and a
        tenant's own jobs by priority, then oldest first. Each claimed job gets ``attempts + 1``
        and a ``job.started`` event. Jobs whose TTL has passed are never claimed. With
        ``max_running``, no more are claimed than keep the upstream's running jobs, across every
        process, at most that many; with ``rate``, no more than the upstream's shared token
        bucket allows; with ``policy``, none beyond its tenants' and the upstream's limits.
        Without a policy every tenant weighs 1.
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
        settle_tokens: int | None = None,
    ) -> Transitioned | None:
        """Apply an allowed status change with ``changes`` and append ``events``, atomically.
        ``settle_tokens``: the tokens the attempt used, in place of those its start reserved
        under a per-minute limit.

        Returns ``None`` (and changes nothing) when the job is not in a status that may move to
        ``new_status``, belongs to another tenant, or is no longer held under ``lease_token``.
        """

    @abc.abstractmethod
    async def transition_many(
        self, changes: Sequence[Change], now: int
    ) -> list[Transitioned | None]:
        """:meth:`transition` for each of ``changes`` in order (several jobs, or several steps
        of one), all in one transaction: for each, what it did, or None when it did not apply."""

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
    async def keep_cancelled_output(
        self,
        job_id: str,
        attempt: int,
        output: dict[str, Any],
        usage: tuple[int, int] | None,
        now: int,
    ) -> bool:
        """Record what attempt ``attempt`` of a job cancelled while it ran had produced (its
        output and usage, ``(input, output)`` tokens), if the job is cancelled and that was its
        last attempt; True if recorded. No event: the job's
        ``job.cancelled`` came already."""

    @abc.abstractmethod
    async def ids_past_ttl(self, now: int, limit: int) -> list[str]:
        """Queued jobs whose ``expires_at`` has passed."""

    @abc.abstractmethod
    async def queue_position(self, job: Job, since: int, cap: int) -> QueueAhead:
        """For a queued job: the queued jobs of its upstream in the lanes before its own, its
        tenant's before it in its lane (by priority and age), every other tenant's in its lane
        (each count at most ``cap``), and how many jobs that upstream finished since ``since``."""

    @abc.abstractmethod
    async def lapsed_leases(self, now: int, limit: int) -> list[Job]:
        """Running jobs whose lease ran out (their worker died or stalled)."""

    @abc.abstractmethod
    async def lapse_all_leases(self, now: int) -> int:
        """End every lease still running at ``now`` (jobs, webhook messages, batches), as if it
        had run out just before: for a process that knows every other user of the database is
        gone, so that their work is taken again at once. The number of leases ended."""

    # Fair sharing: what a tenant uses

    @abc.abstractmethod
    async def limit_state(
        self, tenant: str, upstreams: Collection[str], now: int, key_id: str | None = None
    ) -> LimitState:
        """The tenant's running jobs and the last minute's starts of it and of ``upstreams``;
        with ``key_id``, of that API key too."""

    @abc.abstractmethod
    async def tokens_spent(self, tenant: str, since: int, key_id: str | None = None) -> int:
        """Tokens (input + output, as reported) of the tenant's jobs submitted since ``since``
        (with ``key_id``: of those that key submitted)."""

    @abc.abstractmethod
    async def usage_by_day(self, tenant: str, since: int) -> list[UsageRow]:
        """The tenant's jobs and tokens per UTC day and model, submitted since ``since``."""

    @abc.abstractmethod
    async def tenants_overview(self, day: int, month: int) -> list[TenantOverview]:
        """Every tenant with jobs queued, running, or submitted since ``month``, with the tokens
        of its jobs submitted since ``day`` and since ``month``."""

    # Retention

    @abc.abstractmethod
    async def delete_finished_jobs(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` jobs finished before ``before``, with their events, in one
        short transaction; the number deleted."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str, tenant: str) -> bool:
        """Delete one finished job of ``tenant`` with its events (its webhook messages stay);
        False when the tenant has no such job, or it has not finished."""

    @abc.abstractmethod
    async def delete_settled_deliveries(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` webhook messages settled before ``before``, with their attempt
        log, in one short transaction; the number deleted."""
