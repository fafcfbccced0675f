"""Small pure pieces: ids, stream reassembly, Retry-After, configuration, transitions, caches."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hookline.config import Settings, UpstreamConfig, load_settings
from hookline.delivery.webhooks.sender import LoadingCache
from hookline.errors import Conflict, InvalidRequest
from hookline.httputil import parse_retry_after
from hookline.ids import has_prefix, new_id
from hookline.jobs import JobStatus, Operation, check_transition
from hookline.live.hub import LiveDelta, LiveHub
from hookline.queue import JobQueue
from hookline.upstreams.assembly import StreamAssembler
from hookline.upstreams.base import UpstreamError
from hookline.upstreams.chunk_stream import ChunkStreamParser
from hookline.upstreams.openai import _after_first_events


def test_ids_are_prefixed_unique_and_increasing() -> None:
    ids = [new_id("job") for _ in range(5000)]
    assert all(has_prefix(i, "job") for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert not has_prefix("job_short", "job") and not has_prefix(ids[0], "evt")


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None,
          tool: dict[str, object] | None = None, index: int = 0) -> dict[str, object]:  # fmt: skip
    delta: dict[str, object] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool:
        delta["tool_calls"] = [tool]
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _without_logprobs(c: dict[str, Any]) -> dict[str, Any]:
    """A chunk as some servers send it, with one key fewer in its choice."""
    choice = {k: v for k, v in c["choices"][0].items() if k != "logprobs"}
    return {**c, "choices": [choice]}


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=30))
def test_chat_reassembly_concatenates_deltas_exactly(pieces: list[str]) -> None:
    seen: list[tuple[int, str]] = []
    assembler = StreamAssembler(Operation.CHAT_COMPLETIONS, lambda i, t: seen.append((i, t)))
    assembler.feed(chunk("", role="assistant"))
    for piece in pieces:
        assembler.feed(chunk(piece))
    assembler.feed(chunk(finish="stop"))
    result = assembler.result()
    assert result["choices"][0]["message"] == {
        "role": "assistant",
        "content": "".join(pieces),
        "refusal": None,
    }  # (OpenAI's schema requires refusal)
    assert "".join(t for _, t in seen) == "".join(pieces)
    assert result["object"] == "chat.completion" and result["choices"][0]["finish_reason"] == "stop"


def test_reassembly_of_tool_calls_several_choices_and_usage() -> None:
    assembler = StreamAssembler(Operation.CHAT_COMPLETIONS, lambda i, t: None)
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_", "arguments": '{"ci'},
    }
    assembler.feed(chunk(role="assistant", tool=call))
    assembler.feed(
        chunk(tool={"index": 0, "function": {"name": "weather", "arguments": 'ty": "Oslo"}'}})
    )
    assembler.feed(chunk("B", index=1, role="assistant"))
    assembler.feed(chunk(finish="tool_calls"))
    assembler.feed(chunk(finish="stop", index=1))
    assembler.feed({"id": "c1", "choices": [], "usage": {"total_tokens": 9}})
    result = assembler.result()
    first, second = result["choices"]
    assert first["message"]["content"] is None
    assert first["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        }
    ]
    assert first["finish_reason"] == "tool_calls"
    assert second["message"]["content"] == "B" and second["index"] == 1
    assert result["usage"] == {"total_tokens": 9}


def test_completion_reassembly() -> None:
    assembler = StreamAssembler(Operation.COMPLETIONS, lambda i, t: None)
    for piece in ("Hel", "lo"):
        assembler.feed(
            {"id": "t", "object": "text_completion", "choices": [{"index": 0, "text": piece}]}
        )
    assembler.feed({"id": "t", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    result = assembler.result()
    assert result["object"] == "text_completion"
    assert result["choices"] == [
        {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}
    ]


def test_retry_after_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)


def test_retry_delay_backs_off_with_jitter_and_honours_retry_after() -> None:
    queue = JobQueue.__new__(JobQueue)
    queue.settings = load_settings(local_model=False)
    delays = [queue.retry_delay(attempt, None) for attempt in (1, 2, 3, 4)]
    for attempt, delay in enumerate(delays, start=1):
        assert 0.8 * 2 ** (attempt - 1) <= delay <= 1.2 * 2 ** (attempt - 1)
    assert queue.retry_delay(1, 42.0) == 42.0
    assert queue.retry_delay(30, None) <= 300 * 1.2


def test_transitions() -> None:
    check_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    check_transition(JobStatus.RUNNING, JobStatus.QUEUED)
    for terminal in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED):
        with pytest.raises(Conflict):
            check_transition(terminal, JobStatus.RUNNING)
    with pytest.raises(Conflict):
        check_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)


def test_config_file_routes_models_by_pattern(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-test")
    config = tmp_path / "hookline.toml"
    config.write_text(
        """
