"""SSRF checks of webhook URLs: every form of a non-public address is refused, and a URL or host
name that cannot be one is a 422, never a 500."""

from __future__ import annotations

import pytest

from hookline.config import WebhooksConfig
from hookline.delivery.webhooks.ssrf import AddressPolicy, check_url, check_url_syntax
from hookline.errors import InvalidRequest
from tests.conftest import LiveGateway
from tests.test_api_errors import CHAT, assert_no_jobs, assert_problem


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://[::1", "not a URL"),
        (f"http://{'a' * 300}.example.com/", "not a valid host name"),
        (f"http://{'a.' * 130}example.com/", "longer than 253"),
        ("http://a..b.example.com/", "not a valid host name"),
        ("ftp://example.com/", "http or https"),
        ("http://example.com:99999/", "invalid port"),
    ],
)
async def test_urls_that_cannot_be_reached_are_invalid_requests(url: str, words: str) -> None:
    policy = AddressPolicy(WebhooksConfig())
    with pytest.raises(InvalidRequest, match=words):
        check_url_syntax(url, policy)
    with pytest.raises(InvalidRequest, match=words):
        await check_url(url, policy)


@pytest.mark.parametrize(
    "host",
    [
        "[::7f00:1]",  # IPv4-compatible 127.0.0.1
        "[::ffff:0:7f00:1]",  # IPv4-translated (SIIT)
        "[64:ff9b::7f00:1]",  # NAT64
        "[64:ff9b::a9fe:a9fe]",  # NAT64 to the cloud metadata address
        "[2002:7f00:1::1]",  # 6to4
        "[2002:a00:1::1]",  # 6to4 of 10.0.0.1
        "[::ffff:7f00:1]",  # IPv4-mapped (refused before too)
        "[64:ff9b:1::808:808]",  # local-use NAT64: where the IPv4 address sits is local
    ],
)
async def test_ipv6_forms_of_private_ipv4_addresses_are_refused(host: str) -> None:
    policy = AddressPolicy(WebhooksConfig())
    with pytest.raises(InvalidRequest, match="public"):
        check_url_syntax(f"http://{host}/hook", policy)
    with pytest.raises(InvalidRequest, match="public"):
        await check_url(f"http://{host}/hook", policy)


@pytest.mark.parametrize("host", ["[64:ff9b::808:808]", "[2002:808:808::1]", "[2606:4700::1111]"])
def test_ipv6_forms_of_public_addresses_pass(host: str) -> None:
    check_url_syntax(f"http://{host}/hook", AddressPolicy(WebhooksConfig()))


def test_allowed_networks_cover_the_ipv6_forms_of_an_allowed_ipv4_address() -> None:
    policy = AddressPolicy(WebhooksConfig(allowed_networks=["127.0.0.0/8"]))
    check_url_syntax("http://[64:ff9b::7f00:1]/hook", policy)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_api_refuses_a_nat64_form_of_the_metadata_address(live: LiveGateway) -> None:
    webhook = {"url": "http://[64:ff9b::a9fe:a9fe]/latest/meta-data"}
    assert_problem(await live.client.post("/v1/jobs", json={**CHAT, "webhook": webhook}), 422)
    await assert_no_jobs(live)


@pytest.mark.parametrize(
    "host",
    ["localhost", "127.0.0.1", "[::1]", "10.1.2.3", "172.17.0.1", "192.168.1.20", "[fd00::1]"],
)
async def test_development_mode_allows_loopback_and_private_addresses(host: str) -> None:
    url = f"http://{host}:3000/hook"
    with pytest.raises(InvalidRequest, match="hookline serve --dev"):
        await check_url(url, AddressPolicy(WebhooksConfig()))  # production: refused, and why
    await check_url(url, AddressPolicy(WebhooksConfig(), dev=True))


@pytest.mark.parametrize(
    "host",
    ["169.254.169.254", "[fe80::1]", "100.64.0.1", "0.0.0.0", "224.0.0.1", "[::ffff:a9fe:a9fe]"],
)
def test_development_mode_still_refuses_link_local_and_other_special_addresses(host: str) -> None:
    with pytest.raises(InvalidRequest, match="public"):
        check_url_syntax(f"http://{host}/hook", AddressPolicy(WebhooksConfig(), dev=True))
