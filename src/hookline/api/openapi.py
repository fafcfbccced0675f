"""The OpenAPI spec, made true. FastAPI writes it from the routes; :func:`complete_spec` adds, in
one pass, what FastAPI cannot see from them:

- the errors: every operation documents each status it can answer, each ``application/problem+json``
  with the :data:`PROBLEM` schema (RFC 9457, with our extensions). Most statuses follow from where
  the refusal is made, so they are derived here from the operation's shape:

  ====================================  =============================================
  every operation                       400, 408, 431 (the HTTP server's guard,
                                        :mod:`hookline.api.server`), 413 (the body limit)
  under ``/v1/``                        401 (the key), 503 (the database)
  a JSON request body                   400 (not JSON, or past the JSON limits), 415, 422
  parameters                            422
  path parameters                       404
  ====================================  =============================================

  and a route declares the rest itself, as ``responses={409: {"description": ...}}``;
- the ``bearer`` security scheme, required by every ``/v1/`` operation;
- an event stream's events are described (:data:`SERVER_SENT_EVENT`);
- the ``$defs`` that inline model schemas carry (:func:`model_schema`) become components, and
  every ``$ref`` points into ``#/components/schemas``.

tests/test_openapi.py checks the spec's shape; tests/test_fuzz.py (schemathesis) checks that the
gateway answers what it says.
"""

from __future__ import annotations

import http
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from hookline.api.problems import PROBLEM_MEDIA_TYPE

API_PREFIX = "/v1/"
INBOUND_PREFIX = "/v1/inbound/"
_COMPONENTS = "#/components/schemas/"
_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

PROBLEM: dict[str, Any] = {
    "title": "Problem",
    "description": (
        "An RFC 9457 problem. `type` is `urn:hookline:problem:<kind>`; the OpenAI-compatible "
        "routes add OpenAI's `error` object, which the OpenAI SDKs read."
    ),
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "urn:hookline:problem:<kind>"},
        "title": {"type": "string", "description": "The status's reason phrase."},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string", "description": "What went wrong, for a person."},
        "errors": {
            "type": "array",
            "description": "validation-error: each invalid part of the request.",
            "items": {
                "type": "object",
                "required": ["location", "message"],
                "properties": {
                    "location": {"type": "string", "description": "e.g. body.input.messages"},
                    "message": {"type": "string"},
                },
            },
        },
        "error": {
            "type": "object",
            "description": "OpenAI's error object (the OpenAI-compatible routes).",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        },
        "job": {
            "$ref": f"{_COMPONENTS}JobOut",
            "description": "The OpenAI-compatible routes: the job that did not succeed.",
        },
    },
}

SERVER_SENT_EVENT: dict[str, Any] = {
    "title": "ServerSentEvent",
    "description": "One event of a text/event-stream answer (comments, the heartbeats, are not).",
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "JSON text (the OpenAI-compatible routes end with `[DONE]`).",
        },
        "event": {"type": "string", "description": "The event type (job.output.delta, …)."},
        "id": {"type": "string", "description": "The resume token, for Last-Event-ID."},
        "retry": {"type": "integer"},
    },
}

