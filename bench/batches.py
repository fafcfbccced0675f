"""Batch benchmark: items/s, hookline's CPU per item, and memory against the number of items.

    python -m bench.batches [--items 1000,10000] [--max-concurrency 64] [--database sqlite|postgresql]

One ``hookline serve`` (API, worker and batch runner in one process) against bench/upstream.py
(no time to first token, ``--tokens`` chunks at once), ``max_concurrency = 64``. Each batch is
submitted as a streamed JSONL body; the time is from the submit to ``completed``; CPU is the
gateway process's own; memory is its RSS before the submit and at its peak (sampled every 0.2 s).
Memory must not grow with the number of items: the input is streamed into the store and the
result files are written from the store in pages, never held whole.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench import save_figures
from bench.streams import cpu_seconds, rss_mib
from bench.submit import free_port, reset_postgres, start, start_upstream, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def _lines(n: int) -> Iterator[bytes]:
    for i in range(n):
        body = {"model": "bench", "messages": [{"role": "user", "content": f"item {i}"}],
                "max_tokens": 16}  # fmt: skip
        line = {"custom_id": f"item-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": body}  # fmt: skip
        yield (json.dumps(line) + "\n").encode()


def run(
    items: int, database_url: str, upstream_port: int, args: argparse.Namespace
) -> dict[str, float]:
    """One batch of ``items`` through a whole gateway: its figures."""
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "batches.toml"
        config.write_text(
            f"""local_model = false
log_level = "warning"
[batches]
max_lines = {max(items, 50_000)}
[[upstreams]]
name = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
models = ["*"]
max_concurrency = {args.max_concurrency}
"""
        )
        env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": database_url}
        full_env = {**os.environ, **env}
        hookline = [sys.executable, "-m", "hookline"]
        subprocess.run([*hookline, "migrate"], env=full_env, check=True, capture_output=True)
        key = subprocess.run(
            [*hookline, "keys", "create", "--tenant", "bench"],
            env=full_env, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        port = free_port()
        server = start([*hookline, "serve", "--port", str(port)], env, Path(workdir))
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(f"{base}/healthz")
            time.sleep(1)
            idle, cpu_before = rss_mib(server.pid), cpu_seconds(server.pid)
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/jsonl"}
            with httpx.Client(base_url=base, headers=headers, timeout=600) as client:
                started = time.perf_counter()
                batch = client.post("/v1/batches", content=_lines(items)).json()
                accepted = time.perf_counter() - started
                peak = idle
                while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                    time.sleep(0.2)
                    peak = max(peak, rss_mib(server.pid))
                    batch = client.get(f"/v1/batches/{batch['id']}").json()
                elapsed = time.perf_counter() - started
                cpu = cpu_seconds(server.pid) - cpu_before
                counts = batch["request_counts"]
                output = client.get(f"/v1/files/{batch['output_file_id']}/content")
                lines = output.content.count(b"\n")
        finally:
            stop(server)
    print(
        f"{items:>6} items ({database_url.split(':')[0]}): {batch['status']}, "
        f"{counts['completed']} completed, {counts['failed']} failed, {lines} output lines; "
        f"accepted (checked + queued) in {accepted:.2f} s; done in {elapsed:.2f} s = "
        f"{items / elapsed:.0f} items/s; gateway CPU {cpu / items * 1000:.2f} ms/item; "
        f"RSS {idle:.0f} MiB idle, {peak:.0f} MiB peak (+{peak - idle:.0f} MiB)",
        flush=True,
    )
    return {
        "items_per_s": items / elapsed,
        "cpu_ms_per_item": cpu / items * 1000,
        "rss_growth_mib": peak - idle,
        "completed": counts["completed"] / items,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--items", type=lambda s: [int(n) for n in s.split(",")], default=[1000, 10000]
    )
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    figures: dict[str, dict[str, float]] = {}
    upstream, upstream_port = start_upstream(args.tokens)
    try:
        for items in args.items:
            with tempfile.TemporaryDirectory() as data:
                if args.database == "sqlite":
                    url = f"sqlite:///{data}/bench.db"
                else:
                    url = asyncio.run(reset_postgres(args.postgres_url, "hookline_bench_batches"))
                figures[str(items)] = run(items, url, upstream_port, args)
    finally:
        stop(upstream)
    if args.json:
        save_figures(args.json, figures)


if __name__ == "__main__":
    main()
