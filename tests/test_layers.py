"""The package's layering, as docs/architecture.md draws it: a module imports only from its own
layer or those below (lazy imports inside functions included), the client imports nothing of the
server, and no two packages of one layer import each other."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "hookline"

# Bottom to top. A module belongs to the first entry that is its name or a package above it.
LAYERS: list[set[str]] = [
    {"_version", "errors", "ids", "clock", "httputil", "jsonlimits"},  # foundation
    {"observability"},  # metrics, traces, logs: everything reports to it, it imports nothing above
    {"config"},
    # the domain: records, formats, fair sharing
    {"jobs", "events", "deliveries", "responses", "messages", "fairness"},
    {"live", "store", "upstreams", "routing"},  # below the queue: hub, storage, providers
    {"queue", "auth"},
    {"worker", "delivery", "batches"},  # run jobs, deliver their events, batches of them
    {"gateway"},  # wires everything
    {"api"},
    {"cli", "__main__"},
]
CLIENT = "client"  # the Python client: imports nothing of the server
SHIMS = {"__init__", "webhooks"}  # documented import paths that forward to the client


def _top(module: str) -> str:
    """``hookline.store.sql`` -> ``store``; ``hookline`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _exists(module: str) -> bool:
    path = SRC.joinpath(*module.split(".")[1:])
    return path.is_dir() or path.with_suffix(".py").exists()


def _layer(name: str) -> int:
    for index, names in enumerate(LAYERS):
        if name in names:
            return index
    raise AssertionError(f"hookline.{name} is in no layer: add it to LAYERS (and the docs)")


def _imports() -> list[tuple[str, str]]:
    """(importing module, imported hookline module) for every import in the package."""
    found = []
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [(module, n) for n in names if n.startswith("hookline.") and _exists(n)]
    return found


def test_every_import_goes_down_or_sideways() -> None:
    upward = []
    for module, imported in _imports():
        source, target = _top(module), _top(imported)
        if source in SHIMS or source == CLIENT or target == source:
            continue
        if target == CLIENT:  # the CLI's client commands may; the server never does
            if source != "cli":
                upward.append(f"{module} -> {imported} (the server never loads the client)")
        elif _layer(target) > _layer(source):
            upward.append(f"{module} -> {imported}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(set(upward)))


def test_the_client_imports_nothing_of_the_server() -> None:
    server = [
        f"{module} -> {imported}"
        for module, imported in _imports()
        if _top(module) == CLIENT and _top(imported) not in (CLIENT, "_version")
    ]
    assert not server, "\n".join(server)


def test_no_two_packages_of_a_layer_import_each_other() -> None:
    edges = {
        (_top(m), _top(i))
        for m, i in _imports()
        if _top(m) != _top(i) and _top(m) not in SHIMS | {CLIENT} and _top(i) != CLIENT
    }
    both = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not both, "\n".join(both)
