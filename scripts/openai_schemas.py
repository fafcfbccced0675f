"""Write tests/openai_schemas.json: the schemas of OpenAI's published OpenAPI spec that the facade's
answers are held to (tests/test_answer_shapes.py), with every schema they refer to, and without
their prose (descriptions, examples), which validates nothing.

    .venv/bin/python scripts/openai_schemas.py OPENAPI_JSON COMMIT

OPENAPI_JSON is ``openapi.json`` of github.com/openai/openai-openapi, COMMIT the commit it came
from (kept in the file, to say which spec the tests hold to).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "openai_schemas.json"
ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "ImagesResponse",
    "Response",
    "ErrorResponse",
]
PROSE = {"description", "example", "examples", "title", "deprecated"}
PREFIX = "#/components/schemas/"


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                yield item.removeprefix(PREFIX)
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def _plain(value: Any, *, in_properties: bool = False) -> Any:
    """``value`` without prose or vendor extensions (but a property may be named so), as JSON
    Schema: the spec's few OpenAPI 3.0 ``nullable: true`` become ``anyOf`` with null."""
    if isinstance(value, dict):
        plain = {
            key: _plain(item, in_properties=key == "properties" and not in_properties)
            for key, item in value.items()
            if in_properties or (key not in PROSE and not key.startswith("x-"))
        }
        if not in_properties and plain.pop("nullable", False) is True:
            return {"anyOf": [plain, {"type": "null"}]}
        return plain
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    schemas = spec["components"]["schemas"]
    kept: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = _plain(schemas[name])
            todo.extend(_refs(schemas[name]))
    document = {
        "source": f"github.com/openai/openai-openapi openapi.json at {sys.argv[2]} "
        f"(version {spec['info']['version']}), written by scripts/openai_schemas.py",
        "components": {"schemas": dict(sorted(kept.items()))},
    }
    OUT.write_text(json.dumps(document, indent=None, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(kept)} schemas")


if __name__ == "__main__":
    main()