local_model = false
[jobs]
max_attempts = 7
[[upstreams]]
name = "openai"
base_url = "https://example.invalid/v1"
api_key_env = "UPSTREAM_KEY"
models = ["gpt-*", "text-embedding-*"]
[[upstreams]]
name = "vllm"
base_url = "http://127.0.0.1:9000/v1"
"""
    )
    settings = load_settings(config, database_url="sqlite:///x.db")
    assert settings.jobs.max_attempts == 7 and settings.database_url == "sqlite:///x.db"
    assert settings.upstream_for("gpt-4o").name == "openai"
    assert settings.upstream_for("text-embedding-3-small").resolved_api_key() == "sk-test"
    assert settings.upstream_for("llama-3").name == "vllm"


def test_a_copy_with_other_upstreams_routes_over_its_own() -> None:
    first = UpstreamConfig(name="first", base_url="http://127.0.0.1:9001/v1")
    second = UpstreamConfig(name="second", base_url="http://127.0.0.1:9002/v1")
    settings = Settings(local_model=False, upstreams=[first])
    assert settings.upstream_for("m").name == "first"  # routed once: remembered
    copy = settings.model_copy(update={"upstreams": [second]})
    assert copy.upstream_for("m").name == "second"
    assert settings.upstream_for("m").name == "first"
    copy.upstreams = [first, second]
    assert copy.upstream_for("m").name == "first"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[upstreams]]\nname = 'a'\nbase_url = 'http://x'\n[[upstreams]]\nname = 'a'\nbase_url = 'http://y'\n",
            "unique",
        ),
        ("[jobs]\nmax_attempts = 0\n", "max_attempts"),
        ("unknown_key = 1\n", "unknown_key"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(InvalidRequest, match=message):
        load_settings(config)


def parse_all(data: bytes) -> tuple[list[Any], bool]:
    parser = ChunkStreamParser()
    items = parser.feed(data)
    return items + parser.end(), parser.done


def test_sse_lines_are_parsed_up_to_done_or_an_error() -> None:
    first, second = orjson.dumps(chunk("a")), orjson.dumps(chunk("b"))
    data = (b": keep-alive\nevent: message\ndata: " + first + b"\r\n\r\ndata:" + second
            + b"\n\ndata: [DONE]\n\ndata: " + first + b"\n\n")  # fmt: skip
    items, done = parse_all(data)
    assert done and [c["choices"][0]["delta"]["content"] for c in items] == ["a", "b"]
    assert parse_all(b"data: " + first) == ([orjson.loads(first)], False)  # no last newline

    error = {"error": {"message": "overloaded", "type": "server_error"}}
    data = b"".join(b"data: %b\n\n" % orjson.dumps(c) for c in (chunk("a"), error, chunk("b")))
    parser = ChunkStreamParser()
    items = parser.feed(data)
    assert parser.done and items == [chunk("a")] and parser.error == error  # the text before it


@pytest.mark.parametrize("payload", [b"{", b"", b'{"a": 1}, {"b": 2}', b"1, 2"])
def test_a_data_line_that_is_not_one_json_value_is_refused(payload: bytes) -> None:
    with pytest.raises(UpstreamError) as refused:
        parse_all(b"data: " + orjson.dumps(chunk("a")) + b"\ndata: " + payload + b"\n")
    assert refused.value.type == "upstream_bad_response" and refused.value.retryable


def _chunk_lines(chunks: list[dict[str, Any]], spaced: list[bool]) -> bytes:
    # Some servers write JSON with spaces, most without.
    return (
        b"".join(
            b"data: %b\n\n" % (json.dumps(c).encode() if with_spaces else orjson.dumps(c))
            for c, with_spaces in zip(chunks, spaced, strict=True)
        )
        + b"data: [DONE]\n\n"
    )


def _with_delta(c: dict[str, Any], **after_the_text: str) -> dict[str, Any]:
    choice = c["choices"][0]
    return {**c, "choices": [{**choice, "delta": {**choice["delta"], **after_the_text}}]}


_texts = st.text(alphabet=st.sampled_from('ab "\\/\n\t\u00e9\u2603{}:,'), max_size=6)
_chat_chunks = st.one_of(
    _texts.map(lambda t: chunk(t)),
    _texts.map(lambda t: _without_logprobs(chunk(t))),
    _texts.map(lambda t: {**chunk(t), "model": None}),  # a header value left out
    _texts.map(lambda t: chunk(t, index=1)),
    _texts.map(lambda t: chunk(t, role="assistant")),
    _texts.map(lambda t: {**chunk(t), "created": 2}),
    _texts.map(lambda t: _with_delta(chunk(t), role="assistant")),  # the role after the text
    _texts.map(lambda t: _with_delta(chunk(t), refusal="no")),
    _texts.map(lambda t: {**chunk(t), "usage": {"total_tokens": 3}}),
    st.just(chunk(tool={"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}})),
    st.just(chunk(finish="stop")),
)


@settings(max_examples=400)
@given(
    chunks=st.lists(_chat_chunks, min_size=1, max_size=25),
    spaced=st.data(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_reading_in_any_pieces_assembles_what_each_chunk_parsed_alone_does(
    chunks: list[dict[str, Any]], spaced: st.DataObject, cuts: list[int]
) -> None:
    flags = spaced.draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    data = _chunk_lines(chunks, flags)
    expected = StreamAssembler(Operation.CHAT_COMPLETIONS, lambda i, t: None)
    for c in chunks:
        expected.feed(c)
    deltas: dict[int, list[str]] = {}
    got = StreamAssembler(
        Operation.CHAT_COMPLETIONS, lambda i, t: deltas.setdefault(i, []).append(t)
    )
    parser = ChunkStreamParser()
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        got.feed(*parser.feed(data[start:end]))
    got.feed(*parser.end())
    assert parser.done
    assert got.result() == expected.result()
    for choice in got.result()["choices"]:
        assert "".join(deltas.get(choice["index"], [])) == (choice["message"]["content"] or "")


def test_a_first_read_is_split_after_its_first_two_events_only_when_more_follow() -> None:
    one, two, three = b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"
    assert _after_first_events(one + two + three) == len(one + two)
    assert _after_first_events(one + two) == 0  # nothing after them: no split
    assert _after_first_events(one + two[:5]) == 0  # the second is still arriving
    assert _after_first_events(one.replace(b"\n", b"\r\n") * 3) == 0  # CRLF: read whole


async def test_a_subscription_waits_its_whole_timeout_and_wakes_at_a_message() -> None:
    hub = LiveHub()
    subscription = hub.watch_job("job_1")[0]
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await subscription.wait(0.05)  # nothing came
    assert loop.time() - started >= 0.05
    # A message ends a wait at once...
    loop.call_later(0.01, subscription.put, LiveDelta("job_1", "t", 1, 0, 0, "hi"))
    started = loop.time()
    assert await subscription.wait(0.1)
    assert loop.time() - started < 0.1
    assert [m.text for m in subscription.drain() if isinstance(m, LiveDelta)] == ["hi"]
    # ... and the next, longer wait is not cut short by the timer that one left behind,
    started = loop.time()
    assert not await subscription.wait(0.3)
    assert loop.time() - started >= 0.3
    # nor is a shorter wait made to wait for the timer of a longer one before it.
    loop.call_later(0.01, subscription.put, LiveDelta("job_1", "t", 1, 0, 2, "!"))
    assert await subscription.wait(30)
    subscription.drain()
    started = loop.time()
    assert not await subscription.wait(0.05)
    assert loop.time() - started < 1
    subscription.close()


async def test_a_load_that_was_cancelled_is_loaded_again() -> None:
    cache = LoadingCache[str, str](60)
    go_on, ended = asyncio.Event(), asyncio.Event()

    async def cancelled_load() -> str:
        try:
            await go_on.wait()
            raise asyncio.CancelledError  # as a read does when its database closes under it
        finally:
            ended.set()

    caller = asyncio.create_task(cache.get("k", cancelled_load))
    await asyncio.sleep(0)
    caller.cancel()  # the caller leaves; the load goes on for whoever asks next
    with pytest.raises(asyncio.CancelledError):
        await caller
    go_on.set()
    await ended.wait()

    async def load() -> str:
        return "loaded"

    assert cache.peek("k") is None
    assert await cache.get("k", load) == "loaded"
    assert cache.peek("k") == "loaded"


def test_every_key_has_an_environment_twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/configuration.md's example variables, as written, over a file: the environment wins
    key by key, a flag wins over both, and a misspelt key in a section is an error."""
    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    block = page.split("test_every_key_has_an_environment_twin -->\n```bash\n")[1]
    for line in block.split("```")[0].splitlines():
        name, _, value = line.removeprefix("export ").split("#")[0].strip().partition("=")
        monkeypatch.setenv(name, value.strip("'"))
    monkeypatch.setenv("HOOKLINE_PORT", "9100")
    config = tmp_path / "hookline.toml"
    config.write_text("port = 9000\n[webhooks]\ntimeout_seconds = 7\nmax_in_flight = 12\n")
    settings = load_settings(config)
    assert settings.port == 9100
    assert settings.webhooks.timeout_seconds == 5  # the environment over the file
    assert settings.webhooks.max_in_flight == 12  # the file's other keys kept
    assert settings.webhooks.allowed_networks == ["10.0.0.0/8"]
    assert settings.fairness.tenant_defaults.weight == 2
    assert (settings.upstreams[0].name, settings.upstreams[0].base_url) == (
        "vllm",
        "http://10.0.0.5:8000/v1",
    )
    assert load_settings(config, port=9200).port == 9200  # a flag over both
    monkeypatch.setenv("HOOKLINE_WEBHOOKS__TYPO", "1")
    with pytest.raises(InvalidRequest, match="typo"):
        load_settings(config)
    monkeypatch.delenv("HOOKLINE_WEBHOOKS__TYPO")
    monkeypatch.setenv("HOOKLINE_UPSTREAMS", "[not json")
    with pytest.raises(InvalidRequest, match="environment"):
        load_settings(config)