# Why each status is answered; a route's own description (as it declared it) wins.
_WHY: dict[str, str] = {
    "400": (
        "Malformed: not HTTP, a body that is not JSON or is past the JSON limits (nested deeper "
        "than 64, an integer past 64 bits, a NUL character), or a cursor this API did not give."
    ),
    "401": "No valid API key: send `Authorization: Bearer <key>`.",
    "404": "No such object (or it is another tenant's).",
    "408": "The request's head or body arrived too slowly; the connection is closed.",
    "409": "The request contradicts what is stored.",
    "413": "The request body is larger than the limit.",
    "415": "The request body is not declared JSON (`Content-Type: application/json`).",
    "422": "Well-formed but invalid: `detail` says why, `errors` lists each part when the schema does.",
    "431": "The request's headers are larger than the limit; the connection is closed.",
    "502": "The upstream failed.",
    "503": "The database is unavailable or its disk is full; retry after `Retry-After`.",
    "504": "The job expired before it started.",
}
_HEADERS: dict[str, dict[str, Any]] = {
    "401": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    "503": {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds"}},
}


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A ``$ref`` to ``model``'s schema for an ``openapi_extra`` request body, carrying the
    definitions it needs (``$defs``); :func:`complete_spec` moves them into the components."""
    schema = model.model_json_schema(ref_template=_COMPONENTS + "{model}")
    definitions = schema.pop("$defs", {})
    return {
        "$ref": f"{_COMPONENTS}{model.__name__}",
        "$defs": {**definitions, model.__name__: schema},
    }


def error_statuses(path: str, operation: dict[str, Any]) -> set[str]:
    """The error statuses that follow from where ``operation`` sits and what it takes."""
    statuses = {"400", "408", "413", "431"}
    if path.startswith(API_PREFIX):
        statuses |= {"401", "503"}
    parameters = operation.get("parameters") or []
    if parameters:
        statuses.add("422")
    if any(p.get("in") == "path" for p in parameters):
        statuses.add("404")
    body = (operation.get("requestBody") or {}).get("content") or {}
    if "application/json" in body:
        statuses |= {"415", "422"}
    return statuses


def complete_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (FastAPI's) made complete and true, in place; see the module's docstring."""
    components = spec.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    _hoist_definitions(spec, schemas)
    schemas["Problem"] = PROBLEM
    schemas["ServerSentEvent"] = SERVER_SENT_EVENT
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`hookline keys create TENANT`).",
        }
    }
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for status in error_statuses(path, operation) - set(responses):
                responses[status] = {}
            for status, response in responses.items():
                if status[0] in "45":
                    responses[status] = _problem_response(status, response)
                stream = (response.get("content") or {}).get("text/event-stream")
                if stream is not None and not stream.get("schema"):
                    stream["schema"] = {"$ref": f"{_COMPONENTS}ServerSentEvent"}
            operation["responses"] = dict(sorted(responses.items()))
            if path.startswith(API_PREFIX) and not path.startswith(INBOUND_PREFIX):
                operation["security"] = [{"bearer": []}]  # (an inbound webhook is signed)
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which we replace
        schemas.pop(name, None)
    components["schemas"] = dict(sorted(schemas.items()))
    return spec


def install(app: FastAPI) -> None:
    """Serve :func:`complete_spec` of the app's spec as ``/openapi.json`` (built once)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if not getattr(app.state, "openapi_completed", False):
            complete_spec(generate())
            app.state.openapi_completed = True
        return generate()

    app.openapi = openapi  # type: ignore[method-assign]


def _problem_response(status: str, response: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"$ref": f"{_COMPONENTS}Problem"}
    if status.isdigit():  # the body's status is the response's (not so for a range, 4XX)
        schema = {"allOf": [schema, {"properties": {"status": {"const": int(status)}}}]}
    phrase = http.HTTPStatus(int(status)).phrase if status.isdigit() else "Error"
    description = response.get("description")
    if description in (None, "", phrase, "Validation Error", "Additional Response"):
        description = _WHY.get(status, phrase)  # FastAPI's default: ours says why
    completed = {"description": description, "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}}}
    headers = {**_HEADERS.get(status, {}), **(response.get("headers") or {})}
    if headers:
        completed["headers"] = headers
    return completed


def _hoist_definitions(spec: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Move every ``$defs`` into ``schemas`` and point ``#/$defs/…`` references there."""
    for node in _walk(spec):
        definitions = node.pop("$defs", None)
        if definitions:
            for name, schema in definitions.items():
                known = schemas.setdefault(name, schema)
                if known != schema:
                    raise ValueError(f"two different schemas are both named {name!r}")
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = _COMPONENTS + ref.removeprefix("#/$defs/")
    for node in _walk(schemas):  # the definitions moved may refer to each other
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = _COMPONENTS + ref.removeprefix("#/$defs/")


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in list(value.values()):
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)
