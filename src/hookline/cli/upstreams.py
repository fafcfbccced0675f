"""``hookline upstreams``: each upstream's health, circuit, concurrency in use and queue depth,
from a running gateway's admin API (``GET /v1/admin/upstreams``, an admin key)."""

from __future__ import annotations

from typing import Any

from hookline.cli.client_commands import _client, _reported
from hookline.cli.options import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, print_columns, print_json

HEADERS = ["name", "type", "health", "circuit", "running", "queued", "oldest queued", "routes"]


def _circuit(circuit: dict[str, Any]) -> str:
    state = str(circuit["state"])
    if state == "open":
        return f"open ({circuit['retry_in_seconds']:.0f} s left)"
    if circuit["consecutive_failures"]:
        return f"{state} ({circuit['consecutive_failures']}/{circuit['failures_to_open']} failed)"
    return state


def _row(upstream: dict[str, Any]) -> list[str]:
    health = str(upstream["health"])
    if upstream.get("last_error") and health != "ok":
        health = f"{health} ({upstream['last_error']})"
    return [
        upstream["name"],
        upstream["type"],
        health,
        _circuit(upstream["circuit"]),
        f"{upstream['running']}/{upstream['max_concurrency']}",
        str(upstream["queued"]),
        upstream["oldest_queued_at"] or "-",
        ", ".join(upstream["routes"]) or "-",
    ]


def upstreams(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Each upstream's health, circuit, load and queue depth.

    Running counts the upstream's jobs running now against its max_concurrency, queued those
    waiting for it, across every process and tenant. Needs an admin key (`hookline keys create
    --admin`).
    """
    with _client(url, api_key) as client, _reported(client):
        found = client.upstreams()
    if as_json:
        print_json({"object": "list", "data": found})
        return
    print_columns([h.upper() for h in HEADERS], [_row(upstream) for upstream in found])
