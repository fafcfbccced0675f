"""Fair sharing through the public API (docs/fairness.md): a tenant's backlog does not starve
another, interactive calls pass batch items, and the tenants' limits and budgets hold, on
SQLite and PostgreSQL, and across two gateways on one PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from hookline.config import FairnessConfig, Settings, TenantConfig, TenantLimits
from hookline.fairness import KeyLimits
from hookline.gateway import Gateway
from hookline.jobs import job_json
from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.processes import hookline
from tests.scripted_upstream import Reply, ScriptedUpstream
from tests.test_batches import FAST_BATCHES, _jsonl

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 40},
}


def _settings(
    database_url: str, upstream: ScriptedUpstream, *, delay: float, concurrency: int, **changes: Any
) -> Settings:
    """Calls that take ``delay`` each, ``concurrency`` at a time."""
    upstream.script("m", Reply(first_token_delay=delay))
    return gateway_settings(
        database_url, upstream.base_url, upstream={"max_concurrency": concurrency}, **changes
    )


async def _submit(client: httpx.AsyncClient, n: int, **headers: str) -> list[str]:
    """``n`` jobs, submitted 20 at a time; their ids in submission order."""
    ids: list[str] = []
    for start in range(0, n, 20):
        answers = await asyncio.gather(
            *(
                client.post("/v1/jobs", json=CHAT, headers=headers)
                for _ in range(min(20, n - start))
            )
        )
        for answer in answers:
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
    return ids


async def _jobs(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every job of the client's tenant."""
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/jobs", params=params)).json()
        jobs += page["data"]
        if not page["has_more"]:
            return jobs
        cursor = page["next_cursor"]


def _starts(jobs: list[dict[str, Any]]) -> list[str]:
    return sorted(job["started_at"] for job in jobs if job["started_at"])


