"""Streaming benchmark: what the OpenAI facade adds to a streamed completion, and what 1,000 SSE
subscribers cost.

    python -m bench.streams [--streams 300] [--anthropic 50] [--spaced 100] [--subscribers 1000]
                            [--rounds 3] [--metrics-off]

A fast upstream (``bench.upstream``, its own process) streams 200 tokens at once. In the same run,
interleaved, the client streams chat completions from it directly and through ``hookline serve``
(its own process, SQLite, every call a durable job), at one stream at a time (c=1) and 100 at a
time (c=100). Reported: time to first token (TTFT) and total stream time, p50/p99, direct and
through hookline, the overhead between them, streams/s, and hookline's CPU per relayed chunk.
The same at c=1 for an Anthropic stream: the client streams Anthropic's Messages API from the
upstream directly and through hookline's ``/v1/messages``, which runs it on an ``anthropic``
upstream (both ways translated, every call a durable job).
Then 100 streams at once from a model that sends a token every 50 ms, as real models do (each
read carries one token): hookline's CPU per relayed token. Then 1,000 SSE subscribers watch one
running job on the same process: its memory per subscriber, and whether every subscriber got the
whole output. With ``--metrics-off``, a second ``hookline serve`` with metrics disabled runs the
c=100 streams in each round too: what the metrics cost a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import save_figures
from bench.submit import free_port, start, stop, wait_ready

TOKENS = 200
EXPECTED = "".join(f"t{i} " for i in range(TOKENS))  # what bench.upstream streams
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "go"}], "stream": True}
MESSAGES = {"model": "claude-bench", "max_tokens": 1024, "stream": True,
            "messages": [{"role": "user", "content": "go"}]}  # fmt: skip
ANTHROPIC_DIRECT = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}
LITELLM = {"ttft_ms_c1": 14.0, "cpu_ms_per_chunk": 0.7, "streams_per_s_c100": 7.0}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any] = CHAT
) -> tuple[float, float, str]:
    """(TTFT s, total s, the content) of one streamed chat completion."""
    started = time.perf_counter()
    first: float | None = None
    content: list[str] = []
    async with session.post(url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                if first is None:
                    first = time.perf_counter()
                choices = orjson.loads(line[6:])["choices"]
                content.append(choices[0]["delta"].get("content") or "")
            elif line.startswith(b"data: [DONE]"):
                break
    assert first is not None, "no content arrived"
    return first - started, time.perf_counter() - started, "".join(content)


async def one_message_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[float, float, str]:
    """(TTFT s, total s, the text) of one streamed Anthropic message."""
    started = time.perf_counter()
    first: float | None = None
    content: list[str] = []
    async with session.post(url, json=MESSAGES, headers=headers) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: ") and b"text_delta" in line:
                if first is None:
                    first = time.perf_counter()
                content.append(orjson.loads(line[6:])["delta"]["text"])
            elif line.startswith(b"data: ") and b"message_stop" in line:
                break
    assert first is not None, "no text arrived"
    return first - started, time.perf_counter() - started, "".join(content)


OneStream = Callable[
    [aiohttp.ClientSession, str, dict[str, str]], Awaitable[tuple[float, float, str]]
]


async def run_streams(
    url: str, headers: dict[str, str], n: int, concurrency: int, one: OneStream = one_stream
) -> tuple[list[float], list[float], float]:
    """TTFTs, totals (s), and streams/s for ``n`` streams, ``concurrency`` at a time (``one``:
    how one stream is read, OpenAI's chunks by default)."""
    ttfts: list[float] = []
    totals: list[float] = []
    queue = list(range(n))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def runner() -> None:
            while queue:
                queue.pop()
                ttft, total, content = await one(session, url, headers)
                assert content == EXPECTED, f"{len(content)} characters, wanted {len(EXPECTED)}"
                ttfts.append(ttft)
                totals.append(total)

        started = time.perf_counter()
        await asyncio.gather(*(runner() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return ttfts, totals, n / elapsed


async def spaced(url: str, headers: dict[str, str], pid: int, count: int) -> tuple[float, int]:
    """``count`` streams at once from the upstream's "slow" model, a token every 50 ms as a real
    model sends them (so each read carries one token, not a burst): hookline's CPU per relayed
    token (µs), and how many streams got the whole output."""
    body = {**CHAT, "model": "slow"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        cpu = cpu_seconds(pid)
        streams = await asyncio.gather(
            *(one_stream(session, url, headers, body) for _ in range(count))
        )
        used = cpu_seconds(pid) - cpu
    return used / (count * TOKENS) * 1e6, sum(content == EXPECTED for *_, content in streams)


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def subscribers(base: str, headers: dict[str, str], pid: int, count: int) -> dict[str, float]:
    """``count`` SSE subscribers on one running job: memory per subscriber; all complete?"""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        body = {**CHAT, "model": "slow", "stream": False}
        async with session.post(
            f"{base}/v1/chat/completions", json=body, headers={**headers, "Prefer": "respond-async"}
        ) as response:
            job = await response.json()
        await asyncio.sleep(0.5)
        before = rss_mib(pid)
        connected = 0
        all_connected = asyncio.Event()

        async def watch() -> str:
            nonlocal connected
            text: list[str] = []
            sse = {**headers, "Accept": "text/event-stream"}
            async with session.get(f"{base}/v1/jobs/{job['id']}/events", headers=sse) as response:
                counted = False
                async for line in response.content:
                    if not counted:
                        counted = True
                        connected += 1
                        if connected == count:
                            all_connected.set()
                    if line.startswith(b"data: "):
                        event = orjson.loads(line[6:])
                        if event["type"] == "job.output.delta":
                            text.append(event["data"]["text"])
            return "".join(text)

        tasks = [asyncio.create_task(watch()) for _ in range(count)]
        await asyncio.wait_for(all_connected.wait(), 60)
        await asyncio.sleep(0.5)
        during = rss_mib(pid)
        outputs = await asyncio.gather(*tasks)
    complete = sum(output == EXPECTED for output in outputs)
    return {
        "rss_before_mib": before,
        "rss_during_mib": during,
        "kib_per_subscriber": (during - before) * 1024 / count,
        "complete": complete,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=300, help="streams per c=100 run")
    parser.add_argument("--single", type=int, default=50, help="streams per c=1 run")
    parser.add_argument(
        "--anthropic", type=int, default=50, help="Anthropic streams per c=1 run (0: none)"
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument(
        "--spaced", type=int, default=100, help="streams at once with a token every 50 ms"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--metrics-off", action="store_true",
        help="also a second hookline with [metrics] enabled = false, its c=100 streams "
        "interleaved with the first's (docs/operations.md)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", str(upstream_port)])
    servers: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            on = _serve(workdir / "on", upstream_port, metrics=True)
            servers.append(on[0])
            off = (
                _serve(workdir / "off", upstream_port, metrics=False) if args.metrics_off else None
            )
            if off is not None:
                servers.append(off[0])
            report(args, on[0].pid, upstream_port, on[1], on[2], off[1:] if off else None)
        finally:
            for server in servers:
                stop(server)
            upstream.terminate()
            upstream.wait(10)


def _serve(
    workdir: Path, upstream_port: int, *, metrics: bool
) -> tuple[subprocess.Popen[bytes], int, str]:
    """``hookline serve`` on SQLite in ``workdir``, ready: its process, port and an API key."""
    workdir.mkdir()
    port = free_port()
    config = workdir / "bench.toml"
    config.write_text(
        "local_model = false\n"
        f"[metrics]\nenabled = {'true' if metrics else 'false'}\n"
        "[[upstreams]]\n"
        'name = "claude"\n'
        'type = "anthropic"\n'
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        'models = ["claude-*"]\n'
        "max_concurrency = 200\n"
        "[[upstreams]]\n"
        'name = "bench"\n'
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        'models = ["*"]\n'
        "max_concurrency = 200\n"
    )
    env = {
        "HOOKLINE_CONFIG": str(config),
        "HOOKLINE_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
        "HOOKLINE_LOG_LEVEL": "warning",
    }
    hookline = [sys.executable, "-m", "hookline"]
    subprocess.run([*hookline, "migrate"], env={**os.environ, **env}, check=True)
    key = subprocess.run(
        [*hookline, "keys", "create", "--tenant", "bench"],
        env={**os.environ, **env}, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    server = start([*hookline, "serve", "--port", str(port)], env, workdir)
    wait_ready(f"http://127.0.0.1:{port}/healthz")
    return server, port, key


def report(
    args: argparse.Namespace,
    pid: int,
    upstream_port: int,
    hookline_port: int,
    key: str,
    metrics_off: tuple[int, str] | None = None,
) -> None:
    """``metrics_off``: the port and key of a second hookline with metrics disabled."""
    direct = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    direct_messages = f"http://127.0.0.1:{upstream_port}/v1/messages"
    base = f"http://127.0.0.1:{hookline_port}"
    via = f"{base}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {key}"}
    via_messages = f"{base}/v1/messages"
    asyncio.run(run_streams(via, auth, 20, 10))  # warm-up
    if metrics_off is not None:
        via_off = f"http://127.0.0.1:{metrics_off[0]}/v1/chat/completions"
        auth_off = {"Authorization": f"Bearer {metrics_off[1]}"}
        asyncio.run(run_streams(via_off, auth_off, 20, 10))
    if args.anthropic:
        asyncio.run(run_streams(via_messages, auth, 10, 1, one_message_stream))
    results: dict[str, list[tuple[list[float], list[float], float]]] = {}
    cpu_per_chunk: list[float] = []
    for _ in range(args.rounds):  # interleaved: the machine is shared and noisy
        for c, n in ((1, args.single), (100, args.streams)):
            results.setdefault(f"direct c={c}", []).append(
                asyncio.run(run_streams(direct, {}, n, c))
            )
            cpu = cpu_seconds(pid)
            results.setdefault(f"hookline c={c}", []).append(
                asyncio.run(run_streams(via, auth, n, c))
            )
            if c == 100:
                cpu_per_chunk.append((cpu_seconds(pid) - cpu) / (n * TOKENS) * 1000)
            if c == 100 and metrics_off is not None:
                results.setdefault("metrics off c=100", []).append(
                    asyncio.run(run_streams(via_off, auth_off, n, c))
                )
        if args.anthropic:  # an Anthropic stream, direct and through /v1/messages, same round
            results.setdefault("anthropic direct c=1", []).append(
                asyncio.run(
                    run_streams(
                        direct_messages, ANTHROPIC_DIRECT, args.anthropic, 1, one_message_stream
                    )
                )
            )
            results.setdefault("anthropic hookline c=1", []).append(
                asyncio.run(run_streams(via_messages, auth, args.anthropic, 1, one_message_stream))
            )

    def median_of(name: str, pick: int, q: float) -> float:
        return statistics.median(p(run[pick], q) for run in results[name])  # type: ignore[arg-type]

    print(f"\nStreamed chat completions, {TOKENS} tokens at once from the upstream, "
          f"median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print(
        f"{'run':<24}{'TTFT p50':>10}{'TTFT p99':>10}{'total p50':>11}{'total p99':>11}{'streams/s':>11}"
    )
    for name in results:
        rate = statistics.median(run[2] for run in results[name])
        print(f"{name:<24}{median_of(name, 0, 0.5):>9.1f}ms{median_of(name, 0, 0.99):>8.1f}ms"
              f"{median_of(name, 1, 0.5):>9.1f}ms{median_of(name, 1, 0.99):>9.1f}ms{rate:>11.1f}")  # fmt: skip
    print("\nhookline's overhead (through hookline minus direct, same round)\n")
    figures: dict[str, float] = {}
    for c in (1, 100):
        ttft50 = median_of(f"hookline c={c}", 0, 0.5) - median_of(f"direct c={c}", 0, 0.5)
        ttft99 = median_of(f"hookline c={c}", 0, 0.99) - median_of(f"direct c={c}", 0, 0.99)
        ratio = median_of(f"hookline c={c}", 1, 0.5) / median_of(f"direct c={c}", 1, 0.5)
        figures |= {
            f"ttft_overhead_p50_ms_c{c}": ttft50,
            f"ttft_overhead_p99_ms_c{c}": ttft99,
            f"direct_ttft_p50_ms_c{c}": median_of(f"direct c={c}", 0, 0.5),
            f"total_ratio_c{c}": ratio,
        }
        print(
            f"c={c:<4} TTFT +{ttft50:.1f} ms p50, +{ttft99:.1f} ms p99; total stream time {ratio:.2f}x direct"
        )
    if args.anthropic:
        direct50 = median_of("anthropic direct c=1", 0, 0.5)
        ttft50 = median_of("anthropic hookline c=1", 0, 0.5) - direct50
        ttft99 = median_of("anthropic hookline c=1", 0, 0.99) - median_of(
            "anthropic direct c=1", 0, 0.99
        )
        figures |= {
            "anthropic_ttft_overhead_p50_ms_c1": ttft50,
            "anthropic_ttft_overhead_p99_ms_c1": ttft99,
            "anthropic_direct_ttft_p50_ms_c1": direct50,
        }
        print(f"Anthropic stream (/v1/messages), c=1: TTFT +{ttft50:.1f} ms p50, "
              f"+{ttft99:.1f} ms p99")  # fmt: skip
    if metrics_off is not None:
        on_off = median_of("hookline c=100", 1, 0.5) / median_of("metrics off c=100", 1, 0.5)
        figures["metrics_on_vs_off_c100"] = on_off
        print(f"c=100 with metrics on vs off: total stream time p50 {on_off:.3f}x")
    rate100 = statistics.median(run[2] for run in results["hookline c=100"])
    cpu = statistics.median(cpu_per_chunk)
    figures |= {"streams_per_s_c100": rate100, "cpu_ms_per_chunk": cpu}
    print(
        f"\nhookline CPU per relayed chunk: {cpu:.3f} ms (LiteLLM, as reported: {LITELLM['cpu_ms_per_chunk']} ms)"
    )
    print(f"streams/s at c=100: {rate100:.1f} (LiteLLM, as reported: {LITELLM['streams_per_s_c100']:g}; "
          f"{rate100 / LITELLM['streams_per_s_c100']:.0f}x)")  # fmt: skip
    if args.spaced:
        per_token, complete = asyncio.run(spaced(via, auth, pid, args.spaced))
        figures |= {"cpu_us_per_spaced_token": per_token, "spaced_complete": complete / args.spaced}
        print(f"\n{args.spaced} streams at once, a token every 50 ms: hookline CPU per relayed "
              f"token {per_token:.0f} µs (LiteLLM, as reported: {LITELLM['cpu_ms_per_chunk'] * 1000:.0f} µs "
              f"per chunk); {complete} of {args.spaced} got the whole output")  # fmt: skip
    if args.subscribers:
        subs = asyncio.run(subscribers(base, auth, pid, args.subscribers))
        figures |= {
            "kib_per_subscriber": subs["kib_per_subscriber"],
            "subscribers_complete": subs["complete"] / args.subscribers,
        }
        _print_subscribers(args, subs)
    if args.json:
        save_figures(args.json, figures)


def _print_subscribers(args: argparse.Namespace, subs: dict[str, float]) -> None:
    print(f"\n{args.subscribers} SSE subscribers on one running job, one process: RSS "
          f"{subs['rss_before_mib']:.0f} -> {subs['rss_during_mib']:.0f} MiB, "
          f"{subs['kib_per_subscriber']:.1f} KiB per subscriber; "
          f"{subs['complete']:.0f} of {args.subscribers} got the whole output")  # fmt: skip


if __name__ == "__main__":
    main()
