"""Fair sharing benchmark: what lanes and tenants' turns cost the claim, and what they buy.

    python -m bench.fairness [--jobs 2000] [--tenants 4] [--rounds 3] [--max-concurrency 16]
                             [--database sqlite|postgresql] [--backlog 600] [--chats 60]

One worker gateway in this process, against bench/upstream.py in its own, on a fresh database
for each run.

Claim throughput: ``--jobs`` jobs are queued first (through the job queue, as the API queues
them), then the worker starts them against an instant upstream (no time to first token, a few
chunks at once), ``--max-concurrency`` at a time. Jobs started per second is read from the
store's own times (the first start to the last), so start-up is not counted. Fair sharing on:
the jobs are spread over ``--tenants`` tenants of weights 3, 2, 1, … and the three lanes, with
``batch_min_share = 0.1``, so every claim plans over many (lane, tenant) queues. The baseline,
in the same run: one tenant, one lane, ``batch_min_share = 0`` (the single line's one ordered
claim). The two alternate, round after round, and the best round of each is kept.

Interactive wait: an upstream that takes 50 ms a call, 4 at a time (80 calls/s); tenant
``bulk`` has ``--backlog`` jobs queued in the batch lane (more than the run drains), and tenant
``chat`` submits ``--chats`` jobs at 20 a second while it drains. The queue wait of a chat job is
its start minus its submission (the store's times). With lanes, the chats are interactive; without,
they are submitted in the batch lane beside the backlog (the tenants still take turns); and as
one line, by the backlog's own tenant in its lane (first come, first served, as before fair
sharing).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import save_figures
from bench.submit import reset_postgres, start_upstream, stop
from hookline.config import Settings, load_settings
from hookline.gateway import Gateway
from hookline.jobs import Job, JobStatus, Lane, Operation
from hookline.queue import SubmitRequest

LANES = (Lane.INTERACTIVE, Lane.DEFAULT, Lane.BATCH)
CALL = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 8}
_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def _settings(
    workdir: Path, database_url: str, upstream_port: int, concurrency: int, fair: dict[str, Any]
) -> Settings:
    tenants = "".join(
        f'[[tenants]]\nname = "{name}"\nweight = {weight}\n'
        for name, weight in fair.get("weights", {}).items()
    )
    path = workdir / "fairness.toml"
    path.write_text(
        f"""local_model = false
