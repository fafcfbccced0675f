"""The webhook side's storage interface: endpoints and their signing secrets, and the delivery
outbox as the sender and the API use it (the job store writes its messages, in the transaction
of the events they report: :mod:`hookline.store.outbox`).

Each method is one transaction. A claimed message is leased: only the holder of its lease token
records its outcome or releases it, so a message is never settled twice, and one whose lease
lapsed (its sender died) is claimed again. Raises only :mod:`hookline.errors` exceptions.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection
from typing import Any

from hookline.deliveries import Attempt, AttemptOutcome, Delivery, Endpoint
from hookline.store.database import Capabilities

# One send to record: the message as claimed, the lease token it was claimed under, what came
# of it, and when (epoch ms).
RecordedAttempt = tuple[Delivery, str, AttemptOutcome, int]


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Claim up to ``limit`` due messages under ``lease_token``, none for a ``busy`` destination."""

    now: int
    limit: int
    lease_token: str
    lease_expires_at: int
    busy: Collection[str]


class Deliveries(abc.ABC):
    """Webhook endpoints, secrets and messages."""

    capabilities: Capabilities  # the database's (see hookline.store.database)

    # --- endpoints

    @abc.abstractmethod
    async def create_endpoint(self, tenant: str, fields: dict[str, Any], now: int) -> Endpoint:
        """Register an endpoint from ``fields`` (``url`` and ``events``; ``description`` and
        ``rate_limit_per_second`` optional), enabled, with a signing secret of its own."""

    @abc.abstractmethod
    async def list_endpoints(self, tenant: str) -> list[Endpoint]:
        """The tenant's endpoints, oldest first."""

    @abc.abstractmethod
    async def get_endpoint(self, tenant: str, endpoint_id: str) -> Endpoint | None:
        """The tenant's endpoint; None if it has none of that id."""

    @abc.abstractmethod
    async def update_endpoint(
        self, tenant: str, endpoint_id: str, fields: dict[str, Any], now: int
    ) -> Endpoint | None:
        """Change the endpoint's ``fields`` (``enabled`` too: a re-enabled endpoint's messages
        are claimed again) and its ``updated_at``; the endpoint after, or None if the tenant has
        no such endpoint."""

    @abc.abstractmethod
    async def delete_endpoint(self, tenant: str, endpoint_id: str, now: int) -> bool:
        """Delete the endpoint and its secrets; its pending messages fail ("endpoint deleted")
        and are never sent. False if the tenant has no such endpoint."""

    # --- secrets

    @abc.abstractmethod
    async def signing_secrets(self, tenant: str, endpoint_id: str | None, now: int) -> list[str]:
        """The secrets that sign for an endpoint (None: the tenant's default, for messages to a
        job's own webhook), newest first, without those retired by ``now``. The tenant's
        default secret is created on first use; an unknown endpoint has none."""

    @abc.abstractmethod
    async def rotate_secret(
        self, tenant: str, endpoint_id: str | None, overlap_ms: int, now: int
    ) -> str:
        """A new current secret, returned; the previous ones keep signing for ``overlap_ms``
        (one retiring sooner keeps its earlier end)."""

    # --- the sender's side

    @abc.abstractmethod
    async def claim_due(
        self, now: int, limit: int, lease_token: str, lease_expires_at: int, busy: Collection[str]
    ) -> list[Delivery]:
        """Lease up to ``limit`` pending messages, due by ``now``, under ``lease_token`` until
        ``lease_expires_at``, in id order. Only the first pending message (by event ``seq``) of
        each destination and job is due, so a job's messages reach a destination in order; not
        one leased by another (until its lease lapses), nor one whose endpoint is disabled, nor
        one for a ``busy`` destination (:func:`~hookline.store.outbox.order_key`'s first part)."""

    @abc.abstractmethod
    async def release(self, delivery_ids: Collection[str], lease_token: str) -> None:
        """Give back claimed messages unsent: due again at once, attempts unchanged. Messages no
        longer held under ``lease_token`` are left alone."""

    @abc.abstractmethod
    async def record_attempts(
        self, results: list[RecordedAttempt], then_claim: ClaimRequest | None = None
    ) -> tuple[list[bool], list[Delivery]]:
        """Log each attempt and apply its outcome, in one transaction: counted, then settled
        (``succeeded``; ``failed`` when the outcome has no next attempt) or due again at the
        outcome's ``next_attempt_at``, the lease ended; the endpoint's health follows (a
        success clears ``failing_since``, a failure sets it if unset, ``disable_endpoint``
        disables it and reports ``endpoint.disabled`` to the tenant's other endpoints that
        subscribe). Per attempt: False, and nothing recorded, if its lease was lost meanwhile.
        With ``then_claim``, the same transaction then claims as :meth:`claim_due` does."""

    @abc.abstractmethod
    async def failing_since(self, endpoint_id: str) -> int | None:
        """Since when the endpoint has failed without a success in between (None: it has not,
        or there is no such endpoint)."""

    # --- the API's side

    @abc.abstractmethod
    async def list_deliveries(
        self,
        tenant: str,
        *,
        endpoint_id: str | None = None,
        job_id: str | None = None,
        status: str | None = None,
        since: int | None = None,
        until: int | None = None,
        before_id: str | None = None,
        limit: int = 50,
        sink: str | None = None,
    ) -> list[Delivery]:
        """The tenant's messages, newest first: of an endpoint, of a sink, of a job, in a status (a
        :class:`~hookline.deliveries.DeliveryStatus`), created in [``since``, ``until``),
        strictly older than ``before_id``, as given."""

    @abc.abstractmethod
    async def get_delivery(
        self, tenant: str, delivery_id: str
    ) -> tuple[Delivery, list[Attempt]] | None:
        """The tenant's message with its attempts, oldest first; None if it has no such one."""

    @abc.abstractmethod
    async def send_test(self, tenant: str, endpoint_id: str, now: int) -> str | None:
        """Queue an ``endpoint.test`` message to the tenant's endpoint, whatever its event
        filters (the dashboard's "send a test event"); its id, or None without such an endpoint."""

    @abc.abstractmethod
    async def resend(
        self,
        tenant: str,
        now: int,
        *,
        delivery_id: str | None = None,
        endpoint_id: str | None = None,
        since: int | None = None,
    ) -> int:
        """Make messages pending and due ``now``, unleased: one message, whatever its status,
        or the endpoint's ``failed`` ones created since ``since``. The number changed."""

    @abc.abstractmethod
    async def send_sink_test(self, tenant: str, sink: str, now: int) -> str:
        """Queue a ``sink.test`` message to data sink ``sink`` on behalf of ``tenant`` (the
        operator's "send a test event"); its id."""

    @abc.abstractmethod
    async def resend_sink(
        self, sink: str, now: int, *, tenant: str | None = None, since: int | None = None
    ) -> int:
        """Make the ``failed`` messages of data sink ``sink`` (of one tenant, or every tenant's)
        created since ``since`` pending and due ``now``. The number changed."""

    @abc.abstractmethod
    async def delete_settled(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` messages settled (sent or failed for good) before ``before``,
        oldest first, with their attempt log; the number deleted. Pending messages are never
        deleted. Call again while it returns ``limit``."""
