"""Small pure pieces: ids, stream reassembly, Retry-After, configuration, transitions."""

from __future__ import annotations

import email.utils
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hookline.config import load_settings
from hookline.errors import Conflict, InvalidRequest
from hookline.httputil import parse_retry_after
from hookline.ids import has_prefix, new_id
from hookline.jobs import JobStatus, Operation, check_transition
from hookline.queue import JobQueue
from hookline.upstreams.assembly import StreamAssembler
from hookline.upstreams.openai import _parse_lines


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
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=30))
def test_chat_reassembly_concatenates_deltas_exactly(pieces: list[str]) -> None:
    seen: list[tuple[int, str]] = []
    assembler = StreamAssembler(Operation.CHAT_COMPLETIONS, lambda i, t: seen.append((i, t)))
    assembler.feed(chunk("", role="assistant"))
    for piece in pieces:
        assembler.feed(chunk(piece))
    assembler.feed(chunk(finish="stop"))
    result = assembler.result()
    assert result["choices"][0]["message"] == {"role": "assistant", "content": "".join(pieces)}
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


def test_a_read_of_sse_lines_is_parsed_whole_and_stops_at_done_or_an_error() -> None:
    first, second = orjson.dumps(chunk("a")), orjson.dumps(chunk("b"))
    lines = [b": keep-alive", b"event: message", b"data: " + first + b"\r", b"\r", b"data:" + second,
             b"", b"data: [DONE]", b"data: " + first]  # fmt: skip
    chunks, done = _parse_lines(lines)
    assert done and [c["choices"][0]["delta"]["content"] for c in chunks] == ["a", "b"]
    assert _parse_lines([b"data: " + first, b""]) == ([orjson.loads(first)], False)

    error = {"error": {"message": "overloaded", "type": "server_error"}}
    chunks, done = _parse_lines(
        [b"data: " + first, b"data: " + orjson.dumps(error), b"data: " + second]
    )
    assert done and chunks == [orjson.loads(first), error]  # the text before it, then the error


@pytest.mark.parametrize("payload", [b"{", b"", b'{"a": 1}, {"b": 2}', b"1, 2"])
def test_a_data_line_that_is_not_one_json_value_is_refused(payload: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        _parse_lines([b"data: " + orjson.dumps(chunk("a")), b"data: " + payload])
