"""Where the service's outbound HTTP may go: a push subscription's endpoint is the shopper's
to choose, so it must not be a way into the network the service runs in.

:class:`EndpointPolicy` checks a URL before any request (https only; an address literal must
be public, in its canonical form); :class:`GuardedResolver` checks every address a name
resolves to, when the connection is made, so a name that resolved to a public address
once and to a private one now (DNS rebinding) is refused too: the connector connects only
to addresses the resolver returned. ``allow_private`` (``NOTIFY_PUSH_PRIVATE_ENDPOINTS=allow``,
development and tests with their own push service on loopback) lifts both checks.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64, RFC 6052 and 8215).
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class RefusedAddress(OSError):
    """An endpoint or a name's address the policy refuses (never a network error)."""


def forbidden(address: IPAddress) -> bool:
    """Whether ``address`` is no public unicast address: loopback, private, link-local (and
    so the cloud metadata addresses), shared (CGNAT), reserved, multicast, unspecified,
    including those an IPv6 address embeds (mapped, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if any(address in net for net in _NAT64):
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(forbidden(inner) for inner in embedded):
            return True
    return not address.is_global or address.is_multicast


def _literal(host: str) -> IPAddress | None:
    """``host`` as an address when it is written as one (brackets and zone ids allowed)."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _legacy_ipv4(host: str) -> bool:
    """Whether ``host`` is an IPv4 address in a legacy spelling (``127.1``, ``2130706433``,
    ``0x7f.0.0.1``) that resolvers accept and address checks would not recognise."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return _literal(host) is None


class EndpointPolicy:
    """Which push endpoints may be called (see the module's docstring)."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    def check_url(self, url: str) -> None:
        """Raise :class:`RefusedAddress` unless ``url`` may be requested at all."""
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            parts.port  # noqa: B018 - a malformed port raises here
        except ValueError:
            raise RefusedAddress("not a URL") from None
        if parts.scheme not in ("https", "http") or not host or parts.username is not None:
            raise RefusedAddress("not an http(s) URL to a host")
        if _legacy_ipv4(host):
            raise RefusedAddress("an address in a legacy spelling")
        if self.allow_private:
            return
        if parts.scheme != "https":
            raise RefusedAddress("not https")
        address = _literal(host)
        if address is not None and forbidden(address):
            raise RefusedAddress("not a public address")

    def check_addresses(self, host: str, addresses: list[str]) -> None:
        """Raise :class:`RefusedAddress` if any address ``host`` resolved to is refused."""
        if self.allow_private:
            return
        for text in addresses:
            address = _literal(text)
            if address is None or forbidden(address):
                raise RefusedAddress(f"{host} resolves to an address that is not public")


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, checking every address against the policy before it is used."""

    def __init__(self, policy: EndpointPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The addresses of ``host``, all of them allowed, or :class:`RefusedAddress`."""
        results = await self.inner.resolve(host, port, family)
        self.policy.check_addresses(host, [str(r["host"]) for r in results])
        return results

    async def close(self) -> None:
        """Close the resolver underneath."""
        await self.inner.close()


def refused_by_policy(exc: BaseException) -> bool:
    """Whether a client error was this policy refusing (aiohttp wraps the resolver's error)."""
    seen: set[int] = set()
    current: Any = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RefusedAddress):
            return True
        current = getattr(current, "os_error", None) or current.__cause__
    return False
