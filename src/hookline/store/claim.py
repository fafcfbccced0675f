"""Which queued jobs of an upstream start now: the claim's choice, fair and within limits.

:mod:`hookline.fairness` plans the starts; this module is the SQL around the plan, a constant
number of statements per claim whatever the number of tenants:

1. ``_WAITING``: the (lane, tenant) queues with queued jobs, found by a walk of ``ix_jobs_claim``
   (one index seek per queue, however long each is), with their passes, the tenants' stored
   weights, whether a tenant has API keys with limits of their own (a seek in the partial index
   ``ix_api_keys_limited``, empty while no key has limits) and the lanes' clocks.
2. Only when a waiting tenant has limits, or one of its keys, or the upstream a token limit: its
   running jobs (``_TENANTS_RUNNING``, one pass over every running job), its limited keys with
   theirs (``_KEYS_LIMITED``) and the last minute's starts (``_WINDOW``), under one transaction
   lock for all tenants (PostgreSQL), so that the limits hold across upstreams and processes.
3. One queue waiting and nothing to check: ``_CLAIM_HEAD``, today's single ordered claim.
   Otherwise ``_heads(n)`` reads the next jobs of the n queues the plan gives starts to (once
   more, at most, when a queue held fewer than planned or a job did not fit a limit; a key at its
   limit is left out of that read, so its tenant's other keys' jobs come instead), and
   ``_claim_ids`` starts the chosen ones.
4. The passes and clocks (``fair_shares``, one upsert), and for starts under a per-minute limit
   their rows of ``usage_window`` (one insert; the rows that left the window are deleted).

The caller holds the upstream's transaction lock (``sql._lock_upstream``), so claims of one
upstream run one at a time and each sees the passes the last one wrote.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from hookline.config import TenantLimits
from hookline.fairness import (
    DEFAULT_OUTPUT_TOKENS,
    WINDOW_MS,
    FairPolicy,
    KeyLimits,
    Plan,
    Waiting,
    key_scope,
    plan,
    tenant_scope,
    upstream_scope,
)
from hookline.jobs import Job, JobStatus, Lane, Operation
from hookline.store.database import chosen_once
from hookline.store.schema import KEY_LIMITED, api_keys, fair_shares, jobs, usage_window

_QUEUED = JobStatus.QUEUED.value
_RUNNING = JobStatus.RUNNING.value

# --- named statements

# The waiting (lane, tenant) queues of :upstream: per lane, the smallest tenant, then the next
# one above it, and so on (a loose index scan, which neither database does by itself); then the
# lanes' own rows (tenant '') of fair_shares. Each tenant comes with its stored weight, if any,
# and whether it has keys with limits of their own.
_WAITING = sa.text(
    f"""
WITH RECURSIVE waiting(lane, tenant) AS (
    SELECT lanes.lane, (
        SELECT min(j.tenant) FROM jobs j
        WHERE j.status = 'queued' AND j.upstream = :upstream AND j.lane = lanes.lane
    )
    FROM (SELECT 'interactive' AS lane UNION ALL SELECT 'default' UNION ALL SELECT 'batch') lanes
    UNION ALL
    SELECT w.lane, (
        SELECT min(j.tenant) FROM jobs j
        WHERE j.status = 'queued' AND j.upstream = :upstream AND j.lane = w.lane
            AND j.tenant > w.tenant
    )
    FROM waiting w WHERE w.tenant IS NOT NULL
)
SELECT w.lane, w.tenant, s.pass, s.credit, t.weight,
    EXISTS (SELECT 1 FROM api_keys k WHERE k.tenant = w.tenant AND ({KEY_LIMITED})) AS keyed
FROM waiting w
LEFT JOIN fair_shares s ON s.upstream = :upstream AND s.lane = w.lane AND s.tenant = w.tenant
LEFT JOIN tenants t ON t.tenant = w.tenant
WHERE w.tenant IS NOT NULL
UNION ALL
SELECT s.lane, s.tenant, s.pass, s.credit, NULL, NULL FROM fair_shares s
WHERE s.upstream = :upstream AND s.tenant = ''
"""
)

_NOW = sa.bindparam("now", type_=sa.BigInteger)


def _runnable(lane: Any, tenant: Any) -> tuple[sa.ColumnElement[bool], ...]:
    """Runnable queued jobs of one queue of upstream ``q_upstream`` (bind names other than the
    columns': an UPDATE reserves those)."""
    return (
        jobs.c.status == _QUEUED,
        jobs.c.upstream == sa.bindparam("q_upstream", type_=sa.String),
        jobs.c.lane == lane,
        jobs.c.tenant == tenant,
        jobs.c.run_after <= _NOW,
        sa.or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > _NOW),
    )


