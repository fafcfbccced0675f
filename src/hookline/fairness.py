"""Fair sharing of the upstreams: lanes, tenants served by weight, and per-tenant limits.

Every job has a :class:`~hookline.jobs.Lane`. Each time a worker claims jobs of an upstream, the
claim (``hookline.store.claim``) plans which of the waiting (lane, tenant) queues the free room
goes to, with :func:`plan`:

- **Lanes** in order: interactive, then default, then batch; but the batch lane is owed
  ``batch_min_share`` of the starts while the other lanes would take them all (a credit that
  grows with each start it loses, and is spent on one start of its own when whole).
- **Tenants within a lane** by start-time fair queueing (as Temporal's fairness keys, Hatchet's
  ``GROUP_ROUND_ROBIN``): each (upstream, lane, tenant) has a virtual time, its *pass*; the next
  start goes to the tenant with the lowest, whose pass then grows by ``1 / weight``. A tenant that
  comes back from idle starts at the lane's clock (the pass of the last start), so it is neither
  owed for the time it was away nor made to wait for what others got meanwhile.
- **Limits** (a tenant's running jobs, requests and tokens per minute; an upstream's tokens per
  minute) cap what a queue may take: a tenant over a limit is passed over, and its jobs wait.
  An API key may carry limits of its own (:class:`KeyLimits`, stored on the key): its jobs wait
  while the key is at one, and its tenant's other keys' jobs go past them.

The passes live in the database (``fair_shares``), written by the claims, which run one at a time
per upstream: the same order holds whichever process claims.
"""

from __future__ import annotations

import dataclasses
import datetime
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hookline.config import Settings, TenantLimits
from hookline.jobs import Lane, Operation

LANES: tuple[Lane, ...] = (Lane.INTERACTIVE, Lane.DEFAULT, Lane.BATCH)  # the order served in

# A start under a token limit reserves its input (about 4 characters a token) plus its
# max_tokens, or this many output tokens when it sets none.
DEFAULT_OUTPUT_TOKENS = 1024
WINDOW_MS = 60_000  # the per-minute limits' rolling window


@dataclasses.dataclass(frozen=True)
class FairPolicy:
    """What the claim must know of the tenants and upstreams, built once from the settings."""

    batch_min_share: float = 0.0
    tenants: Mapping[str, TenantLimits] = dataclasses.field(default_factory=dict)
    defaults: TenantLimits = dataclasses.field(default_factory=TenantLimits)
    upstream_tokens_per_minute: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> FairPolicy:
        return cls(
            batch_min_share=settings.fairness.batch_min_share,
            tenants={t.name: t for t in settings.tenants},
            defaults=settings.fairness.tenant_defaults,
            upstream_tokens_per_minute={
                u.name: u.tokens_per_minute for u in settings.upstreams if u.tokens_per_minute
            },
        )

    def limits(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.defaults)

    def weight(self, tenant: str, stored: float | None = None) -> float:
        """The tenant's weight: its [[tenants]] entry's, if that sets one; else ``stored`` (set
        by ``hookline keys create --weight``), if any; else the configured default."""
        entry = self.tenants.get(tenant)
        if stored is not None and (entry is None or "weight" not in entry.model_fields_set):
            return stored
        return self.limits(tenant).weight

    def weights(self, stored: Mapping[str, float]) -> Callable[[str], float]:
        """:meth:`weight` with the stored weights ``stored`` (tenant -> weight)."""
        return lambda tenant: self.weight(tenant, stored.get(tenant))

    def limited(self, tenant: str) -> bool:
        """Whether a start of ``tenant`` must be checked against limits of its own."""
        limits = self.limits(tenant)
        return (
            limits.max_concurrency is not None
            or limits.requests_per_minute is not None
            or limits.tokens_per_minute is not None
        )

    def counts_tokens(self, tenant: str, upstream: str) -> bool:
        """Whether a start reserves tokens: a token limit of the tenant or of the upstream."""
        return (
            self.limits(tenant).tokens_per_minute is not None
            or upstream in self.upstream_tokens_per_minute
        )

    def metered(self, tenant: str, upstream: str) -> bool:
        """Whether a start is recorded in the per-minute window (a per-minute limit applies)."""
        limits = self.limits(tenant)
        return limits.requests_per_minute is not None or self.counts_tokens(tenant, upstream)


