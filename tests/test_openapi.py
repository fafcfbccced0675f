"""The OpenAPI spec's shape (hookline.api.openapi): every error documented as a problem, the key
as a bearer scheme, real request bodies, references that resolve; and the answers it describes
that the fuzz test (test_fuzz.py) found wrong once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hookline.api import create_app
from hookline.config import Settings
from hookline.gateway import Gateway
from tests.conftest import LiveGateway

PROBLEM = "application/problem+json"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    built: dict[str, Any] = create_app(Gateway(Settings(local_model=False))).openapi()
    return built


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, child in value.items():
            if key == "$ref":
                yield child
            else:
                yield from refs(child)
    elif isinstance(value, list):
        for child in value:
            yield from refs(child)


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves(spec: dict[str, Any]) -> None:
    found = set(refs(spec))
    assert "#/components/schemas/WebhookSpec" in found
    for ref in found:
        assert isinstance(resolve(spec, ref), dict), ref
    assert "$defs" not in json.dumps(spec)


def test_every_error_is_a_problem_and_none_is_a_500(spec: dict[str, Any]) -> None:
    for path, method, operation in operations(spec):
        responses = operation["responses"]
        assert "500" not in responses and "5XX" not in responses, (method, path)
        for status, response in responses.items():
            if status[0] not in "45":
                continue
            content = response["content"]
            assert list(content) == [PROBLEM], (method, path, status)
            schema = content[PROBLEM]["schema"]
            assert "#/components/schemas/Problem" in set(refs(schema)), (method, path, status)
            assert response["description"], (method, path, status)
    problem = spec["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    assert {"errors", "error", "job"} <= set(problem["properties"])
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_each_operation_lists_the_statuses_its_layers_answer(spec: dict[str, Any]) -> None:
    for path, method, operation in operations(spec):
        statuses = set(operation["responses"])
        assert {"400", "408", "413", "431"} <= statuses, (method, path)  # the HTTP layer's
        if path.startswith("/v1/"):
            assert {"401", "503"} <= statuses, (method, path)
        if "{" in path:
            assert "404" in statuses, (method, path)
        if "application/json" in operation.get("requestBody", {}).get("content", {}):
            assert {"415", "422"} <= statuses, (method, path)
    paths = spec["paths"]
    assert "409" in paths["/v1/jobs"]["post"]["responses"]
    assert "503" in paths["/readyz"]["get"]["responses"]
    assert "401" not in paths["/healthz"]["get"]["responses"]
    facade = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "202", "409", "4XX", "502", "504"} <= set(facade)


def test_the_key_is_a_bearer_scheme_on_the_v1_routes(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`hookline keys create TENANT`).",
    }
    for path, method, operation in operations(spec):
        expected: list[dict[str, list[str]]] | None = (
            [{"bearer": []}]
            if path.startswith("/v1/") and not path.startswith("/v1/inbound/")  # (signed)
            else None
        )
        assert operation.get("security") == expected, (method, path)
    assert "/openapi.json" not in spec["paths"]


def test_the_facade_bodies_are_openai_requests(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for path, name, required in [
        ("/v1/chat/completions", "ChatCompletionRequest", {"model", "messages"}),
        ("/v1/completions", "CompletionRequest", {"model", "prompt"}),
        ("/v1/embeddings", "EmbeddingRequest", {"model", "input"}),
    ]:
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"
        }
        schema = schemas[name]
        assert set(schema["required"]) == required
        assert schema["additionalProperties"] is True  # other fields go to the upstream
    assert "stream" in schemas["ChatCompletionRequest"]["properties"]
    assert "stream" not in schemas["EmbeddingRequest"]["properties"]  # embeddings do not stream


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_served_spec_is_the_apps(live: LiveGateway, spec: dict[str, Any]) -> None:
    served = await live.client.get("/openapi.json", headers={"Authorization": ""})
    assert served.status_code == 200
    assert served.json() == spec


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_405_allows_every_method_of_the_path(live: LiveGateway) -> None:
    # Starlette named the methods of one route only, the first on the path (GET here).
    response = await live.client.put("/v1/webhook-endpoints/ep_x", json={})
    assert response.status_code == 405
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["allow"] == "GET, PATCH, DELETE"
    response = await live.client.put("/v1/jobs")
    assert response.headers["allow"] == "GET, POST"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_request_that_is_not_http_is_a_400_problem(live: LiveGateway) -> None:
    # Found by the fuzz test: a Content-Length that is not a number got uvicorn's plain text.
    url = httpx.URL(live.base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: Ej&Q\tu9\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/problem+json" in head.lower()
    problem = json.loads(body)
    assert problem["status"] == 400
    assert problem["type"] == "urn:hookline:problem:malformed-request"