_ORDER = (jobs.c.priority.desc(), jobs.c.id)
_STARTED = {
    "status": _RUNNING,
    "attempts": jobs.c.attempts + 1,
    "started_at": sa.func.coalesce(jobs.c.started_at, _NOW),
    "updated_at": _NOW,
    "lease_token": sa.bindparam("token", type_=sa.String),
    "lease_expires_at": sa.bindparam("expires", type_=sa.BigInteger),
    "event_seq": jobs.c.event_seq + 1,
}

# The next jobs of one queue, started in one statement (chosen once: see chosen_once).
_CLAIM_HEAD = (
    sa.update(jobs)
    .where(
        jobs.c.id.in_(
            chosen_once(
                sa.select(jobs.c.id)
                .where(*_runnable(sa.bindparam("q_lane"), sa.bindparam("q_tenant")))
                .order_by(*_ORDER)
                .limit(sa.bindparam("k", type_=sa.Integer))
                .with_for_update(skip_locked=True),
                "claimable",
            )
        ),
        jobs.c.status == _QUEUED,
    )
    .values(**_STARTED)
    .returning(*jobs.c)
)


# Jobs of no key at its limit (``blocked``), or chosen already (``pinned``).
_NOT_BLOCKED = sa.or_(
    jobs.c.key_id.is_(None),
    jobs.c.key_id.not_in(sa.bindparam("blocked", expanding=True)),
    jobs.c.id.in_(sa.bindparam("pinned", expanding=True)),
)


_HEAD_COLUMNS = (jobs.c.id, jobs.c.lane, jobs.c.tenant, jobs.c.priority, jobs.c.expected_tokens,
                 jobs.c.key_id)  # fmt: skip


@functools.lru_cache(maxsize=256)
def _heads(n: int, keyed: bool = False) -> sa.Select[Any] | sa.CompoundSelect[Any]:
    """The next ``k<i>`` runnable jobs of each of ``n`` queues (``l<i>``, ``t<i>``); ``keyed``:
    but those of the keys ``blocked`` (unless ``pinned``)."""
    parts = []
    for i in range(n):
        where = _runnable(sa.bindparam(f"l{i}"), sa.bindparam(f"t{i}"))
        head = (
            sa.select(*_HEAD_COLUMNS)
            .where(*where, *((_NOT_BLOCKED,) if keyed else ()))
            .order_by(*_ORDER)
            .limit(sa.bindparam(f"k{i}", type_=sa.Integer))
            .subquery(f"q{i}")
        )
        parts.append(sa.select(head))
    return parts[0] if n == 1 else sa.union_all(*parts)


# Rows the plan chose; a row a cancel took meanwhile is no longer queued and stays out.
_CLAIM_IDS = {
    "sqlite": sa.update(jobs)
    .where(jobs.c.id.in_(sa.bindparam("ids", expanding=True)), jobs.c.status == _QUEUED)
    .values(**_STARTED)
    .returning(*jobs.c),
    "postgresql": sa.update(jobs)
    .where(
        jobs.c.id == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.String))),
        jobs.c.status == _QUEUED,
    )
    .values(**_STARTED)
    .returning(*jobs.c),
}

# Every tenant's running jobs, on every upstream (a batch's anchor row is no job): one pass over
# the running jobs (a seek in ix_jobs_claim); the caller keeps the limited tenants'. Not filtered
# by tenant: on SQLite without statistics a ``tenant IN (...)`` made the planner walk
# ix_jobs_tenant_id, the tenants' whole history.
_TENANTS_RUNNING = (
    sa.select(jobs.c.tenant, sa.func.count())
    .where(jobs.c.status == _RUNNING, jobs.c.operation != Operation.BATCH.value)
    .group_by(jobs.c.tenant)
)

