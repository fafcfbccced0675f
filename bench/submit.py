"""Submit benchmark: accepted jobs/s and accept latency at 64 concurrent clients, and jobs
completed per second end to end.

Runs, in one go and on this machine's loopback: the bare ceiling (bench/bare_app.py: same HTTP stack,
no storage), then ``hookline api`` on SQLite and on PostgreSQL. Load comes from wrk (C, one thread,
64 connections) so that the load generator takes as little CPU from the server as possible.

End to end (``--completed``): the same load against a whole gateway (one ``hookline serve`` on SQLite;
``hookline api`` + ``hookline worker`` on PostgreSQL) whose upstream (bench/upstream.py) answers at
once: from the first job's submit to the last one's ``job.succeeded``, as the store recorded them,
beside the accept rate of that same run.

    python -m bench.submit [--seconds 10] [--connections 64] [--completed] [--postgres-url URL]

Needs ``wrk`` (``apt-get install wrk``). Prints each run and its ratio to the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

# Ports for the processes a benchmark starts, taken as the test suite takes them: from below the
# kernel's ephemeral range (a port found by binding port 0 could be taken meanwhile).
from tests.scripted_upstream import free_port as free_port

from bench import save_figures

ROOT = Path(__file__).resolve().parent.parent
BODY = {
    "operation": "chat.completions",
    "model": "bench-model",
    "input": {
        "messages": [{"role": "user", "content": "Tell me a short story."}],
        "max_tokens": 64,
    },
}


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up")


def start(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_upstream(tokens: int) -> tuple[subprocess.Popen[bytes], int]:
    """bench/upstream.py as its own process on a free port, ready: (the process, its port)."""
    port = free_port()
    process = start(
        [sys.executable, "-m", "bench.upstream", str(port), str(tokens)],
        {"PYTHONPATH": str(ROOT)},
        ROOT,
    )
    time.sleep(1.5)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def wrk(
    url: str, key: str | None, seconds: int, connections: int, workdir: Path
) -> dict[str, float]:
    script = workdir / "post.lua"
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        headers += f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(BODY))}\n{headers}')
    result = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"{url}/v1/jobs",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = result.stdout
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"{non_2xx.group(1)} requests failed:\n{out}")
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        figures[f"p{pct}_ms"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return figures


async def reset_postgres(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url.replace("postgresql://", "postgres://"))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def run_hookline(
    database_url: str, args: argparse.Namespace, workdir: Path, *, metrics: bool = True
) -> dict[str, float]:
    env = {"HOOKLINE_DATABASE_URL": database_url, "HOOKLINE_LOG_LEVEL": "warning"}
    config = workdir / "bench.toml"
    config.write_text(
        f"local_model = false\n[metrics]\nenabled = {str(metrics).lower()}\n"
        '[[upstreams]]\nname = "bench"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["*"]\n'
    )
    env["HOOKLINE_CONFIG"] = str(config)
    hookline = [sys.executable, "-m", "hookline"]
    subprocess.run(
        [*hookline, "migrate"], env={**os.environ, **env}, check=True, capture_output=True
    )
    key = subprocess.run(
        [*hookline, "keys", "create", "--tenant", "bench"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    port = free_port()
    server = start([*hookline, "api", "--port", str(port)], env, workdir)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz")
        wrk(f"http://127.0.0.1:{port}", key, 2, args.connections, workdir)  # warm-up
        return wrk(f"http://127.0.0.1:{port}", key, args.seconds, args.connections, workdir)
    finally:
        stop(server)


def run_completed(
    database_url: str, args: argparse.Namespace, workdir: Path, upstream_port: int
) -> dict[str, float]:
    """wrk against a whole gateway with an instant upstream, then until every job has finished:
    the accept rate and the completion rate of the same run."""
    config = workdir / "completed.toml"
    config.write_text(
        'local_model = false\n[[upstreams]]\nname = "bench"\n'
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"\nmodels = ["*"]\nmax_concurrency = 256\n'
    )
    env = {
        "HOOKLINE_DATABASE_URL": database_url,
        "HOOKLINE_LOG_LEVEL": "warning",
        "HOOKLINE_CONFIG": str(config),
    }
    hookline = [sys.executable, "-m", "hookline"]
    subprocess.run(
        [*hookline, "migrate"], env={**os.environ, **env}, check=True, capture_output=True
    )
    key = subprocess.run(
        [*hookline, "keys", "create", "--tenant", "bench"],
        env={**os.environ, **env}, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    port = free_port()
    if database_url.startswith("sqlite"):
        servers = [start([*hookline, "serve", "--port", str(port)], env, workdir)]
    else:
        servers = [
            start([*hookline, "api", "--port", str(port), "--no-migrate"], env, workdir),
            start([*hookline, "worker", "--no-migrate"], env, workdir),
        ]
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz")
        accepted = wrk(f"http://127.0.0.1:{port}", key, args.seconds, args.connections, workdir)
        counts = asyncio.run(_wait_finished(database_url))
    finally:
        for server in servers:
            stop(server)
    if counts["failed"]:
        raise RuntimeError(f"{counts['failed']:.0f} jobs failed in the end-to-end run")
    completed = counts["succeeded"] / counts["seconds"]
    return {"accepted_rps": accepted["rps"], "completed_rps": completed, **counts}


async def _wait_finished(database_url: str, timeout: float = 180) -> dict[str, float]:
    """Once no job is queued or running: how many succeeded and failed, and the seconds from the
    first job created to the last one finished."""
    query = (
        "SELECT count(*) FILTER (WHERE status IN ('queued', 'running')),"
        " count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),"
        " min(created_at), max(finished_at) FROM jobs"
    )
    deadline = time.monotonic() + timeout
    while True:
        if database_url.startswith("sqlite"):
            with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
                row = db.execute(query).fetchone()
        else:
            conn = await asyncpg.connect(database_url.replace("postgresql://", "postgres://"))
            try:
                row = tuple(await conn.fetchrow(query))
            finally:
                await conn.close()
        unfinished, succeeded, failed, first, last = row
        if not unfinished:
            return {"succeeded": succeeded, "failed": failed, "seconds": (last - first) / 1000}
        if time.monotonic() > deadline:
            raise RuntimeError(f"{unfinished} jobs still unfinished after {timeout:.0f} s")
        await asyncio.sleep(0.5)


def run_bare(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    server = start(command, {"PYTHONPATH": str(ROOT)}, ROOT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/docs")
        wrk(f"http://127.0.0.1:{port}", None, 2, args.connections, workdir)
        return wrk(f"http://127.0.0.1:{port}", None, args.seconds, args.connections, workdir)
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "HOOKLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; medians reported"
    )
    parser.add_argument(
        "--completed", action="store_true", help="also jobs completed per second, end to end"
    )
    parser.add_argument(
        "--metrics-off", action="store_true",
        help="also each hookline run with [metrics] enabled = false, interleaved (docs/operations.md)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    runs: dict[str, list[dict[str, float]]] = {}
    upstream, upstream_port = start_upstream(1) if args.completed else (None, 0)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # Interleaved rounds: the machine is shared and noisy, so each target sees the same weather.
        for round_no in range(args.rounds):
            runs.setdefault("bare 202 (ceiling)", []).append(run_bare(args, workdir))
            sqlite_file = workdir / f"bench-{round_no}.db"
            runs.setdefault("hookline, SQLite", []).append(
                run_hookline(f"sqlite:///{sqlite_file}", args, workdir)
            )
            if args.metrics_off:
                off = f"sqlite:///{workdir / f'bench-off-{round_no}.db'}"
                runs.setdefault("SQLite, metrics off", []).append(
                    run_hookline(off, args, workdir, metrics=False)
                )
            if not args.skip_postgres:
                url = asyncio.run(reset_postgres(args.postgres_url, "hookline_bench"))
                runs.setdefault("hookline, PostgreSQL", []).append(run_hookline(url, args, workdir))
                if args.metrics_off:
                    url = asyncio.run(reset_postgres(args.postgres_url, "hookline_bench"))
                    runs.setdefault("PostgreSQL, metrics off", []).append(
                        run_hookline(url, args, workdir, metrics=False)
                    )
            if args.completed:
                db = f"sqlite:///{workdir / f'completed-{round_no}.db'}"
                runs.setdefault("end to end, SQLite", []).append(
                    run_completed(db, args, workdir, upstream_port)
                )
                if not args.skip_postgres:
                    url = asyncio.run(reset_postgres(args.postgres_url, "hookline_bench"))
                    runs.setdefault("end to end, PostgreSQL", []).append(
                        run_completed(url, args, workdir, upstream_port)
                    )
    if upstream is not None:
        stop(upstream)
    results = {
        name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for name, rounds in runs.items()
    }
    ceiling = results["bare 202 (ceiling)"]
    print(
        f"\nPOST /v1/jobs, {args.connections} connections, {args.seconds} s per run, median of {args.rounds} interleaved rounds (wrk)\n"
    )
    print(
        f"{'run':<24}{'jobs/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'vs ceiling':>11}{'p99 ratio':>10}"
    )
    for name, r in results.items():
        if "rps" not in r:
            continue
        print(
            f"{name:<24}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
            f"{r['rps'] / ceiling['rps']:>10.0%} {r['p99_ms'] / ceiling['p99_ms']:>9.2f}"
        )
    ends = {name: r for name, r in results.items() if "completed_rps" in r}
    if ends:
        print("\nEnd to end (submit -> job.succeeded, instant upstream), same load\n")
        print(f"{'run':<24}{'accepted/s':>11}{'completed/s':>12}{'ratio':>8}")
        for name, r in ends.items():
            print(
                f"{name:<24}{r['accepted_rps']:>11.0f}{r['completed_rps']:>12.0f}"
                f"{r['completed_rps'] / r['accepted_rps']:>8.0%}"
            )
    if args.json:
        save_figures(args.json, results)


if __name__ == "__main__":
    main()