@dataclasses.dataclass(frozen=True, slots=True)
class KeyLimits:
    """An API key's own limits, within its tenant's (``hookline keys create --max-concurrency``):
    its jobs running at once, attempts and tokens started per rolling minute, and the tokens of
    the jobs it submits per UTC day and calendar month. None: no limit of the key's."""

    max_concurrency: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    daily_token_budget: int | None = None
    monthly_token_budget: int | None = None

    @property
    def in_claim(self) -> bool:
        """Whether the claim holds the key's jobs to limits (budgets are checked at submit)."""
        return (
            self.max_concurrency is not None
            or self.requests_per_minute is not None
            or self.tokens_per_minute is not None
        )

    @property
    def per_minute(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    @property
    def budgeted(self) -> bool:
        return self.daily_token_budget is not None or self.monthly_token_budget is not None

    def as_json(self) -> dict[str, int]:
        """The limits set (none: an empty object)."""
        return {
            field.name: value
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }


NO_KEY_LIMITS = KeyLimits()


def key_scope(key_id: str) -> str:
    return f"k:{key_id}"


def tenant_scope(tenant: str) -> str:
    return f"t:{tenant}"


def upstream_scope(upstream: str) -> str:
    return f"u:{upstream}"


def _characters(value: Any, budget: int = 10_000_000) -> int:
    """The characters of the strings in ``value`` (an OpenAI request's content)."""
    if isinstance(value, str):
        return len(value)
    total = 0
    stack = [value]
    while stack and total < budget:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def estimate_tokens(operation: Operation, body: Mapping[str, Any]) -> int:
    """Tokens a call may use: its input at ~4 characters a token, plus the output it allows."""
    source = {
        Operation.CHAT_COMPLETIONS: "messages",
        Operation.COMPLETIONS: "prompt",
        Operation.EMBEDDINGS: "input",
    }.get(operation)
    tokens = math.ceil(_characters(body.get(source)) / 4) if source else 0
    if operation is Operation.EMBEDDINGS:
        return max(tokens, 1)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    output = limit if isinstance(limit, int) and limit > 0 else DEFAULT_OUTPUT_TOKENS
    return tokens + output


def usage_of(output: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(input, output) tokens as the upstream's answer reports them, if it does."""
    usage = output.get("usage") if output else None
    if not isinstance(usage, dict):
        return None
    given = usage.get("prompt_tokens", usage.get("input_tokens"))
    made = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(given, int) or not isinstance(made, int):
        return None
    return max(given, 0), max(made, 0)


# --- the plan of one claim


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A (lane, tenant) queue with runnable jobs, as the claim found it."""

    lane: Lane
    tenant: str
    stored_pass: float | None  # None: never served on this upstream and lane
    available: int | None = None  # how many it holds, when known to be fewer than asked


@dataclasses.dataclass(frozen=True)
class Pick:
    lane: Lane
    tenant: str
    start: float  # the queue's pass when it got this start
    owed: float  # what this start changed in the batch lane's credit


@dataclasses.dataclass
class Plan:
    picks: list[Pick]  # one per start, in the order they were chosen
    passes: dict[tuple[Lane, str], float]  # the new pass of each queue that got starts
    clocks: dict[Lane, float]  # each lane's clock after the claim
    credit: float  # the batch lane's credit after the claim

    def counts(self) -> dict[tuple[Lane, str], int]:
        counted: dict[tuple[Lane, str], int] = {}
        for pick in self.picks:
            counted[(pick.lane, pick.tenant)] = counted.get((pick.lane, pick.tenant), 0) + 1
        return counted

    def as_started(
        self,
        started: Mapping[tuple[Lane, str], int],
        *,
        weight: Callable[[str], float],
        clocks: Mapping[Lane, float],
        credit: float,
    ) -> Plan:
        """The plan cut down to the starts that happened (each queue's first ``started``):
        the passes, clocks and credit to keep."""
        left = dict(started)
        kept: list[Pick] = []
        for pick in self.picks:
            queue = (pick.lane, pick.tenant)
            if left.get(queue, 0) > 0:
                left[queue] -= 1
                kept.append(pick)
        new_clocks = dict(clocks)
        passes: dict[tuple[Lane, str], float] = {}
        for pick in kept:
            new_clocks[pick.lane] = max(new_clocks.get(pick.lane, 0.0), pick.start)
            passes[(pick.lane, pick.tenant)] = pick.start + 1 / weight(pick.tenant)
            credit = min(max(credit + pick.owed, 0.0), 1.0)
        return Plan(kept, passes, new_clocks, credit)


def plan(
    waiting: Sequence[Waiting],
    room: int,
    *,
    weight: Callable[[str], float],
    caps: Mapping[str, int],
    clocks: Mapping[Lane, float],
    credit: float,
    batch_min_share: float,
) -> Plan:
    """Which queues the next ``room`` starts go to: lanes in order with the batch lane's floor,
    tenants by pass within a lane, no tenant beyond its cap in ``caps`` (the starts its limits
    still allow; absent: no limit), no queue beyond what it holds."""
    heaps: dict[Lane, list[tuple[float, str]]] = {lane: [] for lane in LANES}
    left: dict[tuple[Lane, str], int | None] = {}
    for queue in waiting:
        clock = clocks.get(queue.lane, 0.0)
        start = clock if queue.stored_pass is None else max(queue.stored_pass, clock)
        heaps[queue.lane].append((start, queue.tenant))
        left[(queue.lane, queue.tenant)] = queue.available
    for heap in heaps.values():
        heapq.heapify(heap)
    caps_left = dict(caps)
    new_clocks = dict(clocks)
    passes: dict[tuple[Lane, str], float] = {}
    picks: list[Pick] = []
    # Each start another lane takes while batch items wait owes the batch lane this much of one.
    owed = batch_min_share / (1 - batch_min_share) if batch_min_share < 1 else math.inf

    def ready(lane: Lane) -> bool:
        heap = heaps[lane]
        while heap:
            tenant = heap[0][1]
            if caps_left.get(tenant, 1) > 0 and left[(lane, tenant)] != 0:
                return True
            heapq.heappop(heap)  # capped or empty: out of this claim
        return False

    while len(picks) < room:
        lanes = [lane for lane in LANES if ready(lane)]
        if not lanes:
            break
        lane = lanes[0]
        before = credit
        if lane is not Lane.BATCH and Lane.BATCH in lanes and owed > 0:
            if credit >= 1:
                lane, credit = Lane.BATCH, credit - 1
            else:
                credit = min(credit + owed, 1.0)
        start, tenant = heapq.heappop(heaps[lane])
        picks.append(Pick(lane, tenant, start, credit - before))
        new_clocks[lane] = max(new_clocks.get(lane, 0.0), start)
        after = start + 1 / weight(tenant)
        passes[(lane, tenant)] = after
        if tenant in caps_left:
            caps_left[tenant] -= 1
        remaining = left[(lane, tenant)]
        if remaining is not None:
            left[(lane, tenant)] = remaining - 1
        heapq.heappush(heaps[lane], (after, tenant))
    return Plan(picks, passes, new_clocks, credit)


# --- what a caller sees of the limits


@dataclasses.dataclass(frozen=True)
class Hold:
    """Why a tenant's next call may not start now."""

    kind: str  # tenant_ or key_ concurrency, rpm, tpm; upstream_tpm
    until: int | None  # when room may come back (epoch ms), when known

    @property
    def message(self) -> str:
        return {
            "key_concurrency": "the API key runs as many jobs as its max_concurrency allows",
            "key_rpm": "the API key started as many calls this minute as it may",
            "key_tpm": "the API key's calls this minute used the tokens it may use",
            "tenant_concurrency": "the tenant runs as many jobs as its max_concurrency allows",
            "tenant_rpm": "the tenant started as many calls this minute as it may",
            "tenant_tpm": "the tenant's calls this minute used the tokens it may use",
            "upstream_tpm": "the upstream's calls this minute used the tokens it allows",
        }[self.kind]


def holding(
    policy: FairPolicy,
    tenant: str,
    upstream: str,
    *,
    running: int,
    window: Mapping[str, tuple[int, int, int]],
    tokens: int,
    key: tuple[str, KeyLimits, int] | None = None,
) -> Hold | None:
    """The limit that keeps a call of ``tokens`` from starting now, given the tenant's running
    jobs and the last minute's starts (``window``: scope -> (starts, tokens, oldest start)), and
    with ``key`` (its id, limits and running jobs) the key's limits, which are looked at first."""
    if key is not None:
        key_id, own, key_running = key
        if own.max_concurrency is not None and key_running >= own.max_concurrency:
            return Hold("key_concurrency", None)
        starts, used, oldest = window.get(key_scope(key_id), (0, 0, 0))
        if own.requests_per_minute is not None and starts >= own.requests_per_minute:
            return Hold("key_rpm", oldest + WINDOW_MS)
        if own.tokens_per_minute is not None and starts and used + tokens > own.tokens_per_minute:
            return Hold("key_tpm", oldest + WINDOW_MS)
    limits = policy.limits(tenant)
    if limits.max_concurrency is not None and running >= limits.max_concurrency:
        return Hold("tenant_concurrency", None)
    starts, used, oldest = window.get(tenant_scope(tenant), (0, 0, 0))
    if limits.requests_per_minute is not None and starts >= limits.requests_per_minute:
        return Hold("tenant_rpm", oldest + WINDOW_MS)
    if limits.tokens_per_minute is not None and starts and used + tokens > limits.tokens_per_minute:
        return Hold("tenant_tpm", oldest + WINDOW_MS)
    upstream_tpm = policy.upstream_tokens_per_minute.get(upstream)
    starts, used, oldest = window.get(upstream_scope(upstream), (0, 0, 0))
    if upstream_tpm is not None and starts and used + tokens > upstream_tpm:
        return Hold("upstream_tpm", oldest + WINDOW_MS)
    return None


def jobs_ahead(
    policy: FairPolicy,
    tenant: str,
    own_ahead: int,
    others: Mapping[str, int],
    stored: Mapping[str, float] | None = None,
) -> int:
    """How many jobs of one lane start before a tenant's job that has ``own_ahead`` of its
    tenant's before it, with ``others`` (tenant -> queued) waiting in the lane: while the tenant
    makes ``own_ahead`` starts, each other one makes its weight's share of them (``stored``: the
    stored weights), as far as it has jobs (an estimate: it leaves out where the passes stand
    now)."""
    weight_of = policy.weights(stored or {})
    weight = weight_of(tenant)
    return own_ahead + sum(
        min(queued, math.ceil(own_ahead * weight_of(other) / weight))
        for other, queued in others.items()
    )


def budget_periods(now: int) -> tuple[int, int, int, int]:
    """The UTC day and calendar month ``now`` (epoch ms) is in: their starts and ends."""
    moment = datetime.datetime.fromtimestamp(now / 1000, tz=datetime.UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + datetime.timedelta(days=32)).replace(day=1)

    def ms(value: datetime.datetime) -> int:
        return int(value.timestamp() * 1000)

    return ms(day), ms(day + datetime.timedelta(days=1)), ms(month), ms(next_month)