# The keys of some tenants that have limits of their own (a seek in ix_api_keys_limited), with
# their running jobs on every upstream: one pass over the running jobs (however many such keys;
# not by tenant, which would read the tenants' finished jobs too).
_KEYS_RUNNING = (
    sa.select(jobs.c.key_id, sa.func.count().label("running"))
    .where(jobs.c.status == _RUNNING, jobs.c.key_id.is_not(None))
    .group_by(jobs.c.key_id)
    .subquery("key_running")
)
_KEYS_LIMITED = (
    sa.select(
        api_keys.c.id,
        api_keys.c.max_concurrency,
        api_keys.c.requests_per_minute,
        api_keys.c.tokens_per_minute,
        sa.func.coalesce(_KEYS_RUNNING.c.running, 0),
    )
    .select_from(api_keys.outerjoin(_KEYS_RUNNING, _KEYS_RUNNING.c.key_id == api_keys.c.id))
    .where(
        api_keys.c.tenant.in_(sa.bindparam("tenants", expanding=True)),
        sa.text(f"({KEY_LIMITED})"),
    )
)

# Each scope's starts and tokens in the window, and its oldest start (when room comes back).
_WINDOW = (
    sa.select(
        usage_window.c.scope,
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(usage_window.c.tokens), 0),
        sa.func.min(usage_window.c.started_at),
    )
    .where(
        usage_window.c.scope.in_(sa.bindparam("scopes", expanding=True)),
        usage_window.c.started_at > sa.bindparam("since", type_=sa.BigInteger),
    )
    .group_by(usage_window.c.scope)
)

_WINDOW_EXPIRED = sa.delete(usage_window).where(
    usage_window.c.scope.in_(sa.bindparam("scopes", expanding=True)),
    usage_window.c.started_at <= sa.bindparam("since", type_=sa.BigInteger),
)

# Runnable interactive jobs of an upstream (up to :k): a job accepted already running must not
# pass them (hookline.store.sql._within_running_limits).
_INTERACTIVE_WAITING = sa.select(sa.func.count()).select_from(
    sa.select(sa.literal(1))
    .where(
        jobs.c.status == _QUEUED,
        jobs.c.upstream == sa.bindparam("upstream", type_=sa.String),
        jobs.c.lane == Lane.INTERACTIVE.value,
        jobs.c.run_after <= _NOW,
    )
    .limit(sa.bindparam("k", type_=sa.Integer))
    .subquery()
)


@functools.cache
def _save_shares(dialect: str) -> sa.Insert:
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(fair_shares)
    excluded = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=[fair_shares.c.upstream, fair_shares.c.lane, fair_shares.c.tenant],
        set_={
            "pass": excluded["pass"],
            "credit": excluded["credit"],
            "updated_at": excluded["updated_at"],
        },
    )


def lock_tenants(conn: Connection) -> None:
    """Hold the tenants' limits until the transaction ends (PostgreSQL; SQLite writes one at a
    time). Taken after an upstream's lock, never before one: no two transactions wait on each
    other in a cycle."""
    if conn.dialect.name == "postgresql":
        key = sa.func.hashtext(sa.literal("hookline.tenants"))
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


# --- limits


@dataclasses.dataclass
class Limits:
    """What the tenants' and the upstream's limits still allow in this transaction."""

    caps: dict[str, int]  # tenant -> starts its concurrency and requests per minute allow
    tokens: dict[str, int]  # scope -> tokens its limit allows (absent: no token limit)
    empty: set[str]  # scopes with nothing in the window: a job larger than the limit may start
    wake_at: int | None  # when a per-minute limit that holds a tenant back frees room
    held_back: bool = False  # some tenant had runnable jobs that a limit kept waiting
    # scope -> (starts, tokens, oldest start) in the window
    window: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    # The keys with limits of their own, of the tenants asked about, and the starts their
    # concurrency and requests per minute allow (absent: no such limit).
    keys: dict[str, KeyLimits] = dataclasses.field(default_factory=dict)
    key_caps: dict[str, int] = dataclasses.field(default_factory=dict)


