"""SSRF protection for webhook URLs.

A URL is refused unless it is http(s) and every address its host resolves to is public: not
loopback, private, link-local (which holds the cloud metadata address 169.254.169.254),
multicast, reserved or shared. The check runs when the URL is given (a 422) and again when a
message is sent: :class:`GuardedResolver` is the resolver of the sending connector, so the address
connected to is the address checked (a DNS rebinding between check and connect cannot slip
through). Redirects are never followed. ``allow_private_networks`` or ``allowed_networks`` in
``[webhooks]`` lift the rule, for local development and tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from hookline.config import WebhooksConfig
from hookline.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressPolicy:
    def __init__(self, config: WebhooksConfig) -> None:
        self.allow_all = config.allow_private_networks
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in config.allowed_networks]

    def permits(self, address: IPAddress) -> bool:
        if self.allow_all or any(address in network for network in self.allowed):
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return self.permits(address.ipv4_mapped)
        return address.is_global and not address.is_multicast


def _split(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest(f"webhook URLs must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise InvalidRequest(f"webhook URL {url!r} has no host")
    if parts.username or parts.password:
        raise InvalidRequest("webhook URLs must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"webhook URL {url!r} has an invalid port") from exc
    return parts.hostname, port


async def check_url(url: str, policy: AddressPolicy) -> None:
    """Raise :class:`InvalidRequest` unless ``url`` may receive webhooks under ``policy``."""
    host, port = _split(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidRequest(f"webhook host {host!r} does not resolve: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not policy.permits(address):
            raise InvalidRequest(
                f"webhook host {host!r} resolves to {address}, a non-public address; "
                "allow it with [webhooks] allowed_networks"
            )


def check_url_syntax(url: str, policy: AddressPolicy) -> None:
    """The checks that need no DNS: scheme, host, and IP-literal hosts."""
    host, _ = _split(url)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if not policy.permits(address):
        raise InvalidRequest(f"webhook address {address} is not public")


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops every address the policy refuses."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._resolver = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        allowed = [r for r in results if self.policy.permits(ipaddress.ip_address(r["host"]))]
        if not allowed:
            raise OSError(f"{host} resolves only to non-public addresses; refused")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()
