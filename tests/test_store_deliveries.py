"""The contract of :class:`~hookline.store.base_deliveries.Deliveries`: what each operation's
docstring promises, on SQLite and PostgreSQL alike. Messages come into the outbox the way they
do in production: the job store writes them with the events they report."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from hookline.deliveries import AttemptOutcome, Delivery, DeliveryStatus, Endpoint
from hookline.events import EventType, NewEvent
from hookline.jobs import Job
from hookline.store import ClaimRequest, Deliveries, Store, open_store
from tests.test_store import NOW, make_job

LEASE = 30_000
HOOK = "http://receiver.example/hook"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = await open_store(database_url)
    yield store
    await store.close()


@pytest.fixture
def deliveries(store: Store) -> Deliveries:
    return store.webhooks


def ok(code: int = 200) -> AttemptOutcome:
    return AttemptOutcome(status_code=code, latency_ms=5, response_excerpt="fine", succeeded=True)


def retry(at: int) -> AttemptOutcome:
    return AttemptOutcome(
        status_code=500, latency_ms=7, error="HTTP 500", response_excerpt="oops", next_attempt_at=at
    )


def dead(disable: str | None = None) -> AttemptOutcome:
    return AttemptOutcome(status_code=500, latency_ms=7, error="HTTP 500", disable_endpoint=disable)


async def job_with_messages(
    store: Store,
    types: Sequence[EventType] = (EventType.QUEUED,),
    *,
    tenant: str = "acme",
    webhook: bool = False,
    at: int = NOW,
) -> Job:
    """A job whose first events are ``types``: one message per event and subscribed
    destination (the tenant's endpoints; with ``webhook``, the job's own URL too)."""
    events = [NewEvent(t, {}) for t in types]
    job = make_job(
        tenant,
        event_seq=len(events),
        created_at=at,
        updated_at=at,
        run_after=at,
        webhook={"url": HOOK, "events": ["*"]} if webhook else None,
    )
    await store.insert_jobs([(job, events)])
    return job


async def endpoint(
    deliveries: Deliveries, events: Sequence[str] = ("*",), tenant: str = "acme"
) -> Endpoint:
    return await deliveries.create_endpoint(tenant, {"url": HOOK, "events": list(events)}, NOW)


async def claim(
    deliveries: Deliveries,
    now: int = NOW,
    token: str = "lease_a",
    *,
    limit: int = 10,
    busy: Sequence[str] = (),
) -> list[Delivery]:
    return await deliveries.claim_due(now, limit, token, now + LEASE, busy)


async def one(deliveries: Deliveries, delivery_id: str, tenant: str = "acme") -> Delivery:
    found = await deliveries.get_delivery(tenant, delivery_id)
    assert found is not None
    return found[0]


# --- endpoints


async def test_an_endpoint_is_created_enabled_with_a_secret_of_its_own(
    deliveries: Deliveries,
) -> None:
    fields = {"url": HOOK, "events": ["job.*"], "description": "ours"}
    created = await deliveries.create_endpoint("acme", fields, NOW)
    assert (created.url, created.events, created.description) == (HOOK, ["job.*"], "ours")
    assert created.enabled and created.disabled_reason is None
    assert created.rate_limit_per_second is None
    assert created.created_at == created.updated_at == NOW
    assert created.last_success_at is None and created.failing_since is None
    assert await deliveries.get_endpoint("acme", created.id) == created
    assert await deliveries.get_endpoint("globex", created.id) is None
    assert await deliveries.get_endpoint("acme", "ep_unknown") is None
    [secret] = await deliveries.signing_secrets("acme", created.id, NOW)
    assert secret.startswith("whsec_")
    assert secret not in await deliveries.signing_secrets("acme", None, NOW)


async def test_endpoints_are_listed_oldest_first_per_tenant(deliveries: Deliveries) -> None:
    ours = [await endpoint(deliveries) for _ in range(3)]
    theirs = await endpoint(deliveries, tenant="globex")
    assert await deliveries.list_endpoints("acme") == ours
    assert await deliveries.list_endpoints("globex") == [theirs]
    assert await deliveries.list_endpoints("initech") == []


async def test_an_update_changes_the_fields_and_the_time(deliveries: Deliveries) -> None:
    created = await endpoint(deliveries)
    changes = {"description": "new", "rate_limit_per_second": 5.0, "events": ["job.failed"]}
    updated = await deliveries.update_endpoint("acme", created.id, changes, NOW + 1)
    assert updated is not None
    assert (updated.description, updated.rate_limit_per_second) == ("new", 5.0)
    assert updated.events == ["job.failed"] and updated.url == HOOK
    assert (updated.created_at, updated.updated_at) == (NOW, NOW + 1)
    assert await deliveries.get_endpoint("acme", created.id) == updated
    assert await deliveries.update_endpoint("globex", created.id, changes, NOW + 2) is None
    assert await deliveries.update_endpoint("acme", "ep_unknown", changes, NOW + 2) is None
    assert await deliveries.get_endpoint("acme", created.id) == updated


async def test_deleting_an_endpoint_fails_its_pending_messages_and_drops_its_secrets(
    store: Store, deliveries: Deliveries
) -> None:
    gone = await endpoint(deliveries)
    await job_with_messages(store, [EventType.QUEUED, EventType.LOG])
    [sent] = await claim(deliveries)
    held, _ = await deliveries.record_attempts([(sent, "lease_a", ok(), NOW + 1)])
    assert held == [True]
    assert not await deliveries.delete_endpoint("globex", gone.id, NOW + 2)
    assert await deliveries.delete_endpoint("acme", gone.id, NOW + 2)
    assert await deliveries.get_endpoint("acme", gone.id) is None
    assert await deliveries.signing_secrets("acme", gone.id, NOW + 2) == []
    waiting, settled = await deliveries.list_deliveries("acme")
    assert settled.id == sent.id and settled.status is DeliveryStatus.SUCCEEDED
    assert waiting.status is DeliveryStatus.FAILED and waiting.last_error == "endpoint deleted"
    assert await claim(deliveries, NOW + 3) == []
    assert not await deliveries.delete_endpoint("acme", gone.id, NOW + 3)


# --- secrets


async def test_the_default_secret_is_made_on_first_use_and_kept(deliveries: Deliveries) -> None:
    [ours] = await deliveries.signing_secrets("acme", None, NOW)
    assert ours.startswith("whsec_")
    assert await deliveries.signing_secrets("acme", None, NOW + 1) == [ours]
    [theirs] = await deliveries.signing_secrets("globex", None, NOW)
    assert theirs != ours
    assert await deliveries.signing_secrets("acme", "ep_unknown", NOW) == []


async def test_rotated_secrets_sign_until_their_overlap_ends(deliveries: Deliveries) -> None:
    created = await endpoint(deliveries)
    [first] = await deliveries.signing_secrets("acme", created.id, NOW)
    second = await deliveries.rotate_secret("acme", created.id, 1_000, NOW)
    assert await deliveries.signing_secrets("acme", created.id, NOW) == [second, first]
    assert await deliveries.signing_secrets("acme", created.id, NOW + 999) == [second, first]
    assert await deliveries.signing_secrets("acme", created.id, NOW + 1_000) == [second]
    # A secret already retiring keeps its earlier end when a longer overlap follows.
    third = await deliveries.rotate_secret("acme", created.id, 5_000, NOW + 10)
    assert await deliveries.signing_secrets("acme", created.id, NOW + 999) == [
        third,
        second,
        first,
    ]
    assert await deliveries.signing_secrets("acme", created.id, NOW + 1_000) == [third, second]
    assert await deliveries.signing_secrets("acme", created.id, NOW + 5_010) == [third]
    # The tenant's default secret rotates the same way.
    [default] = await deliveries.signing_secrets("acme", None, NOW)
    newer = await deliveries.rotate_secret("acme", None, 0, NOW)
    assert newer != default
    assert await deliveries.signing_secrets("acme", None, NOW) == [newer]


# --- the sender's side


async def test_a_claim_takes_the_head_of_each_destinations_queue_per_job(
    store: Store, deliveries: Deliveries
) -> None:
    await endpoint(deliveries)
    first = await job_with_messages(store, [EventType.QUEUED, EventType.LOG], webhook=True)
    second = await job_with_messages(store, webhook=True)
    heads = await claim(deliveries)
    assert [d.id for d in heads] == sorted(d.id for d in heads)
    assert len(heads) == 4  # two jobs, two destinations each
    assert {d.event_type for d in heads} == {EventType.QUEUED.value}
    assert {d.job_id for d in heads} == {first.id, second.id}
    for delivery in heads:
        assert delivery.status is DeliveryStatus.PENDING and delivery.attempts == 0
        assert (delivery.lease_token, delivery.lease_expires_at) == ("lease_a", NOW + LEASE)
    # The second message of each queue waits for the first to settle, leased or not.
    assert await claim(deliveries, token="lease_b") == []
    held, _ = await deliveries.record_attempts([(d, "lease_a", ok(), NOW + 1) for d in heads])
    assert held == [True] * 4
    after = await claim(deliveries, NOW + 1, "lease_b")
    assert [(d.job_id, d.event_type) for d in after] == [(first.id, EventType.LOG.value)] * 2


async def test_a_claim_takes_no_more_than_its_limit(store: Store, deliveries: Deliveries) -> None:
    for _ in range(5):
        await job_with_messages(store, webhook=True)
    assert await claim(deliveries, limit=0) == []
    assert len(await claim(deliveries, limit=2)) == 2
    assert len(await claim(deliveries, token="lease_b", limit=10)) == 3


async def test_a_message_is_not_claimed_before_it_is_due(
    store: Store, deliveries: Deliveries
) -> None:
    await job_with_messages(store, webhook=True, at=NOW)
    assert await claim(deliveries, NOW - 1) == []
    assert len(await claim(deliveries, NOW)) == 1


async def test_a_leased_message_is_claimed_again_only_once_its_lease_lapsed(
    store: Store, deliveries: Deliveries
) -> None:
    await job_with_messages(store, webhook=True)
    [leased] = await claim(deliveries, NOW, "lease_a")
    assert await claim(deliveries, NOW + LEASE, "lease_b") == []
    [taken] = await claim(deliveries, NOW + LEASE + 1, "lease_b")
    assert taken.id == leased.id and taken.lease_token == "lease_b"
    # The first holder's outcome no longer counts: nothing of it is recorded.
    held, _ = await deliveries.record_attempts([(leased, "lease_a", ok(), NOW + LEASE + 2)])
    assert held == [False]
    found = await deliveries.get_delivery("acme", leased.id)
    assert found is not None
    assert found[0].status is DeliveryStatus.PENDING and found[0].lease_token == "lease_b"
    assert found[0].attempts == 0 and found[1] == []


async def test_a_disabled_endpoints_messages_wait_until_it_is_enabled_again(
    store: Store, deliveries: Deliveries
) -> None:
    created = await endpoint(deliveries)
    await job_with_messages(store)
    await deliveries.update_endpoint("acme", created.id, {"enabled": False}, NOW)
    assert await claim(deliveries) == []
    await deliveries.update_endpoint("acme", created.id, {"enabled": True}, NOW)
    [delivery] = await claim(deliveries)
    assert delivery.endpoint_id == created.id


async def test_a_claim_skips_busy_destinations(store: Store, deliveries: Deliveries) -> None:
    busy, free = await endpoint(deliveries), await endpoint(deliveries)
    await job_with_messages(store)
    [delivery] = await claim(deliveries, busy=[busy.id])
    assert delivery.endpoint_id == free.id
    assert delivery.order_key.split("|")[0] == free.id


async def test_a_released_message_is_due_again_at_once(
    store: Store, deliveries: Deliveries
) -> None:
    await job_with_messages(store, webhook=True)
    [leased] = await claim(deliveries, NOW, "lease_a")
    await deliveries.release([leased.id], "lease_other")  # not its lease: nothing changes
    assert await claim(deliveries, NOW, "lease_b") == []
    await deliveries.release([leased.id], "lease_a")
    [again] = await claim(deliveries, NOW, "lease_b")
    assert again.id == leased.id and again.attempts == 0 and again.next_attempt_at == NOW


async def test_a_success_settles_the_message_and_heals_its_endpoint(
    store: Store, deliveries: Deliveries
) -> None:
    created = await endpoint(deliveries)
    await job_with_messages(store)
    [delivery] = await claim(deliveries)
    await deliveries.record_attempts([(delivery, "lease_a", retry(NOW + 100), NOW + 1)])
    assert await deliveries.failing_since(created.id) == NOW + 1
    [delivery] = await claim(deliveries, NOW + 100)
    held, claimed = await deliveries.record_attempts([(delivery, "lease_a", ok(), NOW + 200)])
    assert (held, claimed) == ([True], [])
    found = await deliveries.get_delivery("acme", delivery.id)
    assert found is not None
    settled, attempts = found
    assert settled.status is DeliveryStatus.SUCCEEDED and settled.attempts == 2
    assert (settled.last_status_code, settled.last_error) == (200, None)
    assert settled.lease_token is None and settled.updated_at == NOW + 200
    assert [(a.attempted_at, a.status_code, a.error) for a in attempts] == [
        (NOW + 1, 500, "HTTP 500"),
        (NOW + 200, 200, None),
    ]
    assert [(a.latency_ms, a.response_excerpt) for a in attempts] == [(7, "oops"), (5, "fine")]
    healed = await deliveries.get_endpoint("acme", created.id)
    assert healed is not None
    assert (healed.last_success_at, healed.failing_since) == (NOW + 200, None)
    assert await deliveries.failing_since(created.id) is None
    assert await claim(deliveries, NOW + 10 * LEASE, "lease_b") == []


async def test_a_failure_with_retries_left_waits_for_its_next_attempt(
    store: Store, deliveries: Deliveries
) -> None:
    created = await endpoint(deliveries)
    await job_with_messages(store)
    [delivery] = await claim(deliveries)
    held, _ = await deliveries.record_attempts([(delivery, "lease_a", retry(NOW + 5_000), NOW + 1)])
    assert held == [True]
    waiting = await one(deliveries, delivery.id)
    assert waiting.status is DeliveryStatus.PENDING and waiting.attempts == 1
    assert (waiting.last_status_code, waiting.last_error) == (500, "HTTP 500")
    assert waiting.lease_token is None and waiting.next_attempt_at == NOW + 5_000
    assert await claim(deliveries, NOW + 4_999, "lease_b") == []
    [again] = await claim(deliveries, NOW + 5_000, "lease_b")
    await deliveries.record_attempts([(again, "lease_b", retry(NOW + 9_000), NOW + 5_001)])
    assert await deliveries.failing_since(created.id) == NOW + 1  # since the first failure


async def test_a_failure_without_retries_left_is_a_dead_letter(
    store: Store, deliveries: Deliveries
) -> None:
    await job_with_messages(store, webhook=True)
    [delivery] = await claim(deliveries)
    await deliveries.record_attempts([(delivery, "lease_a", dead(), NOW + 1)])
    failed = await one(deliveries, delivery.id)
    assert failed.status is DeliveryStatus.FAILED and failed.attempts == 1
    assert failed.lease_token is None
    assert await claim(deliveries, NOW + 10 * LEASE, "lease_b") == []


async def test_disabling_an_endpoint_is_reported_to_the_tenants_subscribers(
    store: Store, deliveries: Deliveries
) -> None:
    failing = await endpoint(deliveries, ["job.*"])
    watcher = await endpoint(deliveries, ["endpoint.disabled"])
    everything = await endpoint(deliveries, ["*"])
    other = await endpoint(deliveries, ["job.queued"])
    elsewhere = await endpoint(deliveries, ["*"], tenant="globex")
    await job_with_messages(store)
    [delivery] = [d for d in await claim(deliveries) if d.endpoint_id == failing.id]
    await deliveries.record_attempts([(delivery, "lease_a", dead("gone (410)"), NOW + 1)])
    disabled = await deliveries.get_endpoint("acme", failing.id)
    assert disabled is not None
    assert not disabled.enabled and disabled.disabled_reason == "gone (410)"
    for subscriber in (watcher, everything):
        [report] = [
            d
            for d in await deliveries.list_deliveries("acme", endpoint_id=subscriber.id)
            if d.event_type == "endpoint.disabled"
        ]
        assert report.payload["data"]["id"] == failing.id
        assert report.payload["data"]["enabled"] is False
    for unsubscribed in (other, failing):
        listed = await deliveries.list_deliveries("acme", endpoint_id=unsubscribed.id)
        assert "endpoint.disabled" not in {d.event_type for d in listed}
    assert await deliveries.list_deliveries("globex", endpoint_id=elsewhere.id) == []


async def test_recording_can_claim_the_next_messages_in_the_same_call(
    store: Store, deliveries: Deliveries
) -> None:
    for _ in range(3):
        await job_with_messages(store, webhook=True)
    [first] = await claim(deliveries, limit=1)
    then = ClaimRequest(NOW + 1, 10, "lease_b", NOW + 1 + LEASE, ())
    held, claimed = await deliveries.record_attempts([(first, "lease_a", ok(), NOW + 1)], then)
    assert held == [True]
    assert len(claimed) == 2 and first.id not in {d.id for d in claimed}
    assert {d.lease_token for d in claimed} == {"lease_b"}
    assert await deliveries.record_attempts([], None) == ([], [])


async def test_an_unknown_endpoint_is_not_failing(deliveries: Deliveries) -> None:
    assert await deliveries.failing_since("ep_unknown") is None


async def test_lapse_all_leases_frees_claimed_messages(
    store: Store, deliveries: Deliveries
) -> None:
    await job_with_messages(store, webhook=True)
    [leased] = await claim(deliveries, NOW, "lease_a")
    assert await store.lapse_all_leases(NOW + 1) >= 1
    [taken] = await claim(deliveries, NOW + 1, "lease_b")
    assert taken.id == leased.id


# --- the API's side


async def test_deliveries_are_listed_newest_first_with_their_filters(
    store: Store, deliveries: Deliveries
) -> None:
    one_endpoint, another = await endpoint(deliveries), await endpoint(deliveries)
    early = await job_with_messages(store, at=NOW)
    late = await job_with_messages(store, at=NOW + 10)
    await job_with_messages(store, tenant="globex", webhook=True)
    listed = await deliveries.list_deliveries("acme")
    assert len(listed) == 4 and [d.id for d in listed] == sorted(
        (d.id for d in listed), reverse=True
    )
    sent = listed[0]
    await deliveries.claim_due(NOW + 10, 10, "lease_a", NOW + LEASE, ())
    await deliveries.record_attempts([(sent, "lease_a", ok(), NOW + 11)])

    async def ids(listing: Awaitable[list[Delivery]]) -> list[str]:
        return [d.id for d in await listing]

    def where(keep: Callable[[Delivery], bool]) -> list[str]:
        return [d.id for d in listed if keep(d)]

    found = deliveries.list_deliveries
    for chosen in (one_endpoint, another):
        by_endpoint = await ids(found("acme", endpoint_id=chosen.id))
        assert by_endpoint == [d.id for d in listed if d.endpoint_id == chosen.id]
    assert await ids(found("acme", job_id=early.id)) == where(lambda d: d.job_id == early.id)
    assert await ids(found("acme", status="succeeded")) == [sent.id]
    assert await ids(found("acme", status=DeliveryStatus.PENDING)) == where(lambda d: d != sent)
    assert await ids(found("acme", since=NOW + 10)) == where(lambda d: d.job_id == late.id)
    assert await ids(found("acme", until=NOW + 10)) == where(lambda d: d.job_id == early.id)
    assert await ids(found("acme", before_id=listed[1].id)) == [d.id for d in listed[2:]]
    assert await ids(found("acme", limit=1)) == [listed[0].id]
    assert len(await deliveries.list_deliveries("globex")) == 1


async def test_a_delivery_is_read_only_by_its_tenant(store: Store, deliveries: Deliveries) -> None:
    await job_with_messages(store, webhook=True)
    [delivery] = await deliveries.list_deliveries("acme")
    assert await deliveries.get_delivery("acme", delivery.id) == (delivery, [])
    assert await deliveries.get_delivery("globex", delivery.id) is None
    assert await deliveries.get_delivery("acme", "msg_unknown") is None


async def test_one_message_is_resent_whatever_its_status(
    store: Store, deliveries: Deliveries
) -> None:
    await job_with_messages(store, webhook=True)
    [delivery] = await claim(deliveries)
    await deliveries.record_attempts([(delivery, "lease_a", ok(), NOW + 1)])
    assert await deliveries.resend("globex", NOW + 50, delivery_id=delivery.id) == 0
    assert await deliveries.resend("acme", NOW + 50, delivery_id=delivery.id) == 1
    again = await one(deliveries, delivery.id)
    assert again.status is DeliveryStatus.PENDING and again.next_attempt_at == NOW + 50
    assert again.attempts == 1 and again.lease_token is None
    assert await claim(deliveries, NOW + 49, "lease_b") == []
    [leased] = await claim(deliveries, NOW + 50, "lease_b")
    # A leased message is resent too: unleased, another claim takes it at once.
    assert await deliveries.resend("acme", NOW + 60, delivery_id=leased.id) == 1
    [taken] = await claim(deliveries, NOW + 60, "lease_c")
    assert taken.id == delivery.id


async def test_an_endpoints_failed_messages_are_resent_from_a_time_on(
    store: Store, deliveries: Deliveries
) -> None:
    created = await endpoint(deliveries)
    for at in (NOW, NOW + 10, NOW + 20, NOW + 30):
        await job_with_messages(store, at=at)
    messages = sorted(await claim(deliveries, NOW + 30), key=lambda d: d.created_at)
    outcomes = [dead(), dead(), ok(), retry(NOW + 10_000)]
    await deliveries.record_attempts(
        [(d, "lease_a", outcome, NOW + 40) for d, outcome in zip(messages, outcomes, strict=True)]
    )
    assert await deliveries.resend("globex", NOW + 50, endpoint_id=created.id) == 0
    assert await deliveries.resend("acme", NOW + 50, endpoint_id=created.id, since=NOW + 10) == 1
    statuses = [(await one(deliveries, d.id)).status for d in messages]
    assert statuses == [
        DeliveryStatus.FAILED,  # created before since
        DeliveryStatus.PENDING,  # resent
        DeliveryStatus.SUCCEEDED,
        DeliveryStatus.PENDING,  # waiting for its retry, not resent
    ]
    assert (await one(deliveries, messages[1].id)).next_attempt_at == NOW + 50
    assert (await one(deliveries, messages[3].id)).next_attempt_at == NOW + 10_000


async def test_settled_messages_are_deleted_oldest_first_and_pending_ones_never(
    store: Store, deliveries: Deliveries
) -> None:
    for _ in range(3):
        await job_with_messages(store, webhook=True)
    first, second, third = await claim(deliveries)
    await deliveries.record_attempts(
        [
            (second, "lease_a", dead(), NOW + 2),
            (first, "lease_a", ok(), NOW + 1),
            (third, "lease_a", retry(NOW + 10 * LEASE), NOW + 1),
        ]
    )
    assert await deliveries.delete_settled(NOW + 1, 10) == 0  # none settled before then
    assert await deliveries.delete_settled(NOW + 100, 1) == 1
    assert await deliveries.get_delivery("acme", first.id) is None
    assert await deliveries.delete_settled(NOW + 100, 10) == 1
    assert await deliveries.get_delivery("acme", second.id) is None
    assert await deliveries.delete_settled(NOW + 100 * LEASE, 10) == 0
    assert [d.id for d in await deliveries.list_deliveries("acme")] == [third.id]
