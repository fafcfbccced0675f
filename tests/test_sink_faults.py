"""The sender killed mid-run (SIGKILL of a real ``hookline serve``) loses no sink message, and
NATS (``Nats-Msg-Id`` in the stream's duplicate window) and PostgreSQL (``ON CONFLICT (id) DO
NOTHING``) get none twice; the other kinds are at least once (a consumer dedupes on the message
id). Every kind whose broker is up takes part; an absent one is left out with a note, or fails
the test under ``HOOKLINE_REQUIRE_SERVICES=1``. Part of the fault suite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from hookline.config import SinkConfig
from tests.conftest import REQUIRE_SERVICES
from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import Reply, ScriptedUpstream
from tests.test_sinks import (
    PORTS,
    Received,
    _amqp,
    _jsonl,
    _listening,
    _mqtt,
    _nats,
    _postgres,
    _redis,
)

pytestmark = pytest.mark.fault

JOBS = 60
EXACTLY_ONCE = {"nats", "postgres"}
FIELDS = ("name", "type", "url", "target", "events", "stream", "maxlen")


def _toml(sink: SinkConfig) -> str:
    values = {k: getattr(sink, k) for k in FIELDS if getattr(sink, k) is not None}
    return "\n[[sinks]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


async def test_serve_killed_mid_run_loses_no_sink_message_and_doubles_none_on_nats_and_postgres(
    tmp_path: Path, upstream: ScriptedUpstream, postgres_url: str
) -> None:
    kinds = [k for k in ("redis", "nats", "amqp", "mqtt") if _listening(PORTS[k])]
    missing = sorted(set(PORTS) - {*kinds, "postgres"})
    if missing:
        if REQUIRE_SERVICES:
            pytest.fail(f"no server for {missing} (HOOKLINE_REQUIRE_SERVICES=1)")
        warnings.warn(f"sink kinds left out, no server: {missing}", stacklevel=1)
    upstream.script("m", Reply(first_token_delay=0.2, chunks=2))
    suffix = uuid.uuid4().hex[:8]
    async with contextlib.AsyncExitStack() as stack:
        readers: dict[str, Any] = {}
        for kind in kinds:
            readers[kind] = await stack.enter_async_context(
                {"redis": _redis, "nats": _nats, "amqp": _amqp, "mqtt": _mqtt}[kind](kind + suffix)
            )
        readers["postgres"] = await stack.enter_async_context(
            _postgres("pg" + suffix, postgres_url)
        )
        readers["jsonl"] = await stack.enter_async_context(_jsonl("f" + suffix, tmp_path / "sinks"))
        # Short leases: what the killed process held is sent again within seconds, not half a minute.
        config = write_config(
            tmp_path / "hookline.toml",
            upstream.base_url,
            max_concurrency=8,
            lease_seconds=3,
            webhook_timeout_seconds=2,
        )
        config.write_text(config.read_text() + "".join(_toml(sink) for sink, _ in readers.values()))
        env = {
            "HOOKLINE_CONFIG": str(config),
            "HOOKLINE_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
        }
        created = await asyncio.to_thread(hookline, "keys", "create", "--tenant", "demo", env=env)
        assert created.returncode == 0, created.stderr
        headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
        serve = GatewayProcess("serve", env, tmp_path)

        async def received() -> dict[str, list[Received]]:
            return {kind: await read() for kind, (_, read) in readers.items()}

        job_ids: list[str] = []
        short = []  # at each kill, how many messages the sinks were still owed in all
        try:
            for _ in range(2):  # killed twice, each time with messages on their way
                await asyncio.to_thread(serve.start)
                async with httpx.AsyncClient(base_url=serve.url, headers=headers) as client:
                    for i in range(JOBS // 2):
                        chat = {"operation": "chat.completions", "model": "m",
                                "input": {"messages": [{"role": "user", "content": str(i)}]}}  # fmt: skip
                        response = await client.post("/v1/jobs", json=chat)
                        assert response.status_code == 202, response.text
                        job_ids.append(response.json()["id"])
                target = 3 * len(job_ids) // 2  # about half of what is due has gone out
                for _ in range(200):
                    if min(map(len, (await received()).values())) >= target:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(serve.kill)
                at_kill = await received()
                short.append(sum(3 * len(job_ids) - len(found) for found in at_kill.values()))
            await asyncio.to_thread(serve.start)
            deadline = asyncio.get_running_loop().time() + 75
            while True:
                got = await received()
                counts = {kind: len({m for m, _, _ in found}) for kind, found in got.items()}
                if all(n >= 3 * JOBS for n in counts.values()):
                    break
                assert asyncio.get_running_loop().time() < deadline, (
                    counts,
                    serve.log.read_text()[-3000:],
                )
                await asyncio.sleep(0.3)
            assert any(n > 0 for n in short), f"killed after everything was sent: {short}"
            await asyncio.sleep(1)  # a late resend would show now
            got = await received()
        finally:
            await asyncio.to_thread(serve.stop)
    for kind, found in got.items():
        per_job: dict[str, list[str]] = {}
        for _, body, _ in found:
            per_job.setdefault(body["data"]["id"], []).append(body["type"])
        assert set(per_job) == set(job_ids), kind
        for job_id, types in per_job.items():
            # Whole and in order per job; a resend after the crash may repeat the last ones.
            assert list(dict.fromkeys(types)) == ["job.queued", "job.started", "job.succeeded"], (
                kind, job_id, types,
            )  # fmt: skip
        doubled = {m: n for m, n in Counter(m for m, _, _ in found).items() if n > 1}
        if kind in EXACTLY_ONCE:
            assert doubled == {}, (kind, doubled)