async def test_a_tenant_with_a_few_jobs_is_served_despite_anothers_backlog(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    """The issue's measured case: one upstream of concurrency 2, calls of 200 ms; tenant A
    submits 200 jobs, one second later tenant B submits 6. First come, first served, 188 of A's
    started before B's last (B waited ~19 s); served in turn, B's six start among the next
    dozen starts."""
    settings = _settings(database_url, upstream, delay=0.2, concurrency=2)
    async with serve(settings) as live:
        a = await live.client_for("tenant-a")
        b = await live.client_for("tenant-b")
        await _submit(a, 200)
        await asyncio.sleep(1)
        b_ids = await _submit(b, 6)
        for job_id in b_ids:
            await wait_for_status(b, job_id, {"succeeded"}, timeout=20)
        b_jobs = await _jobs(b)
        a_jobs = await _jobs(a)
        await a.aclose()
        await b.aclose()
    b_arrived = min(job["created_at"] for job in b_jobs)
    b_last_start = max(_starts(b_jobs))
    a_started = _starts(a_jobs)
    a_between = [t for t in a_started if b_arrived <= t <= b_last_start]
    # Turns: one of A's for each of B's (and the two B's first found running), not A's backlog.
    assert len(a_between) <= 8, (len(a_between), len([t for t in a_started if t < b_arrived]))


async def test_interactive_calls_start_before_a_batch_backlog_moves_on(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    """Tenant A's 2,000 batch items are queued; tenant B's 20 interactive calls (the facade,
    someone waiting) all start before 50 more of A's items do."""
    settings = _settings(database_url, upstream, delay=0.05, concurrency=4, batches=FAST_BATCHES)
    async with serve(settings) as live:
        a = await live.client_for("tenant-a")
        created = await a.post(
            "/v1/batches", content=_jsonl(2000), headers={"Content-Type": "application/jsonl"}
        )
        assert created.status_code == 200, created.text
        while True:  # the batch's items are all queued, and it runs
            batch = (await a.get(f"/v1/batches/{created.json()['id']}")).json()
            if batch["request_counts"]["completed"] >= 8:
                break
            await asyncio.sleep(0.05)
        b = await live.client_for("tenant-b")
        body = {"model": "m", "messages": [{"role": "user", "content": "now"}]}
        answers = await asyncio.gather(
            *(b.post("/v1/chat/completions", json=body) for _ in range(20))
        )
        assert [answer.status_code for answer in answers] == [200] * 20
        b_jobs = await _jobs(b)
        # (The store itself: the list's cursor refuses a batch item's id, job_…_000123.)
        items = await live.gateway.store.list_jobs("tenant-a", limit=5000)
        a_jobs = [job_json(job) for job in items]
        await a.aclose()
        await b.aclose()
    assert len(a_jobs) == 2000
    assert {job["lane"] for job in b_jobs} == {"interactive"}
    assert {job["lane"] for job in a_jobs} == {"batch"}
    b_first = min(job["created_at"] for job in b_jobs)
    b_last_start = max(_starts(b_jobs))
    a_between = [t for t in _starts(a_jobs) if b_first <= t <= b_last_start]
    assert len(a_between) < 50, len(a_between)


async def test_tokens_per_minute_hold_and_a_waiting_caller_is_told_to_come_back(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    tenants = [TenantConfig(name="metered", tokens_per_minute=100)]
    settings = _settings(database_url, upstream, delay=0.05, concurrency=8, tenants=tenants)
    upstream.script("m", Reply(text="t" * 70, chunks=35))  # uses 5 + 35 tokens
    async with serve(settings) as live:
        client = await live.client_for("metered")
        await _submit(client, 10)  # each reserves 41 tokens: 1 of input, 40 of max_tokens
        await asyncio.sleep(2)
        jobs = await _jobs(client)
        started = [job for job in jobs if job["started_at"]]
        # Within the minute: what they used (from their usage) never passes the limit, and the
        # others wait, saying for what and until when.
        used = sum(
            job["output"]["usage"]["total_tokens"]
            for job in started
            if job["status"] == "succeeded"
        )
        assert len(started) == 2 and used == 80, (len(started), used)
        queued = next(job["id"] for job in jobs if job["status"] == "queued")
        waiting = (await client.get(f"/v1/jobs/{queued}")).json()
        assert waiting["status"] == "queued"
        assert waiting["waiting_for"] == "tenant_tpm" and waiting["expected_start_at"]
        # A caller who waits on the answer is told to come back instead.
        body = {"model": "m", "messages": [{"role": "user", "content": "now"}], "max_tokens": 40}
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["error"]["code"] == "tenant_tpm"
        sync = await client.post("/v1/jobs", json=CHAT, headers={"Prefer": "respond-async=false"})
        assert sync.status_code == 429 and "retry-after" in sync.headers
        assert len(await _jobs(client)) == 10  # refused: nothing was written
        usage = (await client.get("/v1/usage")).json()
        assert usage["limits"]["tokens_per_minute"] == 100
        assert 0 < usage["in_use"]["tokens_last_minute"] <= 100
        await client.aclose()


async def test_a_spent_budget_refuses_new_work_and_changes_nothing(
    database_url: str, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    tenants = [TenantConfig(name="thrifty", daily_token_budget=5)]
    fairness = FairnessConfig(budget_status=402)
    settings = _settings(
        database_url, upstream, delay=0, concurrency=2, tenants=tenants, fairness=fairness
    )
    async with serve(settings) as live:
        client = await live.client_for("thrifty")
        [first] = await _submit(client, 1)
        done = await wait_for_status(client, first, {"succeeded"})
        assert done["output"]["usage"]["total_tokens"] > 5
        await asyncio.sleep(1.1)  # what was spent is read at most once a second
        refused = await client.post("/v1/jobs", json=CHAT)
        assert refused.status_code == 402, refused.text
        problem = refused.json()
        assert problem["type"] == "urn:hookline:problem:budget_exhausted"
        assert "daily token budget" in problem["detail"]
        assert int(refused.headers["retry-after"]) <= 86_400
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        facade = await client.post("/v1/chat/completions", json=body)
        assert facade.status_code == 402
        batch = await client.post(
            "/v1/batches", content=_jsonl(3), headers={"Content-Type": "application/jsonl"}
        )
        assert batch.status_code == 402
        assert [job["id"] for job in await _jobs(client)] == [first]
        assert (await client.get("/v1/batches")).json()["data"] == []
        usage = (await client.get("/v1/usage")).json()
        [day] = usage["days"]
        assert day["jobs"] == 1 and day["model"] == "m"
        assert usage["in_use"]["tokens_today"] == done["output"]["usage"]["total_tokens"]
        # Another tenant is not touched by it.
        other = await live.client_for("spendthrift")
        assert (await other.post("/v1/jobs", json=CHAT)).status_code == 202
        await client.aclose()
        await other.aclose()
    # The operator's view: hookline tenants, from the database.
    config = tmp_path / "hookline.toml"
    config.write_text(
        'local_model = false\n[[tenants]]\nname = "thrifty"\ndaily_token_budget = 5\n'
    )
    listed = hookline("tenants", "--json", "--config", str(config), "--database-url", database_url)
    assert listed.returncode == 0, listed.stderr
    rows = {row["tenant"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert rows["thrifty"]["daily_token_budget"] == 5
    assert rows["thrifty"]["tokens_today"] == done["output"]["usage"]["total_tokens"]
    assert rows["spendthrift"]["queued"] + rows["spendthrift"]["running"] <= 1


# --- limits per API key


async def _client_of_key(live: LiveGateway, tenant: str, **limits: int) -> httpx.AsyncClient:
    """A client with a new key of ``tenant`` that has these limits of its own."""
    key, _ = await live.gateway.keys.issue(tenant, name="ci", limits=KeyLimits(**limits))
    return httpx.AsyncClient(
        base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


async def test_a_keys_concurrency_holds_while_its_tenants_other_keys_run_alongside(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    # Calls long enough that the checks below run while the key's first job holds its slot,
    # however loaded the machine.
    settings = _settings(database_url, upstream, delay=0.8, concurrency=8)
    async with serve(settings) as live:
        limited = await _client_of_key(live, "acme", max_concurrency=1)
        other = await live.client_for("acme")
        mine = await _submit(limited, 4)
        theirs = await _submit(other, 4)
        for _ in range(200):  # the other key's jobs start at once, not held back by this one's
            shown = {job["id"]: job for job in await _jobs(other)}  # every job of the tenant
            if all(shown[i]["started_at"] for i in theirs):
                break
            await asyncio.sleep(0.05)
        assert all(shown[i]["started_at"] for i in theirs), "the other key's jobs were held"
        assert sum(1 for i in mine if shown[i]["status"] == "running") == 1
        queued = next(i for i in mine if shown[i]["status"] == "queued")
        waiting = (await other.get(f"/v1/jobs/{queued}")).json()
        assert waiting["waiting_for"] == "key_concurrency", waiting
        # A caller of the key waiting on the answer is told to come back; the other key is not.
        sync = await limited.post("/v1/jobs", json=CHAT, headers={"Prefer": "respond-async=false"})
        assert sync.status_code == 429 and "retry-after" in sync.headers, sync.text
        assert sync.json()["type"] == "urn:hookline:problem:key_concurrency"
        body = {"model": "m", "messages": [{"role": "user", "content": "now"}]}
        facade = await limited.post("/v1/chat/completions", json=body)
        assert facade.status_code == 429 and facade.json()["error"]["code"] == "key_concurrency"
        assert (await other.post("/v1/chat/completions", json=body)).status_code == 200
        done = [await wait_for_status(limited, i, {"succeeded"}) for i in mine]
        spans = sorted((job["started_at"], job["finished_at"]) for job in done)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
        assert len(await _jobs(other)) == 9  # the refused calls wrote nothing
        for client in (limited, other):
            await client.aclose()


async def test_a_keys_requests_per_minute_hold_and_say_so(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _settings(database_url, upstream, delay=0, concurrency=8)
    async with serve(settings) as live:
        limited = await _client_of_key(live, "acme", requests_per_minute=3)
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        assert (await limited.post("/v1/chat/completions", json=body)).status_code == 200
        ids = await _submit(limited, 3)
        await asyncio.sleep(0.5)
        shown = [(await limited.get(f"/v1/jobs/{i}")).json() for i in ids]
        assert sorted(job["status"] for job in shown) == ["queued", "succeeded", "succeeded"]
        [waiting] = [job for job in shown if job["status"] == "queued"]
        assert waiting["waiting_for"] == "key_rpm" and waiting["expected_start_at"]
        usage = (await limited.get("/v1/usage")).json()
        assert usage["key"]["limits"]["requests_per_minute"] == 3
        assert usage["key"]["in_use"]["requests_last_minute"] == 3
        assert usage["key"]["in_use"]["tokens_today"] > 0
        assert (await live.client.get("/v1/usage")).json()["key"] is None  # a key without
        await limited.aclose()


async def test_a_keys_spent_budget_refuses_its_new_work_and_changes_nothing(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _settings(database_url, upstream, delay=0, concurrency=2)
    async with serve(settings) as live:
        limited = await _client_of_key(live, "acme", daily_token_budget=5)
        other = await live.client_for("acme")
        [first] = await _submit(limited, 1)
        done = await wait_for_status(limited, first, {"succeeded"})
        assert done["output"]["usage"]["total_tokens"] > 5
        await asyncio.sleep(1.1)  # what was spent is read at most once a second
        refused = await limited.post("/v1/jobs", json=CHAT)
        assert refused.status_code == 402, refused.text
        assert refused.json()["type"] == "urn:hookline:problem:budget_exhausted"
        assert "API key" in refused.json()["detail"] and "daily token budget" in refused.text
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        assert (await limited.post("/v1/chat/completions", json=body)).status_code == 402
        assert [job["id"] for job in await _jobs(limited)] == [first]
        assert (
            await other.post("/v1/jobs", json=CHAT)
        ).status_code == 202  # its tenant's other key
        for client in (limited, other):
            await client.aclose()


# --- two gateways on one PostgreSQL


async def _gateways(settings: Settings, n: int) -> AsyncIterator[list[Gateway]]:
    gateways = [Gateway(settings, serve_api=False) for _ in range(n)]
    try:
        for gateway in gateways:
            await gateway.start(migrate=False)
        yield gateways
    finally:
        for gateway in gateways:
            await gateway.stop()


async def test_limits_and_turns_hold_across_two_gateways(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    """Two more worker processes (gateways sharing only the database) claim as well: a tenant's
    max_concurrency holds across all three, and a tenant that comes later is still served in
    turn."""
    tenants = [TenantConfig(name="capped", max_concurrency=3)]
    defaults = FairnessConfig(tenant_defaults=TenantLimits())
    settings = _settings(
        postgres_url, upstream, delay=1.0, concurrency=8, tenants=tenants, fairness=defaults
    )
    async with serve(settings) as live:
        async for _ in _gateways(settings, 2):
            capped = await live.client_for("capped")
            ids = await _submit(capped, 21)
            most = 0
            for _ in range(30):  # sample the running jobs for 1.5 s
                running = (await capped.get("/v1/jobs", params={"status": "running"})).json()
                most = max(most, len(running["data"]))
                await asyncio.sleep(0.05)
            assert most == 3
            late = await live.client_for("late")
            [late_id] = await _submit(late, 1)
            done = await wait_for_status(late, late_id, {"succeeded"}, timeout=10)
            assert done["status"] == "succeeded"
            queued = (await capped.get(f"/v1/jobs/{max(ids)}")).json()  # (the last to run)
            assert queued["status"] == "queued" and queued["waiting_for"] == "tenant_concurrency"
            await capped.aclose()
            await late.aclose()


async def test_a_keys_concurrency_holds_across_three_gateways(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    """Three processes claim; a key's max_concurrency holds across all of them, while another key
    of its tenant runs beside it."""
    settings = _settings(postgres_url, upstream, delay=0.5, concurrency=12)
    async with serve(settings) as live:
        async for _ in _gateways(settings, 2):
            limited = await _client_of_key(live, "acme", max_concurrency=2)
            other = await live.client_for("acme")
            mine = set(await _submit(limited, 12))
            theirs = await _submit(other, 4)
            most, finished = 0, 0
            for _ in range(600):  # sample the running jobs until the key's twelve are done
                running = (await other.get("/v1/jobs", params={"status": "running"})).json()
                most = max(most, sum(1 for job in running["data"] if job["id"] in mine))
                done = (
                    await limited.get("/v1/jobs", params={"status": "succeeded", "limit": 100})
                ).json()
                finished = sum(1 for job in done["data"] if job["id"] in mine)
                if finished == len(mine):
                    break
                await asyncio.sleep(0.05)
            assert finished == len(mine) and most == 2, (finished, most)
            for job_id in theirs:
                await wait_for_status(other, job_id, {"succeeded"}, timeout=5)
            await limited.aclose()
            await other.aclose()


async def test_a_queued_jobs_position_counts_only_the_jobs_truly_ahead(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    """Behind another tenant's ten queued jobs, a tenant's first job is next, its second has one
    of the other's before it: turns, not the line."""
    settings = _settings(database_url, upstream, delay=1.0, concurrency=1)
    async with serve(settings) as live:
        a = await live.client_for("tenant-a")
        b = await live.client_for("tenant-b")
        first_a = await _submit(a, 1)
        await wait_for_status(a, first_a[0], {"running"})
        await _submit(a, 10)
        b_ids = await _submit(b, 1)
        b_ids += await _submit(b, 1)
        positions = [(await b.get(f"/v1/jobs/{i}")).json()["queue"]["position"] for i in b_ids]
        assert positions == [1, 3]  # b's first is next; then one of a's; then b's second
        await a.aclose()
        await b.aclose()
