"""Signed one-click unsubscribe tokens (RFC 8058): who, which channel, which purpose.

The token is ``base64url(customer_id \\n channel \\n purpose) . base64url(HMAC-SHA256)``;
anyone holding it may withdraw that consent (that is the point: no login), nobody can forge
one for another shopper without the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass


class BadToken(ValueError):
    """The token is malformed or its signature does not match."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Unsubscribe:
    """What a token withdraws."""

    customer_id: str
    channel: str
    purpose: str


class UnsubscribeTokens:
    """Signs and verifies unsubscribe tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the unsubscribe secret needs at least 16 bytes")
        self._secret = secret

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, b"unsubscribe:" + body, hashlib.sha256).digest()

    def sign(self, what: Unsubscribe) -> str:
        """A token for ``what``."""
        body = "\n".join((what.customer_id, what.channel, what.purpose)).encode()
        return f"{_b64(body)}.{_b64(self._mac(body))}"

    def verify(self, token: str) -> Unsubscribe:
        """What ``token`` withdraws; :class:`BadToken` if it is not one of ours."""
        body_b64, sep, mac_b64 = token.partition(".")
        if not sep:
            raise BadToken("malformed token")
        try:
            body, mac = _unb64(body_b64), _unb64(mac_b64)
        except (binascii.Error, ValueError):
            raise BadToken("malformed token") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise BadToken("bad signature")
        parts = body.decode(errors="replace").split("\n")
        if len(parts) != 3 or not all(parts):
            raise BadToken("malformed token")
        return Unsubscribe(*parts)
