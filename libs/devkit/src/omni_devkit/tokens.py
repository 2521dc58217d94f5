"""Shopper tokens for development and tests: what the retailer's identity provider issues.

Production services only verify tokens (:class:`omni_common.auth.ShopperTokens`); minting
lives here, in the devkit, which never ships in the production image.
"""

from __future__ import annotations

import secrets
import time

import jwt

DEV_ISSUER = "omni-dev"
DEV_AUDIENCE = "omni"


def new_hs256_secret() -> str:
    """A fresh random secret for ``SHOPPER_TOKEN_HS256_SECRET`` (256 bits)."""
    return secrets.token_urlsafe(32)


def mint_shopper_token(
    secret: str,
    customer_id: str,
    *,
    ttl_s: int = 3600,
    issuer: str | None = DEV_ISSUER,
    audience: str | None = DEV_AUDIENCE,
) -> str:
    """An HS256 shopper token whose ``sub`` is ``customer_id``, valid for ``ttl_s``."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": customer_id, "iat": now, "exp": now + ttl_s}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
