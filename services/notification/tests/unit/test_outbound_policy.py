"""Where a push subscription may make the service call: public https endpoints only."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from notification_service.adapters.outbound import (
    EndpointPolicy,
    GuardedResolver,
    RefusedAddress,
    forbidden,
)

DENY = EndpointPolicy(allow_private=False)
ALLOW = EndpointPolicy(allow_private=True)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # loopback
        "10.1.2.3",  # private
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # link-local: AWS, GCP and Azure metadata
        "100.100.100.200",  # CGNAT (shared address space): Alibaba's metadata
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "::1",
        "fd00:ec2::254",  # unique local: AWS's IPv6 metadata
        "fe80::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_addresses_inside_a_network_are_forbidden(address: str) -> None:
    assert forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["142.250.74.78", "2a00:1450:4007:80f::200e", "1.1.1.1"])
def test_public_addresses_are_not(address: str) -> None:
    assert not forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "http://fcm.googleapis.com/fcm/send/x",  # not https
        "https://127.0.0.1/x",
        "https://[::1]/x",
        "https://[::ffff:7f00:1]/x",
        "https://2130706433/x",  # 127.0.0.1 spelled as a number
        "https://0x7f.1/x",
        "https://127.1/x",
        "https://169.254.169.254/latest/meta-data/",
        "https://user:pass@push.example/x",
        "ftp://push.example/x",
        "https://push.example:notaport/x",
        "not a url",
    ],
)
def test_urls_the_policy_refuses_before_any_request(url: str) -> None:
    with pytest.raises(RefusedAddress):
        DENY.check_url(url)


def test_public_https_endpoints_pass_and_allow_lifts_the_address_checks() -> None:
    DENY.check_url("https://fcm.googleapis.com/fcm/send/abc")
    DENY.check_url("https://updates.push.services.mozilla.com/wpush/v2/abc")
    ALLOW.check_url("http://127.0.0.1:8123/push/abc")
    # A legacy spelling stays refused: it would slip past any later check.
    with pytest.raises(RefusedAddress):
        ALLOW.check_url("http://2130706433/x")


class _Rebinding(AbstractResolver):
    """A name that resolves to a public address the first time, then to loopback."""

    def __init__(self) -> None:
        self.answers = ["142.250.74.78", "127.0.0.1"]

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        result: Any = {
            "hostname": host,
            "host": address,
            "port": port,
            "family": family,
            "proto": 0,
            "flags": 0,
        }
        return [result]

    async def close(self) -> None:
        pass


def test_every_resolution_is_checked_when_connecting() -> None:
    resolver = GuardedResolver(DENY, _Rebinding())

    async def twice() -> None:
        first = await resolver.resolve("push.example", 443)
        assert first[0]["host"] == "142.250.74.78"
        with pytest.raises(RefusedAddress):
            await resolver.resolve("push.example", 443)

    asyncio.run(twice())
