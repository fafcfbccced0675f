"""Shared fixtures: a fresh database per test (SQLite and PostgreSQL), the scripted upstream, and a
gateway served over real HTTP on loopback.

PostgreSQL tests clone a migrated template database per test (``CREATE DATABASE … TEMPLATE``);
SQLite tests copy a migrated template file. When PostgreSQL is not reachable its tests are skipped,
unless ``HOOKLINE_REQUIRE_SERVICES=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from hookline.api import create_app
from hookline.api.server import server_options
from hookline.clock import Clock
from hookline.config import Settings, UpstreamConfig
from hookline.gateway import Gateway
from hookline.observability import Telemetry
from hookline.store.database import open_database
from hookline.store.migrate import upgrade
from tests.scripted_anthropic import ScriptedAnthropic
from tests.scripted_upstream import ScriptedUpstream
from tests.webhook_receiver import WebhookReceiver

POSTGRES_URL = os.environ.get(
    "HOOKLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_SERVICES = os.environ.get("HOOKLINE_REQUIRE_SERVICES") == "1"
ROOT = Path(__file__).resolve().parent.parent
_TOOL_CACHES = {".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}


@pytest.fixture(autouse=True)
def _work_tree_left_clean() -> Iterator[None]:
    """A test leaves nothing in the checkout (a ``hookline.db``, say): files go under tmp_path."""
    before = set(os.listdir(ROOT))
    yield
    left = set(os.listdir(ROOT)) - before - _TOOL_CACHES
    if left:
        pytest.fail(f"the test left {sorted(left)} in {ROOT}")


def _service_missing(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (HOOKLINE_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL.replace("postgresql://", "postgres://"), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    database = open_database(url)
    try:
        await upgrade(database)
    finally:
        await database.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(_migrate(f"sqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    name = f"hookline_tpl_{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(_admin(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _service_missing(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    asyncio.run(_migrate(_with_database(POSTGRES_URL, name)))
    yield name
    with contextlib.suppress(Exception):
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each kind, private to the test."""
    if request.param == "sqlite":
        path = tmp_path / "hookline.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    yield from _postgres_database(request.getfixturevalue("postgres_template"))


@pytest.fixture
def postgres_url(postgres_template: str) -> Iterator[str]:
    """A migrated, empty PostgreSQL database private to the test (for the scale-out tests)."""
    yield from _postgres_database(postgres_template)


def _postgres_database(template: str) -> Iterator[str]:
    name = f"hookline_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {name} TEMPLATE {template}"))
    yield _with_database(POSTGRES_URL, name)
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = WebhookReceiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def claude() -> AsyncIterator[ScriptedAnthropic]:
    """A scripted Anthropic Messages API server."""
    server = ScriptedAnthropic()
    await server.start()
    yield server
    await server.stop()


def gateway_settings(database_url: str, upstream_url: str, **changes: Any) -> Settings:
    """Settings tuned for tests: the scripted upstream serves every model, retries come fast."""
    upstream_changes = changes.pop("upstream", {})
    settings = Settings(
        database_url=database_url,
        local_model=False,
        upstreams=[
            UpstreamConfig(
                name="scripted",
                type="openai",
                base_url=upstream_url,
                models=["*"],
                max_concurrency=upstream_changes.pop("max_concurrency", 8),
                timeout_seconds=upstream_changes.pop("timeout_seconds", 10),
                idle_timeout_seconds=upstream_changes.pop("idle_timeout_seconds", 5),
                **upstream_changes,
            )
        ],
    )
    jobs = settings.jobs.model_copy(update={"retry_base_seconds": 0.05, **changes.pop("jobs", {})})
    webhooks = settings.webhooks.model_copy(
        update={
            "allowed_networks": ["127.0.0.0/8"],
            "poll_seconds": 0.05,
            "retry_schedule_seconds": [0.1, 0.1, 0.1],
            **changes.pop("webhooks", {}),
        }
    )
    worker = settings.worker.model_copy(
        update={
            "poll_seconds": 0.2,
            "heartbeat_seconds": 0.5,
            "maintenance_seconds": 0.2,
            "delta_flush_seconds": 0.05,
            "drain_seconds": 0.5,
            **changes.pop("worker", {}),
        }
    )
    streams = settings.streams.model_copy(update=changes.pop("streams", {}))
    return settings.model_copy(
        update={"jobs": jobs, "worker": worker, "webhooks": webhooks, "streams": streams, **changes}
    )


@dataclasses.dataclass
class LiveGateway:
    gateway: Gateway
    base_url: str
    api_key: str
    client: httpx.AsyncClient

    async def client_for(self, tenant: str) -> httpx.AsyncClient:
        key = await self.gateway.keys.create(tenant)
        return httpx.AsyncClient(
            base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    clock: Clock | None = None,
    *,
    run_worker: bool = True,
    migrate: bool = True,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[LiveGateway]:
    """Run a gateway with uvicorn on a free loopback port, in this event loop."""
    gateway = Gateway(
        settings, clock=clock, run_worker=run_worker, migrate=migrate, telemetry=telemetry
    )
    await gateway.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(gateway, manage_gateway=False),
        **server_options(settings),  # the same HTTP guards as hookline serve
        log_level="warning",
        ws="websockets-sansio",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.01)
    base_url = f"http://127.0.0.1:{port}"
    key = await gateway.keys.create("acme")
    client = httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    try:
        yield LiveGateway(gateway, base_url, key, client)
    finally:
        await client.aclose()
        server.should_exit = True
        await task
        sock.close()
        await gateway.stop()


@pytest.fixture
async def live(database_url: str, upstream: ScriptedUpstream) -> AsyncIterator[LiveGateway]:
    async with serve(gateway_settings(database_url, upstream.base_url)) as live_gateway:
        yield live_gateway


async def wait_for_status(
    client: httpx.AsyncClient, job_id: str, statuses: set[str], timeout: float = 15
) -> dict[str, Any]:
    """Long-poll until the job reaches one of ``statuses``; fail the test after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    terminal = {"succeeded", "failed", "cancelled", "expired"}
    # Long-poll for terminal targets; poll briefly for "queued"/"running", which long-polls skip.
    params = {"wait": 1} if statuses <= terminal else {}
    while True:
        response = await client.get(f"/v1/jobs/{job_id}", params=params)
        job: dict[str, Any] = response.json()
        if job["status"] in statuses:
            return job
        if loop.time() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        if job["status"] in terminal:
            raise AssertionError(f"job {job_id} ended {job['status']}, wanted {statuses}: {job}")
        if not params:
            await asyncio.sleep(0.05)
