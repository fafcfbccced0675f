"""Scale-out benchmark on PostgreSQL: jobs completed per second with 1, 2 and 4 worker processes,
and how many jobs one worker process holds in flight, with its memory per in-flight job.

    python -m bench.scaleout [--jobs 3000] [--workers 1,2,4] [--inflight 10000] [--hold 30]
                             [--postgres-url postgresql://postgres@127.0.0.1:5432/test]

Throughput: the jobs are queued first, then the workers start against bench/upstream.py (no time
to first token, ``--tokens`` chunks at once); jobs/s is measured from the store's own times (the
first job started to the last finished), so process start-up is not counted. The scaling is each
run's rate over the 1-worker rate of the same run (this machine has 2 cores: 4 workers share
them with PostgreSQL and the upstream).

In flight: one worker process with ``max_concurrency = --inflight`` against an upstream that holds
each request ``--hold`` seconds before answering; its memory is read before the jobs arrive and
while all of them are in flight: (peak - idle) / jobs is the memory per in-flight job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench import save_figures
from bench.streams import cpu_seconds, rss_mib
from bench.submit import reset_postgres, start, start_upstream, stop
from hookline.config import load_settings
from hookline.gateway import Gateway
from hookline.jobs import Operation
from hookline.queue import SubmitRequest

ROOT = Path(__file__).resolve().parent.parent


def _config(workdir: Path, upstream_port: int, max_concurrency: int, lease: float) -> Path:
    path = workdir / "scaleout.toml"
    path.write_text(
        f"""local_model = false
log_level = "warning"
[worker]
lease_seconds = {lease}
heartbeat_seconds = {lease / 3}
[retention]
days = 0
[[upstreams]]
name = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
models = ["*"]
max_concurrency = {max_concurrency}
"""
    )
    return path


async def _queue_jobs(database_url: str, config: Path, model: str, n: int) -> None:
    """Accept ``n`` jobs through the job queue (as the API does), many at once."""
    settings = load_settings(config, database_url=database_url)
    gateway = Gateway(settings, run_worker=False, serve_api=False)
    await gateway.start()
    try:
        request = SubmitRequest(
            operation=Operation.CHAT_COMPLETIONS,
            input={"messages": [{"role": "user", "content": "go"}]},
            model=model,
            upstream="bench",
        )
        for first in range(0, n, 500):
            batch = range(first, min(n, first + 500))
            await asyncio.gather(*(gateway.queue.submit("bench", request) for _ in batch))
    finally:
        await gateway.stop()


_START_DELAY = 6.0


async def _hold_jobs(database_url: str, seconds: float) -> None:
    """Make the queued jobs runnable only ``seconds`` from now."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        await conn.execute("UPDATE jobs SET run_after = $1", int((time.time() + seconds) * 1000))
    finally:
        await conn.close()


async def _count(database_url: str, status: str) -> int:
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE status = $1", status))
    finally:
        await conn.close()


async def _span(database_url: str) -> tuple[float, int]:
    """(seconds from the first job started to the last finished, jobs that ran twice)."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        first, last = await conn.fetchrow("SELECT min(started_at), max(finished_at) FROM jobs")
        twice = await conn.fetchval("SELECT count(*) FROM jobs WHERE attempts > 1")
        return (last - first) / 1000, int(twice)
    finally:
        await conn.close()


def _postgres_cpu() -> float:
    """CPU seconds used so far by this machine's PostgreSQL server processes."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _prepare(admin_url: str, name: str, config: Path) -> str:
    url = asyncio.run(reset_postgres(admin_url, name))
    hookline = [sys.executable, "-m", "hookline"]
    env = {**os.environ, "HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": url}
    subprocess.run([*hookline, "migrate"], env=env, check=True, capture_output=True)
    return url


