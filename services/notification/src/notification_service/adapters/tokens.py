"""Signed one-click unsubscribe tokens (RFC 8058): who, which channel, which purpose, when.

Signed with itsdangerous (HMAC-SHA256, the issue time in the token): a token expires after
``max_age``, and a previous secret still verifies while it is being rotated out (tokens are
always signed with the current one). Anyone holding a token may withdraw that consent (that is
the point: no login); nobody can forge one for another shopper without a secret.

Decoding is strict: a token is three (four when compressed) dot-separated segments of the
URL-safe base64 alphabet, each in its one canonical encoding, so nothing can ride along a
valid signature (base64 decoders skip what they do not know, and ignore what follows the
padding).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.encoding import base64_decode, base64_encode

CHANNELS = ("email", "push", "sms")
PURPOSES = ("marketing", "transactional")
# A token of ours is well under this; anything longer is not worth decoding.
MAX_TOKEN_LENGTH = 512
_SHAPE = re.compile(r"\.?[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){2}")


class BadToken(ValueError):
    """The token is malformed or its signature does not match (the message is safe to show)."""


class ExpiredToken(BadToken):
    """The token was ours, but it is older than the tokens' lifetime."""


@dataclass(frozen=True)
class Unsubscribe:
    """What a token withdraws."""

    customer_id: str
    channel: str
    purpose: str


class UnsubscribeTokens:
    """Signs with ``secret``; verifies with it and any of ``previous``; tokens live ``max_age``."""

    def __init__(
        self,
        secret: bytes,
        *,
        previous: Sequence[bytes] = (),
        max_age: timedelta = timedelta(days=90),
    ) -> None:
        for key in (secret, *previous):
            if len(key) < 16:
                raise ValueError("an unsubscribe secret needs at least 16 bytes")
        self.max_age = max_age
        # itsdangerous signs with the last key of the list and verifies with any of them.
        self._serializer = URLSafeTimedSerializer(
            [*previous, secret],
            salt="omni.notification.unsubscribe",
            signer_kwargs={"digest_method": hashlib.sha256},
        )

    def sign(self, what: Unsubscribe) -> str:
        """A token for ``what``, issued now."""
        return str(self._serializer.dumps([what.customer_id, what.channel, what.purpose]))

    def verify(self, token: str) -> Unsubscribe:
        """What ``token`` withdraws; :class:`BadToken` (or :class:`ExpiredToken`) if it is not
        a current token of ours, in its exact form."""
        if len(token) > MAX_TOKEN_LENGTH or not _SHAPE.fullmatch(token):
            raise BadToken("malformed token")
        for segment in token.lstrip(".").split("."):
            try:
                canonical = base64_encode(base64_decode(segment)).decode()
            except BadData:
                raise BadToken("malformed token") from None
            if canonical != segment:
                raise BadToken("malformed token")
        try:
            payload = self._serializer.loads(token, max_age=self.max_age.total_seconds())
        except SignatureExpired:
            raise ExpiredToken("the link has expired") from None
        except BadData:
            raise BadToken("bad signature") from None
        if (
            not isinstance(payload, list)
            or len(payload) != 3
            or not all(isinstance(part, str) and part for part in payload)
            or payload[1] not in CHANNELS
            or payload[2] not in PURPOSES
        ):
            raise BadToken("malformed token")
        return Unsubscribe(*payload)
