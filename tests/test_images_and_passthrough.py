"""Image generation (``images.generations``) through the job API, the facade and batches, and
passthrough operations: an upstream's endpoint that hookline does not model, run as a job."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import openai

from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Reply, ScriptedUpstream, Status


async def test_the_openai_sdk_generates_a_slow_image_through_the_facade(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("img-slow", Reply(first_token_delay=2.0))  # an image takes a while
    client = openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=live.api_key, max_retries=0)
    async with client:
        raw = await client.images.with_raw_response.generate(
            model="img-slow", prompt="a lighthouse", n=2, response_format="b64_json"
        )
        images = raw.parse().data
    assert images is not None and len(images) == 2
    assert images[1].b64_json is not None
    assert base64.b64decode(images[1].b64_json) == b"PNG 1: a lighthouse"
    assert images[0].revised_prompt == "a lighthouse"
    # A durable job like any facade call: the answer is its output.
    job = await wait_for_status(live.client, raw.headers["hookline-job-id"], {"succeeded"})
    assert job["operation"] == "images.generations"
    assert job["output"]["data"][0]["b64_json"] == images[0].b64_json
    (sent,) = upstream.seen("img-slow")
    assert sent.body == {"model": "img-slow", "prompt": "a lighthouse", "n": 2,
                         "response_format": "b64_json"}  # fmt: skip


async def test_an_image_job_calls_back_when_ready(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    upstream.script("img-job", Status(503, retry_after="0"), Reply(first_token_delay=0.5))
    body = {
        "operation": "images.generations",
        "model": "img-job",
        "input": {"prompt": "a fox", "response_format": "url"},
    }
    accepted = await live.client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202
    done = await wait_for_status(live.client, accepted.json()["id"], {"succeeded"})
    assert done["attempts"] == 2  # retried as any operation
    assert done["output"]["data"] == [
        {"url": "https://images.example/0.png", "revised_prompt": "a fox"}
    ]
    events = (await live.client.get(f"/v1/jobs/{done['id']}/events")).json()["data"]
    assert not [e for e in events if e["type"] == "job.output.delta"]  # nothing streams
    missing = await live.client.post(
        "/v1/jobs", json={**body, "input": {"n": 1}}
    )  # an image needs a prompt
    assert missing.status_code == 422
    assert "input.prompt" in missing.json()["detail"]


async def test_a_batch_of_images(live: LiveGateway, upstream: ScriptedUpstream) -> None:
    lines = [
        json.dumps(
            {
                "custom_id": f"i{i}",
                "method": "POST",
                "url": "/v1/images/generations",
                "body": {"model": "img", "prompt": f"picture {i}"},
            }
        )
        for i in range(3)
    ]
    client = openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=live.api_key, max_retries=0)
    async with client:
        uploaded = await client.files.create(
            file=("images.jsonl", "\n".join(lines).encode()), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/images/generations",
            completion_window="24h",
        )
        for _ in range(300):
            batch = await client.batches.retrieve(batch.id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                break
            await asyncio.sleep(0.1)
        assert batch.status == "completed", batch
        assert batch.output_file_id is not None
        content = await client.files.content(batch.output_file_id)
    results = [json.loads(line) for line in content.text.splitlines()]
    assert [r["custom_id"] for r in results] == ["i0", "i1", "i2"]
    for i, result in enumerate(results):
        image = result["response"]["body"]["data"][0]
        assert base64.b64decode(image["b64_json"]) == f"PNG 0: picture {i}".encode()


async def test_a_passthrough_operation_the_upstream_declares(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(
        database_url, upstream.base_url, upstream={"operations": ["rerank"]}
    )
    async with serve(settings) as live:
        body: dict[str, Any] = {
            "operation": "rerank",
            "model": "reranker",
            "input": {"query": "q", "documents": ["a", "abc", "ab"], "top_n": 2},
        }
        accepted = await live.client.post("/v1/jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        done = await wait_for_status(live.client, accepted.json()["id"], {"succeeded"})
        assert done["operation"] == "rerank"
        assert [r["index"] for r in done["output"]["results"]] == [1, 2, 0]
        (sent,) = upstream.seen("reranker")
        assert sent.body == {**body["input"], "model": "reranker"}  # as it came
        listed = await live.client.get("/v1/jobs")
        assert listed.json()["data"][0]["operation"] == "rerank"
        # An operation the upstream does not declare, or not a name: refused before it is a job.
        undeclared = await live.client.post("/v1/jobs", json={**body, "operation": "audio.speech"})
        assert undeclared.status_code == 422
        assert "does not run operation 'audio.speech'" in undeclared.json()["detail"]
        bad = await live.client.post("/v1/jobs", json={**body, "operation": "Not An/Operation"})
        assert bad.status_code == 422
