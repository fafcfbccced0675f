"""The ``Insights`` interface: what operators read of the store — the gauges ``/metrics`` shows
and the dashboard's listings and charts, of one tenant or (``tenant=None``, an operator) of all.

Read-only: every change the dashboard makes goes through the tenant-scoped interfaces
(:class:`~hookline.store.base.Store`, :class:`~hookline.store.base_deliveries.Deliveries`),
with the tenant that owns the record (:meth:`Insights.owner`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection
from typing import Literal

from hookline.deliveries import Delivery, Endpoint
from hookline.jobs import Job
from hookline.observability.metrics import DatabaseGauges
from hookline.store.base_batches import BatchRecord

Kind = Literal["job", "delivery", "endpoint", "batch"]


@dataclasses.dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs a listing shows (every field optional)."""

    statuses: Collection[str] = ()
    operations: Collection[str] = ()
    model: str | None = None
    upstream: str | None = None
    since: int | None = None  # created at or after (epoch ms)
    until: int | None = None  # created before


@dataclasses.dataclass(frozen=True, slots=True)
class MinuteCounts:
    """Jobs that ended in one minute (``minute``: epoch ms at its start)."""

    minute: int
    succeeded: int
    failed: int  # failed or expired
    cancelled: int
    latency_avg_ms: float | None  # accept to end, of those that succeeded
    latency_max_ms: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamLoad:
    name: str
    queued: int
    oldest_queued_at: int | None
    running: int
    succeeded_last_hour: int
    failed_last_hour: int


class Insights(abc.ABC):
    @abc.abstractmethod
    async def gauges(self, now: int, tenant: str | None = None) -> DatabaseGauges:
        """Queue depth and oldest job per upstream, running jobs, the outbox, endpoint health,
        batches by status: what ``/metrics`` exports from the database (all tenants)."""

    @abc.abstractmethod
    async def jobs(
        self, tenant: str | None, where: JobFilter, before_id: str | None, limit: int
    ) -> list[Job]:
        """Jobs (not batch anchors), newest first, strictly older than ``before_id``."""

    @abc.abstractmethod
    async def deliveries(
        self,
        tenant: str | None,
        *,
        status: str | None = None,
        endpoint_id: str | None = None,
        job_id: str | None = None,
        sink: str | None = None,
        before_id: str | None = None,
        limit: int = 50,
    ) -> list[Delivery]:
        """Outbox messages (to webhooks and data sinks), newest first."""

    @abc.abstractmethod
    async def endpoints(self, tenant: str | None) -> list[Endpoint]:
        """Webhook endpoints, by tenant then oldest first."""

    @abc.abstractmethod
    async def batches(
        self, tenant: str | None, before_id: str | None, limit: int
    ) -> list[BatchRecord]:
        """Batches, newest first."""

    @abc.abstractmethod
    async def owner(self, kind: Kind, record_id: str) -> str | None:
        """The tenant a job, message, endpoint or batch belongs to; None if there is none."""

    @abc.abstractmethod
    async def minutes(self, tenant: str | None, since: int) -> list[MinuteCounts]:
        """Per minute since ``since``, the jobs that ended then (minutes without any left out)."""

    @abc.abstractmethod
    async def upstream_load(self, tenant: str | None, since: int) -> list[UpstreamLoad]:
        """Per upstream the database knows of: queued, running, and ended since ``since``."""
