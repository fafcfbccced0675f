"""The fault suite: the ledger holds through a full disk (every 202'd job exists and finishes, every
finished job's webhook arrives, no job has two terminal events), and callers get 503 with
Retry-After, never a 500. Marked ``fault``; bounded in time, loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import sqlalchemy as sa

from hookline.store import schema
from hookline.store.database import open_database
from tests.conftest import _service_missing, gateway_settings, serve, wait_for_status
from tests.pg_cluster import PrivateCluster, postgres_binaries
from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import Reply, ScriptedUpstream, Threaded
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.fault

TERMINAL = ("job.succeeded", "job.failed", "job.cancelled", "job.expired")


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` mounted at ``path`` (skipped where this process cannot mount)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the disk under ``directory`` to the last byte; the filler file, to free it again."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def _assert_webhooks_arrive(receiver: WebhookReceiver, accepted: list[str]) -> None:
    """Every accepted job's webhook arrives at the (threaded) receiver within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        delivered = {orjson.loads(r.body)["data"]["id"] for r in receiver.at("/hook")}
        if set(accepted) <= delivered:
            return
        time.sleep(0.2)
    raise AssertionError(f"{len(set(accepted) - delivered)} webhooks never arrived")


def chat(receiver: WebhookReceiver, size: int) -> dict[str, Any]:
    return {
        "operation": "chat.completions",
        "model": "m",
        "input": {"messages": [{"role": "user", "content": "x" * size}], "max_tokens": 4},
        "webhook": {"url": receiver.url()},
    }