def read_limits(
    conn: Connection,
    policy: FairPolicy,
    upstream: str,
    tenants: Collection[str],
    now: int,
    keyed: Collection[str] = (),
) -> Limits:
    """The room the limits of ``tenants``, of the limited keys of the tenants ``keyed``, and of
    ``upstream`` leave (three statements at most)."""
    limited = sorted(t for t in tenants if policy.limited(t))
    upstream_tpm = policy.upstream_tokens_per_minute.get(upstream)
    limits = Limits({}, {}, set(), None)
    if not limited and not keyed and upstream_tpm is None:
        return limits
    if limited or keyed:
        lock_tenants(conn)
    concurrent = [t for t in limited if policy.limits(t).max_concurrency is not None]
    running: dict[str, int] = {}
    if concurrent:
        wanted = set(concurrent)
        rows = conn.execute(_TENANTS_RUNNING)
        running = {str(tenant): int(count) for tenant, count in rows if tenant in wanted}
    keys_running: dict[str, int] = {}
    if keyed:
        for key_id, most, rpm, tpm, key_running in conn.execute(
            _KEYS_LIMITED, {"tenants": sorted(keyed)}
        ):
            limits.keys[str(key_id)] = KeyLimits(most, rpm, tpm)
            keys_running[str(key_id)] = int(key_running)
    scopes = {tenant_scope(t): t for t in limited if _per_minute(policy, t)}
    scopes.update({key_scope(k): "" for k, own in limits.keys.items() if own.per_minute})
    if upstream_tpm is not None:
        scopes[upstream_scope(upstream)] = ""
    window = limits.window
    if scopes:
        params = {"scopes": list(scopes), "since": now - WINDOW_MS}
        for scope, count, tokens, oldest in conn.execute(_WINDOW, params):
            window[scope] = (int(count), int(tokens), int(oldest))
    for scope in scopes:
        if scope not in window:
            limits.empty.add(scope)
    for tenant in limited:
        cap = _room(policy.limits(tenant), running.get(tenant, 0), tenant_scope(tenant), window,
                    limits, now)  # fmt: skip
        if cap is not None:
            limits.caps[tenant] = cap
    for key_id, own in limits.keys.items():
        cap = _room(own, keys_running.get(key_id, 0), key_scope(key_id), window, limits, now)
        if cap is not None:
            limits.key_caps[key_id] = cap
    if upstream_tpm is not None:
        _, tokens, _ = window.get(upstream_scope(upstream), (0, 0, now))
        limits.tokens[upstream_scope(upstream)] = upstream_tpm - tokens
    return limits


def _room(
    own: TenantLimits | KeyLimits,
    running: int,
    scope: str,
    window: dict[str, tuple[int, int, int]],
    limits: Limits,
    now: int,
) -> int | None:
    """How many more jobs a tenant or a key (``own``: its limits, ``scope``: its window) may
    start now (None: no cap); its tokens' room goes to ``limits.tokens``, and the time a spent
    requests-per-minute frees up to ``limits.wake_at``."""
    cap: int | None = None
    if own.max_concurrency is not None:
        cap = own.max_concurrency - running
    count, tokens, oldest = window.get(scope, (0, 0, now))
    if own.requests_per_minute is not None:
        rpm_room = own.requests_per_minute - count
        if rpm_room <= 0:
            limits.wake_at = _earliest(limits.wake_at, oldest + WINDOW_MS)
        cap = rpm_room if cap is None else min(cap, rpm_room)
    if own.tokens_per_minute is not None:
        limits.tokens[scope] = own.tokens_per_minute - tokens
    return None if cap is None else max(cap, 0)


def _per_minute(policy: FairPolicy, tenant: str) -> bool:
    limits = policy.limits(tenant)
    return limits.requests_per_minute is not None or limits.tokens_per_minute is not None


