"""``GET /asyncapi.json``: an AsyncAPI 3.0 document whose every reference resolves, that lists
webhooks, the SSE and WebSocket streams and each configured sink, and never a sink's URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hookline.config import SinkConfig
from tests.conftest import gateway_settings, serve
from tests.scripted_upstream import ScriptedUpstream


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, ref
        node = node[part]
    return node


async def test_the_asyncapi_document_lists_every_channel_and_each_sink(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    secret_url = "redis://:hunter2@127.0.0.1:6379/0"
    sinks = [
        SinkConfig(name="results", type="redis", url=secret_url, target="hookline:results"),
        SinkConfig(
            name="ce",
            type="nats",
            url="nats://127.0.0.1:4222",
            target="a.b",
            envelope="cloudevents",
        ),
    ]
    settings = gateway_settings(f"sqlite:///{tmp_path / 'a.db'}", upstream.base_url, sinks=sinks)
    async with serve(settings, run_worker=False) as live:
        response = await live.client.get("/asyncapi.json", headers={"Authorization": ""})
        assert response.status_code == 200, response.text
        document = response.json()
    assert document["asyncapi"] == "3.0.0"
    assert {"title", "version"} <= set(document["info"])
    channels = document["channels"]
    assert {"webhook", "jobEvents", "tenantEvents", "jobSocket", "sink-results", "sink-ce"} <= set(
        channels
    )
    assert channels["jobEvents"]["address"] == "/v1/jobs/{job_id}/events"
    assert channels["sink-results"]["address"] == "hookline:results"
    assert "webhookBody" in channels["sink-results"]["messages"]
    assert "cloudEvent" in channels["sink-ce"]["messages"]
    assert document["servers"]["sink-ce"]["protocol"] == "nats"
    assert "hunter2" not in response.text and "127.0.0.1:6379" not in response.text
    for name, operation in document["operations"].items():
        assert operation["action"] in ("send", "receive"), name
    for ref in _refs(document):  # every reference resolves inside the document
        _resolve(document, ref)
    for message in document["components"]["messages"].values():
        assert _resolve(document, message["payload"]["$ref"])["type"] == "object"
    for channel in channels.values():  # parameters named in the address, and only those
        address = channel["address"]
        assert {p for p in channel.get("parameters", {})} == {
            part[1:-1] for part in address.replace("/", " ").split() if part.startswith("{")
        }, address
