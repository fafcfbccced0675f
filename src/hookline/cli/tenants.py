"""``hookline tenants``: every tenant's share, limits and use, read from the database directly
(no gateway needs to run), for the operator (docs/fairness.md)."""

from __future__ import annotations

import asyncio
import json

import typer

from hookline.cli.options import ConfigOpt, DatabaseOpt, fail, settings
from hookline.errors import HooklineError

_LIMITS = (
    ("max_concurrency", "running"),
    ("requests_per_minute", "rpm"),
    ("tokens_per_minute", "tpm"),
    ("daily_token_budget", "day"),
    ("monthly_token_budget", "month"),
)


def tenants(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per tenant."),
) -> None:
    """Every tenant's share, limits and use.

    Each tenant configured in [[tenants]], with a stored weight or with jobs this month: its
    weight (a [[tenants]] entry's, else the one `keys create --weight` stored) and limits, its
    jobs queued and running, and the tokens of its jobs submitted today and this month.
    """
    from hookline.clock import SystemClock
    from hookline.fairness import FairPolicy, budget_periods
    from hookline.store import open_store

    chosen = settings(config, database_url=database_url)
    policy = FairPolicy.from_settings(chosen)

    async def run() -> list[dict[str, object]]:
        store = await open_store(chosen.database_url)
        try:
            day, _, month, _ = budget_periods(SystemClock().now_ms())
            overview = {o.tenant: o for o in await store.tenants_overview(day, month)}
            stored = await store.keys.weights()
        finally:
            await store.close()
        rows = []
        for name in sorted({*overview, *stored, *(t.name for t in chosen.tenants)}):
            limits = policy.limits(name)
            seen = overview.get(name)
            rows.append({
                "tenant": name,
                "weight": policy.weight(name, stored.get(name)),
                **{key: getattr(limits, key) for key, _ in _LIMITS},
                "queued": seen.queued if seen else 0,
                "running": seen.running if seen else 0,
                "tokens_today": seen.tokens_today if seen else 0,
                "tokens_this_month": seen.tokens_this_month if seen else 0,
            })  # fmt: skip
        return rows

    try:
        rows = asyncio.run(run())
    except HooklineError as exc:
        fail(str(exc), 2)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'TENANT':<24} {'WEIGHT':>6} {'QUEUED':>7} {'RUNNING':>7} {'TOKENS TODAY':>13} "
          f"{'THIS MONTH':>13}  LIMITS")  # fmt: skip
    for row in rows:
        limits = " ".join(f"{short}={row[key]}" for key, short in _LIMITS if row[key] is not None)
        print(f"{row['tenant']:<24} {row['weight']:>6g} {row['queued']:>7} {row['running']:>7} "
              f"{row['tokens_today']:>13,} {row['tokens_this_month']:>13,}  {limits or '-'}")  # fmt: skip