def throughput(
    args: argparse.Namespace, workdir: Path, upstream_port: int, upstream_pid: int
) -> dict[int, float]:
    config = _config(workdir, upstream_port, args.max_concurrency, 30)
    rates: dict[int, float] = {}
    for workers in args.workers:
        url = _prepare(args.postgres_url, "hookline_bench_scaleout", config)
        asyncio.run(_queue_jobs(url, config, "bench", args.jobs))
        asyncio.run(_hold_jobs(url, _START_DELAY))
        env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": url}
        processes = [
            start([sys.executable, "-m", "hookline", "worker", "--no-migrate"], env, ROOT)
            for _ in range(workers)
        ]
        worker_cpu = 0.0
        try:
            # The jobs become runnable only once the workers have started: their start-up is
            # neither timed nor counted in the CPU per job.
            time.sleep(_START_DELAY - 1)
            started_cpu = sum(cpu_seconds(process.pid) for process in processes)
            database_cpu, upstream_cpu = _postgres_cpu(), cpu_seconds(upstream_pid)
            deadline = time.monotonic() + 600
            while asyncio.run(_count(url, "succeeded")) < args.jobs:
                if time.monotonic() > deadline:
                    raise RuntimeError("the jobs did not finish in 10 minutes")
                time.sleep(0.2)
            worker_cpu = sum(cpu_seconds(process.pid) for process in processes) - started_cpu
            database_cpu = _postgres_cpu() - database_cpu
            upstream_cpu = cpu_seconds(upstream_pid) - upstream_cpu
        finally:
            for process in processes:
                stop(process)
        seconds, twice = asyncio.run(_span(url))
        rates[workers] = args.jobs / seconds
        base = rates[args.workers[0]]
        print(
            f"{workers} worker process(es): {args.jobs} jobs in {seconds:.2f} s = "
            f"{rates[workers]:.0f} jobs/s ({rates[workers] / base:.2f}x the "
            f"{args.workers[0]}-worker run); jobs run twice: {twice}; CPU per job: workers "
            f"{worker_cpu / args.jobs * 1000:.2f} ms, PostgreSQL "
            f"{database_cpu / args.jobs * 1000:.2f} ms, upstream {upstream_cpu / args.jobs * 1000:.2f} ms; "
            f"cores busy: {(worker_cpu + database_cpu + upstream_cpu) / seconds:.2f} of {os.cpu_count()}",
            flush=True,
        )
    return rates


def in_flight(args: argparse.Namespace, workdir: Path, upstream_port: int) -> float:
    """One worker holding ``--inflight`` jobs at once: its KB per in-flight job."""
    config = _config(workdir, upstream_port, args.inflight, 120)
    url = _prepare(args.postgres_url, "hookline_bench_inflight", config)
    env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": url}
    worker = start([sys.executable, "-m", "hookline", "worker", "--no-migrate"], env, ROOT)
    try:
        time.sleep(5)  # started and idle
        idle = rss_mib(worker.pid)
        started = time.monotonic()
        asyncio.run(_queue_jobs(url, config, f"hold{args.hold}", args.inflight))
        peak, running, all_in_flight = idle, 0, None
        while True:
            peak = max(peak, rss_mib(worker.pid))
            running = asyncio.run(_count(url, "running"))
            if running == args.inflight and all_in_flight is None:
                all_in_flight = time.monotonic() - started
            succeeded = asyncio.run(_count(url, "succeeded"))
            if succeeded == args.inflight:
                break
            if time.monotonic() - started > args.hold + 300:
                raise RuntimeError(f"only {succeeded} of {args.inflight} jobs finished")
            time.sleep(0.5)
        total = time.monotonic() - started
    finally:
        stop(worker)
    per_job_kb = float(peak - idle) * 1024 / args.inflight
    reached = f"{all_in_flight:.1f} s after the first submit" if all_in_flight else "never at once"
    print(
        f"in flight: {args.inflight} jobs held {args.hold} s each by one worker process: all "
        f"running {reached}; all {args.inflight} succeeded after {total:.1f} s; worker RSS "
        f"{idle:.0f} MiB idle, {peak:.0f} MiB peak: {per_job_kb:.1f} KB per in-flight job "
        "(target: under 50 KB)",
        flush=True,
    )
    return float(per_job_kb)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument(
        "--workers", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4]
    )
    parser.add_argument("--inflight", type=int, default=10_000)
    parser.add_argument("--hold", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    upstream, upstream_port = start_upstream(args.tokens)
    figures: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            if args.jobs:
                rates = throughput(args, Path(workdir), upstream_port, upstream.pid)
                figures |= {f"jobs_per_s_{workers}_workers": r for workers, r in rates.items()}
            if args.inflight:
                figures["kb_per_inflight_job"] = in_flight(args, Path(workdir), upstream_port)
    finally:
        stop(upstream)
    if args.json:
        save_figures(args.json, figures)


if __name__ == "__main__":
    main()
