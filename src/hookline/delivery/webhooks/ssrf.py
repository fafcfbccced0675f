"""SSRF protection for webhook URLs.

A URL is refused unless it is http(s) and every address its host resolves to is public: not
loopback, private, link-local (which holds the cloud metadata address 169.254.169.254),
multicast, reserved or shared. An IPv6 address that carries an IPv4 one (IPv4-mapped and
-translated, IPv4-compatible, NAT64's 64:ff9b::/96, 6to4's 2002::/16) is judged by that IPv4
address, since a NAT64 gateway or 6to4 relay would deliver to it; the local-use NAT64 prefix
64:ff9b:1::/48, whose IPv4 address is placed as each network chooses, is refused. The check runs when the URL is given (a 422) and again when a
message is sent: :class:`GuardedResolver` is the resolver of the sending connector, so the address
connected to is the address checked (a DNS rebinding between check and connect cannot slip
through). Redirects are never followed. ``allowed_networks`` (or ``allow_private_networks``)
in ``[webhooks]`` lift the rule for the networks named; development mode (``hookline serve
--dev``) for :data:`DEV_NETWORKS`, loopback and private ones, so a receiver on the developer's
machine or LAN gets its webhooks (link-local addresses, the cloud metadata one among them, stay
refused).
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
# IPv6 prefixes whose last 32 bits are an IPv4 address: IPv4-compatible (deprecated, RFC 4291),
# IPv4-translated (SIIT, RFC 2765) and NAT64's well-known prefix (RFC 6052). IPv4-mapped and 6to4
# have their own properties on IPv6Address.
_IPV4_IN_LAST_32_BITS = (
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("64:ff9b::/96"),
)
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
# What development mode allows: loopback (localhost) and private networks (a LAN, a container's
# host such as Docker's 172.17.0.1, IPv6 unique local addresses).
DEV_NETWORKS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)
_MAX_HOST_LENGTH = 253


class AddressPolicy:
    """Which addresses may receive webhooks: public ones, and those the configuration allows
    (``dev``: :data:`DEV_NETWORKS` too)."""

    def __init__(self, config: WebhooksConfig, *, dev: bool = False) -> None:
        self.allow_all = config.allow_private_networks
        self.dev = dev
        networks = [*config.allowed_networks, *(DEV_NETWORKS if dev else ())]
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in networks]

    def permits(self, address: IPAddress) -> bool:
        if self.allow_all or any(address in network for network in self.allowed):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            if address in _LOCAL_NAT64:
                return False
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                return self.permits(embedded)
        return address.is_global and not address.is_multicast


_HOW_TO_ALLOW = (
    "on a developer's machine run `hookline serve --dev` (webhooks to localhost and private "
    "networks); otherwise allow its network with [webhooks] allowed_networks"
)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries, if it is of a kind that carries one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _split(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed "[" of an IPv6 address, say
        raise InvalidRequest(f"webhook URL {url!r} is not a URL: {exc}") from exc
    if not parts.scheme:
        raise InvalidRequest(f"webhook URL {url[:200]!r} is not a URL (like https://host/path)")
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest(f"webhook URLs must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise InvalidRequest(f"webhook URL {url!r} has no host")
    _check_host_name(parts.hostname)
    if parts.username or parts.password:
        raise InvalidRequest("webhook URLs must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"webhook URL {url!r} has an invalid port") from exc
    return parts.hostname, port


def _check_host_name(host: str) -> None:
    """A host name DNS can carry: labels of 1-63 characters, 253 in all (IDNA-encoded)."""
    try:
        encoded = host.encode("idna")  # what getaddrinfo does with it; it checks each label
    except UnicodeError as exc:
        raise InvalidRequest(f"webhook host {host[:80]!r} is not a valid host name: {exc}") from exc
    if len(encoded.rstrip(b".")) > _MAX_HOST_LENGTH:
        raise InvalidRequest(
            f"webhook host {host[:80]!r}… is longer than {_MAX_HOST_LENGTH} characters"
        )


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
                + _HOW_TO_ALLOW
            )


def check_url_syntax(url: str, policy: AddressPolicy) -> None:
    """The checks that need no DNS: scheme, host, and IP-literal hosts."""
    host, _ = _split(url)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if not policy.permits(address):
        raise InvalidRequest(f"webhook address {address} is not public; " + _HOW_TO_ALLOW)


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