def _earliest(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def fits(limits: Limits, scopes: Iterable[str], tokens: int, *, take: bool = True) -> bool:
    """Whether a start of ``tokens`` fits every token limit of ``scopes`` (and, with ``take``,
    takes them)."""
    scopes = [s for s in scopes if s in limits.tokens]
    for scope in scopes:
        if tokens > limits.tokens[scope] and not (
            scope in limits.empty and limits.tokens[scope] >= 0
        ):
            return False
    if not take:
        return True
    for scope in scopes:
        limits.tokens[scope] -= tokens
        limits.empty.discard(scope)
    return True


def admits(limits: Limits, job: Job) -> bool:
    """Whether ``job`` may start within ``limits`` (taking its share of them if so)."""
    cap = limits.caps.get(job.tenant)
    if cap is not None and cap <= 0:
        return False
    scopes = (tenant_scope(job.tenant), upstream_scope(job.upstream))
    if not fits(limits, scopes, job.expected_tokens or DEFAULT_OUTPUT_TOKENS):
        return False
    if cap is not None:
        limits.caps[job.tenant] = cap - 1
    return True


def token_wake(limits: Limits, scopes: Iterable[str]) -> int | None:
    """When the oldest start of these scopes leaves the window (room for tokens comes back)."""
    times = [limits.window[s][2] + WINDOW_MS for s in scopes if s in limits.window]
    return min(times) if times else None


def record_starts(
    conn: Connection,
    policy: FairPolicy,
    started: Sequence[Job],
    now: int,
    keys: Mapping[str, KeyLimits] | None = None,
) -> None:
    """Put the starts under a per-minute limit (of their tenant, their key among ``keys``, their
    upstream) into the window, with the tokens they reserve, and drop what left the window of
    those scopes."""
    rows: list[dict[str, Any]] = []
    for job in started:
        tokens = job.expected_tokens or DEFAULT_OUTPUT_TOKENS
        scopes = []
        if _per_minute(policy, job.tenant):
            scopes.append(tenant_scope(job.tenant))
        own = keys.get(job.key_id) if keys and job.key_id else None
        if own is not None and own.per_minute:
            scopes.append(key_scope(str(job.key_id)))
        if job.upstream in policy.upstream_tokens_per_minute:
            scopes.append(upstream_scope(job.upstream))
        rows += [
            {"scope": scope, "job_id": job.id, "attempt": job.attempts, "started_at": now,
             "tokens": tokens}
            for scope in scopes
        ]  # fmt: skip
    if not rows:
        return
    scopes = sorted({str(row["scope"]) for row in rows})
    conn.execute(_WINDOW_EXPIRED, {"scopes": scopes, "since": now - WINDOW_MS})
    conn.execute(sa.insert(usage_window), rows)


def settle(conn: Connection, job_id: str, attempt: int, tokens: int) -> None:
    """Replace an attempt's reserved tokens in the window by those it used."""
    conn.execute(
        sa.update(usage_window)
        .where(usage_window.c.job_id == job_id, usage_window.c.attempt == attempt)
        .values(tokens=tokens)
    )


def interactive_waiting(conn: Connection, upstream: str, now: int, up_to: int) -> int:
    """Runnable interactive jobs queued for ``upstream`` (counted up to ``up_to``)."""
    params = {"upstream": upstream, "now": now, "k": up_to}
    return int(conn.execute(_INTERACTIVE_WAITING, params).scalar_one())


# --- the claim


@dataclasses.dataclass
class Chosen:
    jobs: list[Job]  # started, in the order the plan chose them
    wake_at: int | None = None  # when a per-minute limit that held jobs back frees room
    held_back: bool = False  # runnable jobs were left queued by a limit


def claim_fairly(
    conn: Connection,
    upstream: str,
    room: int,
    *,
    now: int,
    lease_token: str,
    lease_expires_at: int,
    policy: FairPolicy,
) -> Chosen:
    """Start up to ``room`` queued jobs of ``upstream``: lanes in order (with the batch floor),
    tenants by weighted pass, none beyond a tenant's or the upstream's limits."""
    waiting: list[Waiting] = []
    clocks: dict[Lane, float] = {}
    credit = 0.0
    stored_weights: dict[str, float] = {}
    keyed: set[str] = set()  # tenants with keys that have limits of their own
    queues = conn.execute(_WAITING, {"upstream": upstream})
    for lane, tenant, stored, stored_credit, stored_weight, has_keys in queues:
        if tenant == "":
            clocks[Lane(lane)] = float(stored)
            if lane == Lane.BATCH.value:
                credit = float(stored_credit)
        else:
            waiting.append(Waiting(Lane(lane), tenant, None if stored is None else float(stored)))
            if stored_weight is not None:
                stored_weights[tenant] = float(stored_weight)
            if has_keys:
                keyed.add(tenant)
    if not waiting or room <= 0:
        return Chosen([])
    weight = policy.weights(stored_weights)
    limits = read_limits(conn, policy, upstream, {q.tenant for q in waiting}, now, keyed)
    started = {"now": now, "token": lease_token, "expires": lease_expires_at}
    if len(waiting) == 1 and not limits.caps and not limits.tokens and not limits.keys:
        [queue] = waiting
        params = {"q_upstream": upstream, "q_lane": queue.lane.value,
                  "q_tenant": queue.tenant, "k": room, **started}  # fmt: skip
        claimed = [Job.from_row(row) for row in conn.execute(_CLAIM_HEAD, params).mappings()]
        taken = {(queue.lane, queue.tenant): len(claimed)}
        claimed.sort(key=lambda job: (-job.priority, job.id))
        order = {job.id: i for i, job in enumerate(claimed)}
        planned = plan(
            [dataclasses.replace(queue, available=len(claimed))], len(claimed),
            weight=weight, caps={}, clocks=clocks, credit=credit,
            batch_min_share=policy.batch_min_share,
        )  # fmt: skip
    else:
        planned, taken, ordered_ids, held = _choose(
            conn, upstream, room, now, waiting, limits, policy, weight, clocks, credit
        )
        limits.held_back |= held
        claimed = []
        if ordered_ids:
            params = {"ids": ordered_ids, **started}
            rows = conn.execute(_CLAIM_IDS[conn.dialect.name], params).mappings()
            claimed = [Job.from_row(row) for row in rows]
        order = {job_id: i for i, job_id in enumerate(ordered_ids)}
    claimed.sort(key=lambda job: order[job.id])
    if claimed:
        # (A row a cancel took between the read and the update is counted as started: the
        # tenant is charged one start it did not get, which the next claims even out.)
        final = planned.as_started(taken, weight=weight, clocks=clocks, credit=credit)
        _keep(conn, upstream, final, now)
        record_starts(conn, policy, claimed, now, limits.keys)
    return Chosen(claimed, limits.wake_at, limits.held_back)


def _choose(
    conn: Connection,
    upstream: str,
    room: int,
    now: int,
    waiting: list[Waiting],
    limits: Limits,
    policy: FairPolicy,
    weight: Callable[[str], float],
    clocks: dict[Lane, float],
    credit: float,
) -> tuple[Plan, dict[tuple[Lane, str], int], list[str], bool]:
    """Plan, read the planned queues' next jobs, and keep those that fit the limits (token
    limits; a key's own limits, whose jobs are passed over for the next ones of its tenant);
    once more when a queue held fewer than planned or a job did not fit, leaving out the jobs of
    the keys at a limit. Returns the plan, the starts per queue, the chosen ids in order, and
    whether a limit held a tenant or a key back."""
    caps = dict(limits.caps)
    known = {(q.lane, q.tenant): q.available for q in waiting}
    held = any(cap <= 0 for cap in caps.values())
    at_limit = {key for key, cap in limits.key_caps.items() if cap <= 0}
    held |= bool(at_limit)
    stopped = set(at_limit)  # keys at a limit: their jobs are left out of the next read
    pinned: list[str] = []  # chosen jobs of keys at a limit: the second read keeps them
    chosen: list[str] = []
    taken: dict[tuple[Lane, str], int] = {}
    planned = Plan([], {}, clocks, credit)
    for _round in range(2):
        queues = [Waiting(q.lane, q.tenant, q.stored_pass, known[(q.lane, q.tenant)])
                  for q in waiting]  # fmt: skip
        planned = plan(
            queues, room, weight=weight, caps=caps, clocks=clocks, credit=credit,
            batch_min_share=policy.batch_min_share,
        )  # fmt: skip
        counts = planned.counts()
        if not counts:
            break
        given: dict[str, int] = {}
        for lane_and_tenant, n in counts.items():
            given[lane_and_tenant[1]] = given.get(lane_and_tenant[1], 0) + n
        # A tenant that reached its cap may have more waiting: a slot that frees claims again.
        held |= any(given.get(tenant, 0) >= cap for tenant, cap in caps.items())
        excluded = (sorted(stopped), pinned) if limits.keys else None
        heads = _read_heads(conn, upstream, now, counts, excluded)
        tokens = dataclasses.replace(limits, tokens=dict(limits.tokens), empty=set(limits.empty))
        key_caps = dict(limits.key_caps)
        chosen, taken = [], {}
        of_keys: list[tuple[str, str]] = []  # (job, key) chosen of a key with limits
        passed_over = set(at_limit)  # keys whose next jobs wait, in this round
        cursor: dict[tuple[Lane, str], int] = {}
        short = False
        blocked: set[str] = set()
        for pick in planned.picks:
            lane, tenant = pick.lane, pick.tenant
            if tenant in blocked:
                continue
            queue = heads.get((lane, tenant), [])
            i = cursor.get((lane, tenant), 0)
            while True:
                if i >= len(queue):
                    if len(queue) < counts[(lane, tenant)]:  # it holds no more runnable jobs
                        known[(lane, tenant)] = taken.get((lane, tenant), 0)
                    short = True
                    break
                job_id, expected, key = queue[i]
                cost = expected or DEFAULT_OUTPUT_TOKENS
                own = limits.keys.get(key) if key is not None else None
                scopes = [tenant_scope(tenant), upstream_scope(upstream)]
                if key is not None and own is not None:
                    scopes.append(key_scope(key))
                    if key in passed_over or key_caps.get(key, 1) <= 0:
                        passed_over.add(key)
                        held = short = True
                        i += 1  # the key's next jobs wait; its tenant's others may go
                        continue
                    if not fits(tokens, [key_scope(key)], cost, take=False):
                        passed_over.add(key)
                        wake = token_wake(limits, [key_scope(key)])
                        if wake is not None:
                            limits.wake_at = _earliest(limits.wake_at, wake)
                        held = short = True
                        i += 1
                        continue
                if not fits(tokens, scopes, cost):
                    blocked.add(tenant)
                    caps[tenant] = sum(c for (_, t), c in taken.items() if t == tenant)
                    wake = token_wake(limits, scopes[:2])
                    if wake is not None:
                        limits.wake_at = _earliest(limits.wake_at, wake)
                    held = short = True
                    break
                i += 1
                chosen.append(job_id)
                taken[(lane, tenant)] = taken.get((lane, tenant), 0) + 1
                if key is not None and own is not None:
                    of_keys.append((job_id, key))
                    if key in key_caps:
                        key_caps[key] -= 1
                break
            cursor[(lane, tenant)] = i
        if not short or len(chosen) >= room:
            break
        stopped |= passed_over | {key for key, cap in key_caps.items() if cap <= 0}
        pinned = [job_id for job_id, key in of_keys if key in stopped]
    return planned, taken, chosen, held


def _read_heads(
    conn: Connection,
    upstream: str,
    now: int,
    counts: dict[tuple[Lane, str], int],
    excluded: tuple[list[str], list[str]] | None = None,
) -> dict[tuple[Lane, str], list[tuple[str, int | None, str | None]]]:
    """The next jobs of the planned queues, as (id, expected tokens, key); with ``excluded``
    (keys at a limit, jobs chosen already), none of those keys' jobs but the chosen ones."""
    params: dict[str, Any] = {"q_upstream": upstream, "now": now}
    for i, ((lane, tenant), k) in enumerate(counts.items()):
        params.update({f"l{i}": lane.value, f"t{i}": tenant, f"k{i}": k})
    if excluded is not None:
        params.update({"blocked": excluded[0], "pinned": excluded[1]})
    statement = _heads(len(counts), excluded is not None)
    rows = sorted(conn.execute(statement, params), key=lambda r: (-r[3], r[0]))
    heads: dict[tuple[Lane, str], list[tuple[str, int | None, str | None]]] = {}
    for job_id, lane, tenant, _priority, expected, key in rows:  # each queue in its own order
        heads.setdefault((Lane(lane), tenant), []).append((job_id, expected, key))
    return heads


def _keep(conn: Connection, upstream: str, final: Plan, now: int) -> None:
    """Write the passes of the queues that started jobs, and their lanes' clocks (and the batch
    lane's credit)."""
    lanes = {pick.lane for pick in final.picks}
    if final.credit:
        lanes.add(Lane.BATCH)
    rows = [
        {"upstream": upstream, "lane": lane.value, "tenant": tenant, "pass": value,
         "credit": 0.0, "updated_at": now}
        for (lane, tenant), value in final.passes.items()
    ]  # fmt: skip
    for lane in lanes:
        clock = final.clocks.get(lane, 0.0)
        credit = final.credit if lane is Lane.BATCH else 0.0
        rows.append({"upstream": upstream, "lane": lane.value, "tenant": "", "pass": clock,
                     "credit": credit, "updated_at": now})  # fmt: skip
    conn.execute(_save_shares(conn.dialect.name), rows)