async def test_full_disk_answers_503_and_loses_nothing_once_space_is_back(
    tmp_path: Path, sqlite_template: Path, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    with small_disk(tmp_path / "disk", 24) as disk:
        database = disk / "hookline.db"
        shutil.copy(sqlite_template, database)
        settings = gateway_settings(f"sqlite:///{database}", upstream.base_url)
        async with serve(settings) as live:
            accepted: list[str] = []

            async def submit(size: int) -> httpx.Response:
                response = await live.client.post("/v1/jobs", json=chat(receiver, size))
                assert response.status_code in (202, 503), response.text  # never a 500
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                else:
                    problem = response.json()
                    assert response.headers["retry-after"] and problem["status"] == 503
                    assert problem["type"].endswith("storage-full"), problem
                return response

            for _ in range(5):
                assert (await submit(1000)).status_code == 202
            filler = fill(disk)
            refused = 0
            for _ in range(40):  # large inputs: the disk cannot take them
                refused += (await submit(200_000)).status_code == 503
            assert refused > 0
            ready = await live.client.get("/readyz")
            assert ready.status_code == 503 and "full" in ready.json()["detail"], ready.text

            filler.unlink()  # space is back: everything recovers by itself
            for _ in range(100):
                if (await live.client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("still not ready 20 s after space came back")
            for _ in range(5):
                assert (await submit(1000)).status_code == 202

            for job_id in accepted:  # the ledger
                job = await wait_for_status(live.client, job_id, {"succeeded"}, timeout=30)
                assert job["status"] == "succeeded"
            await receiver.wait_for("/hook", len(accepted), timeout=30)
            sends = Counter(orjson.loads(r.body)["data"]["id"] for r in receiver.at("/hook"))
            assert set(sends) == set(accepted)
            # At least once, not again and again: a send whose record the full disk refused may go
            # once more when its lease lapses, never on every pass of the sender.
            assert max(sends.values()) <= 2, sends
            terminal = await live.gateway.database.read(
                lambda conn: conn.execute(
                    sa.select(schema.events.c.job_id, sa.func.count())
                    .where(schema.events.c.type.in_(TERMINAL))
                    .group_by(schema.events.c.job_id)
                ).all()
            )
            assert {job_id: count for job_id, count in terminal} == dict.fromkeys(accepted, 1)


def test_fill_reaches_the_last_byte(tmp_path: Path) -> None:
    """The helper itself: after fill(), not one more byte fits."""
    with small_disk(tmp_path / f"d{uuid.uuid4().hex[:6]}", 2) as disk:
        fill(disk)
        with pytest.raises(OSError) as raised, (disk / "more").open("wb") as out:
            out.write(b"x" * 4096)
            out.flush()
            os.fsync(out.fileno())
        assert raised.value.errno == errno.ENOSPC


def test_serve_killed_under_load_loses_nothing_and_resumes_at_once(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """SIGKILL of ``hookline serve`` on SQLite while jobs are being submitted and run, three times:
    every 202'd job finishes once with its webhook, and the jobs that were running at the crash
    are taken again as soon as the gateway is back (not after their 30 s lease)."""
    database = tmp_path / "hookline.db"
    shutil.copy(sqlite_template, database)
    with Threaded(ScriptedUpstream()) as upstream, Threaded(WebhookReceiver()) as receiver:
        upstream.script("m", Reply(first_token_delay=0.3, chunks=2))
        config = write_config(tmp_path / "hookline.toml", upstream.base_url, lease_seconds=30)
        env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": f"sqlite:///{database}"}
        created = hookline("keys", "create", "--tenant", "demo", env=env)
        assert created.returncode == 0, created.stderr
        headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
        accepted: list[str] = []
        serve = GatewayProcess("serve", env, tmp_path)
        try:
            for _ in range(3):
                serve.start()
                with httpx.Client(base_url=serve.url, headers=headers, timeout=10) as client:
                    for _ in range(30):
                        response = client.post("/v1/jobs", json=chat(receiver, 10))
                        assert response.status_code == 202, response.text
                        accepted.append(response.json()["id"])
                serve.kill()  # some jobs queued, some running (0.3 s to their first token)
            serve.start()
            restarted = time.monotonic()
            with httpx.Client(base_url=serve.url, headers=headers, timeout=30) as client:
                for job_id in accepted:
                    job = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
                    assert job["status"] == "succeeded", (job, serve.log.read_text())
            assert time.monotonic() - restarted < 20, "jobs waited for their lapsed leases"
            _assert_webhooks_arrive(receiver, accepted)
        finally:
            serve.stop()
    terminal = sqlite3.connect(database).execute(
        "SELECT job_id, count(*) FROM events WHERE type IN (?, ?, ?, ?) GROUP BY job_id", TERMINAL
    )
    assert dict(terminal.fetchall()) == dict.fromkeys(accepted, 1)


async def test_pooled_connections_broken_by_a_restart_are_replaced_not_failed() -> None:
    """After a PostgreSQL restart every pooled connection is dead; an operation that meets one
    runs again on a fresh connection (nothing had committed) instead of answering 503."""
    binaries = postgres_binaries()
    if binaries is None:
        _service_missing("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
        return
    cluster = PrivateCluster(binaries).create()
    try:
        database = open_database(cluster.url)
        try:

            async def one() -> object:
                return await database.write(lambda conn: conn.execute(sa.select(1)).scalar())

            assert await asyncio.gather(*(one() for _ in range(5))) == [1] * 5  # 5 pooled
            await asyncio.to_thread(cluster.stop)
            await asyncio.to_thread(cluster.start)
            assert await asyncio.gather(*(one() for _ in range(5))) == [1] * 5
        finally:
            await database.dispose()
    finally:
        cluster.destroy()


def test_api_and_workers_killed_under_load_on_postgresql_lose_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    """SIGKILL of the API process and both workers on PostgreSQL, three times, with jobs queued and
    running: every 202'd job finishes once with its webhook (a dead worker's jobs are taken by
    the next one when their 3 s lease lapses)."""
    with Threaded(ScriptedUpstream()) as upstream, Threaded(WebhookReceiver()) as receiver:
        upstream.script("m", Reply(first_token_delay=0.3, chunks=2))
        config = write_config(tmp_path / "hookline.toml", upstream.base_url, lease_seconds=3)
        env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": postgres_url}
        created = hookline("keys", "create", "--tenant", "demo", env=env)
        assert created.returncode == 0, created.stderr
        headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
        accepted: list[str] = []
        processes: list[GatewayProcess] = []
        try:
            for _ in range(3):
                api = GatewayProcess("api", env, tmp_path)
                workers = [GatewayProcess("worker", env, tmp_path) for _ in range(2)]
                processes += [api, *workers]
                for process in (api, *workers):
                    process.start()
                with httpx.Client(base_url=api.url, headers=headers, timeout=10) as client:
                    for _ in range(30):
                        response = client.post("/v1/jobs", json=chat(receiver, 10))
                        assert response.status_code == 202, response.text
                        accepted.append(response.json()["id"])
                time.sleep(0.5)  # some running
                for process in (api, *workers):
                    process.kill()
            api = GatewayProcess("api", env, tmp_path)
            processes += [api, GatewayProcess("worker", env, tmp_path)]
            for process in processes[-2:]:
                process.start()
            with httpx.Client(base_url=api.url, headers=headers, timeout=30) as client:
                for job_id in accepted:
                    job = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
                    assert job["status"] == "succeeded", job
            _assert_webhooks_arrive(receiver, accepted)
        finally:
            for process in processes:
                process.stop()
    terminal = asyncio.run(_terminal_counts(postgres_url))
    assert terminal == dict.fromkeys(accepted, 1)


async def _terminal_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"))
    try:
        rows = await conn.fetch(
            "SELECT job_id, count(*) FROM events WHERE type = ANY($1) GROUP BY job_id",
            list(TERMINAL),
        )
    finally:
        await conn.close()
    return {row[0]: row[1] for row in rows}
