"""The dashboard with 100,000 jobs: every page answers within a bound a full read of the table
would break, lists page by cursor, and filters stay quick."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import httpx

from hookline.events import EventType, NewEvent
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation
from tests.conftest import gateway_settings, serve
from tests.scripted_upstream import ScriptedUpstream

JOBS = 100_000
BOUND_SECONDS = 2.0  # a page; reading 100,000 jobs into Python takes several times this


async def test_pages_stay_fast_with_100000_jobs(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    settings = gateway_settings(f"sqlite:///{tmp_path}/big.db", upstream.base_url)
    async with serve(settings, run_worker=False) as live:
        store, now = live.gateway.store, live.gateway.clock.now_ms()
        for start in range(0, JOBS, 5000):
            batch = []
            for i in range(start, start + 5000):
                created = now - 2 * 3_600_000 + i * 72  # two hours of jobs, the last one now
                job = Job.new(id=new_id("job"), tenant="acme" if i % 2 else "globex",
                              operation=Operation.CHAT_COMPLETIONS, now=created, max_attempts=5,
                              model="m", upstream="scripted", input={"messages": []})  # fmt: skip
                status = JobStatus.FAILED if i % 50 == 0 else JobStatus.SUCCEEDED
                job = dataclasses.replace(job, status=status, attempts=1, started_at=created,
                                          finished_at=created + 400)  # fmt: skip
                batch.append((job, NewEvent(EventType.QUEUED, {})))
            await store.insert_jobs(batch)
        headers = {"Authorization": f"Bearer {live.api_key}"}  # tenant acme's
        async with httpx.AsyncClient(base_url=live.base_url, headers=headers, timeout=30) as tool:
            timings = {}
            pages = ["/dashboard", "/dashboard/jobs", "/dashboard/jobs?status=failed",
                     "/dashboard/jobs?model=m&status=succeeded", "/dashboard/jobs?model=none",
                     "/dashboard/deliveries", "/dashboard/upstreams", "/dashboard/batches"]  # fmt: skip
            for path in pages:
                began = time.perf_counter()
                answer = await tool.get(path)
                timings[path] = time.perf_counter() - began
                assert answer.status_code == 200, (path, answer.text[:300])
            first = (await tool.get("/dashboard/jobs")).text
            older = re.search(r'id="older" href="([^"]+)"', first)
            assert older is not None
            second = (await tool.get(older.group(1).replace("&amp;", "&"))).text
    assert max(timings.values()) < BOUND_SECONDS, timings
    ids = [re.findall(r'href="/dashboard/jobs/(job_\w+)"', page) for page in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 50 and not set(ids[0]) & set(ids[1])
    assert ids[0] == sorted(ids[0], reverse=True) and ids[0][-1] > ids[1][0]  # newest first
    assert "globex" not in first