log_level = "warning"
[retention]
days = 0
[fairness]
batch_min_share = {fair.get("batch_min_share", 0.0)}
{tenants}
[[upstreams]]
name = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
models = ["*"]
max_concurrency = {concurrency}
"""
    )
    return load_settings(path, database_url=database_url)


_RUNS = itertools.count()


async def _database(args: argparse.Namespace, workdir: Path, run: str) -> str:
    """A fresh, empty database for one run."""
    if args.database == "sqlite":
        return f"sqlite:///{workdir}/{run}-{next(_RUNS)}.db"
    return await reset_postgres(args.postgres_url, "hookline_bench_fairness")


async def _submit(gateway: Gateway, tenant: str, lane: Lane, model: str) -> str:
    request = SubmitRequest(
        operation=Operation.CHAT_COMPLETIONS, input=CALL, model=model, upstream="bench", lane=lane
    )
    job, _ = await gateway.queue.submit(tenant, request)
    return job.id


async def _jobs(gateway: Gateway, tenant: str) -> list[Job]:
    return await gateway.store.list_jobs(tenant, limit=1_000_000)


async def _drained(gateway: Gateway, tenants: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for tenant in tenants:
        while await gateway.store.list_jobs(tenant, statuses=_UNFINISHED, limit=1):
            if time.monotonic() > deadline:
                raise RuntimeError("the jobs did not finish in time")
            await asyncio.sleep(0.1)


async def claim_throughput(
    args: argparse.Namespace, workdir: Path, upstream_port: int, fair: bool
) -> float:
    """Jobs started per second, queued first, by one worker (see the module docstring)."""
    tenants = [f"t{i}" for i in range(args.tenants)] if fair else ["t0"]
    policy: dict[str, Any] = {}
    if fair:
        weights = {t: max(1, 3 - i) for i, t in enumerate(tenants)}
        policy = {"batch_min_share": 0.1, "weights": weights}
    url = await _database(args, workdir, f"throughput-{'fair' if fair else 'single'}")
    settings = _settings(workdir, url, upstream_port, args.max_concurrency, policy)
    queuing = Gateway(settings, run_worker=False, serve_api=False)
    await queuing.start()
    try:
        for first in range(0, args.jobs, 500):
            await asyncio.gather(*(
                _submit(queuing, tenants[k % len(tenants)],
                        LANES[(k // len(tenants)) % 3] if fair else Lane.DEFAULT, "bench")
                for k in range(first, min(args.jobs, first + 500))
            ))  # fmt: skip
    finally:
        await queuing.stop()
    worker = Gateway(settings, serve_api=False)
    await worker.start(migrate=False)
    try:
        await _drained(worker, tenants)
        done = [job for t in tenants for job in await _jobs(worker, t)]
    finally:
        await worker.stop()
    starts = sorted(job.started_at for job in done if job.started_at)
    return (len(starts) - 1) / max((starts[-1] - starts[0]) / 1000, 1e-3)


async def interactive_wait(
    args: argparse.Namespace, workdir: Path, upstream_port: int, mode: str
) -> dict[str, float]:
    """Queue waits (ms) of the chat jobs under the backlog: ``mode`` is ``lanes``, ``same lane``
    or ``one line`` (see the module docstring)."""
    url = await _database(args, workdir, f"wait-{mode.replace(' ', '-')}")
    settings = _settings(workdir, url, upstream_port, 4, {"batch_min_share": 0.1})
    queuing = Gateway(settings, run_worker=False, serve_api=False)
    await queuing.start()
    try:
        for first in range(0, args.backlog, 500):
            count = min(args.backlog, first + 500) - first
            await asyncio.gather(
                *(_submit(queuing, "bulk", Lane.BATCH, "hold0.05") for _ in range(count))
            )
    finally:
        await queuing.stop()
    chat_tenant, chat_lane = {
        "lanes": ("chat", Lane.INTERACTIVE),
        "same lane": ("chat", Lane.BATCH),
        "one line": ("bulk", Lane.BATCH),
    }[mode]
    worker = Gateway(settings, serve_api=False)
    await worker.start(migrate=False)
    try:
        await asyncio.sleep(0.5)  # the backlog is being drained: the upstream is saturated
        ids = []
        for _ in range(args.chats):
            ids.append(await _submit(worker, chat_tenant, chat_lane, "hold0.05"))
            await asyncio.sleep(0.05)
        chats = set(ids)
        queued = await worker.store.list_jobs("bulk", statuses=_UNFINISHED, limit=1_000_000)
        left = len([job for job in queued if job.id not in chats])  # of the backlog
        deadline = time.monotonic() + 300
        while True:
            jobs = [job for job in await _jobs(worker, chat_tenant) if job.id in chats]
            if all(job.started_at for job in jobs) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        await worker.stop()
    waits = sorted(float(job.started_at - job.created_at) for job in jobs if job.started_at)
    if len(waits) < len(ids):
        raise RuntimeError(f"{len(ids) - len(waits)} chat jobs did not start")
    if left == 0:
        print(f"  ({mode}: the backlog ran out before the last chat: raise --backlog)")
    return {
        "p50_ms": statistics.median(waits),
        "p99_ms": waits[min(len(waits) - 1, round(0.99 * (len(waits) - 1)))],
        "max_ms": waits[-1],
    }


async def run(args: argparse.Namespace, upstream_port: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    rates: dict[str, list[float]] = {"single": [], "fair": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for round_ in range(args.rounds):
            order = ("single", "fair") if round_ % 2 == 0 else ("fair", "single")
            for mode in order:
                rate = await claim_throughput(args, workdir, upstream_port, mode == "fair")
                rates[mode].append(rate)
                print(f"round {round_ + 1}, {mode:<6}: {rate:,.0f} jobs started/s", flush=True)
        single, fair = max(rates["single"]), max(rates["fair"])
        print(
            f"claim throughput ({args.database}, {args.jobs} jobs, max_concurrency "
            f"{args.max_concurrency}): fair sharing ({args.tenants} tenants, 3 lanes) "
            f"{fair:,.0f} jobs/s vs single line {single:,.0f} jobs/s = {fair / single:.0%} "
            f"(best of {args.rounds})",
            flush=True,
        )
        figures["throughput"] = {"fair": fair, "single": single, "ratio": fair / single}
        for mode in ("lanes", "same lane", "one line"):
            waits = await interactive_wait(args, workdir, upstream_port, mode)
            figures[f"wait {mode}"] = waits
            print(
                f"interactive queue wait, {mode:<9}: p50 {waits['p50_ms']:,.0f} ms, "
                f"p99 {waits['p99_ms']:,.0f} ms, max {waits['max_ms']:,.0f} ms "
                f"({args.chats} chats under a {args.backlog}-job batch backlog)",
                flush=True,
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--backlog", type=int, default=600)
    parser.add_argument("--chats", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    upstream, upstream_port = start_upstream(args.tokens)
    try:
        figures = asyncio.run(run(args, upstream_port))
    finally:
        stop(upstream)
    if args.json:
        save_figures(args.json, figures)


if __name__ == "__main__":
    main()
