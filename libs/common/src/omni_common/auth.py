"""Who may call a route: channel API keys with scopes, and shopper tokens.

Every request carries a channel's API key (``Authorization: Bearer <key>``). A key belongs
to one channel and holds a set of scopes (``API_KEYS=ops:KEY:admin,pos:KEY:sales.write+
stock.read``; an entry without scopes gets its channel's :data:`DEFAULT_SCOPES`). A key of
a customer-facing channel (``web``, ``app``: it ships inside the app, so assume it is public)
holds the ``shopper`` scope instead of the data scopes: it may touch one shopper's data only
with that shopper's token, a JWT from the retailer's identity provider whose ``sub`` is the
``customer_id``, sent as ``X-Shopper-Token: <jwt>``.

How a route uses it::

    from omni_common.auth import Caller, require, require_shopper

    @router.put("/locations/{location_id}")
    async def put_location(..., _: Annotated[Caller, Depends(require("locations.write"))]):
        ...  # 401 without a valid key, 403 "... lacks scope locations.write" otherwise

    @router.get("/customers/{customer_id}/orders")
    async def orders_of(customer_id: str,
                        _: Annotated[Caller, Depends(require_shopper("orders.read"))]):
        ...  # staff keys with orders.read see anyone; web/app only with customer_id's token

    @router.get("/orders/{order_id}")
    async def get_order(order_id: str,
                        caller: Annotated[Caller, Depends(require("orders.read", shopper=True))]):
        order = ...
        if not caller.acts_for(order.customer_id):
            raise HTTPException(404)  # another shopper's order does not exist for this one

A body naming a shopper (a checkout's ``customer_id``) is checked with
``caller.check_shopper(body.customer_id)`` (403 when the token is someone else's).
New scopes are added to :data:`SCOPES` (a typo in ``API_KEYS`` or in a route then fails at
start-up rather than silently granting or refusing).
"""

# No `from __future__ import annotations`: FastAPI must see the closures' dependencies.
import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import jwt
from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

if TYPE_CHECKING:
    from omni_common.settings import ServiceSettings

SCOPES: dict[str, str] = {
    "admin": "everything below (operators)",
    "stock.read": "read locations and availability",
    "locations.write": "create and change stores and warehouses (what is sold online)",
    "reports.read": "read lost demand and stock discrepancies",
    "sales.write": "record store activity (sales, returns, pickups at the till)",
    "orders.read": "read any shopper's orders",
    "orders.write": "place orders for any shopper (e.g. by phone)",
    "orders.cancel": "cancel any shopper's order",
    "checkout.write": "submit checkouts (a shopper's own, with the shopper scope)",
    "customers.read": "read any shopper's profile",
    "customers.write": "change any shopper's profile",
    "identity.write": "undo a wrong merge of two shoppers' profiles (ops, call centre)",
    "loyalty.read": "read any shopper's loyalty account",
    "loyalty.write": "adjust loyalty accounts",
    "notifications.read": "read what was sent to shoppers",
    "notifications.write": "send or resend notifications",
    "dlq.admin": "inspect and replay dead letters",
    "shopper": "act for the shopper whose token comes with the request (own data only)",
}
"""Every scope a key may hold and a route may require."""

ADMIN = "admin"
SHOPPER = "shopper"

DEFAULT_SCOPES: dict[str, frozenset[str]] = {
    "ops": frozenset({ADMIN}),
    "pos": frozenset({"sales.write", "stock.read"}),
    "web": frozenset({"checkout.write", "stock.read", SHOPPER}),
    "app": frozenset({"checkout.write", "stock.read", SHOPPER}),
    "call_center": frozenset(
        {
            "customers.read",
            "identity.write",
            "orders.read",
            "orders.cancel",
            "loyalty.read",
            "notifications.read",
            "stock.read",
        }
    ),
}
"""The scopes of a channel's key when its ``API_KEYS`` entry names none."""

SHOPPER_TOKEN_HEADER = "X-Shopper-Token"
MIN_KEY_LENGTH = 8
_CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its channel and what it may do (never its secret)."""

    channel: str
    scopes: frozenset[str]


def parse_api_keys(raw: str) -> dict[str, ApiKey]:
    """``API_KEYS`` as a map of secret -> :class:`ApiKey`.

    Entries are comma-separated ``channel:KEY[:scope+scope]`` or the older ``channel=KEY``.
    Raises ValueError naming the entry by position and channel, never quoting the secret.
    """
    keys: dict[str, ApiKey] = {}
    for position, item in enumerate(raw.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        if ":" in item:
            channel, _, rest = item.partition(":")
            key, _, scope_list = rest.partition(":")
        else:
            channel, sep, key = item.partition("=")
            scope_list = ""
            if not sep:
                raise ValueError(
                    f"API_KEYS entry {position} is not CHANNEL:KEY[:SCOPES] (or CHANNEL=KEY)"
                )
        channel, key = channel.strip(), key.strip()
        where = f"API_KEYS entry {position}"
        if not _CHANNEL_RE.match(channel):
            # The "channel" may be a pasted secret: do not echo it.
            raise ValueError(f"{where}: the channel must be a short lower-case name")
        where = f"{where} (channel {channel!r})"
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"{where}: the key must be at least {MIN_KEY_LENGTH} characters")
        if key in keys:
            raise ValueError(f"{where}: the same key is configured twice")
        if scope_list.strip():
            scopes = frozenset(s.strip() for s in scope_list.split("+") if s.strip())
            unknown = sorted(scopes - SCOPES.keys())
            if unknown:
                raise ValueError(
                    f"{where}: unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}"
                )
        elif channel in DEFAULT_SCOPES:
            scopes = DEFAULT_SCOPES[channel]
        else:
            raise ValueError(
                f"{where}: no default scopes for this channel, give them (CHANNEL:KEY:scope+scope)"
            )
        keys[key] = ApiKey(channel=channel, scopes=scopes)
    return keys


def format_api_keys(keys: Mapping[str, ApiKey]) -> str:
    """The ``API_KEYS`` value for ``keys`` (secret -> ApiKey), scopes spelled out."""
    return ",".join(f"{k.channel}:{key}:{'+'.join(sorted(k.scopes))}" for key, k in keys.items())


# -- shopper tokens ----------------------------------------------------------------------------


class ShopperTokenError(Exception):
    """A shopper token that cannot be trusted (its message is safe to show the caller)."""


@dataclass
class ShopperTokens:
    """Verifies shopper JWTs: HS256 with a shared secret (development) or RS256/ES256 with
    the identity provider's JWKS (a file, or a URL fetched and cached by PyJWT)."""

    hs256_secret: str | None = None
    jwks: jwt.PyJWKSet | None = None
    jwks_client: jwt.PyJWKClient | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_s: int = 30
    _configured: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._configured = bool(self.hs256_secret or self.jwks or self.jwks_client)

    @classmethod
    def from_settings(cls, settings: "ServiceSettings") -> "ShopperTokens":
        """The verifier the settings describe; ValueError when they are inconsistent."""
        secret = settings.shopper_token_hs256_secret
        sources = [
            bool(secret and secret.get_secret_value()),
            bool(settings.shopper_token_jwks_file),
            bool(settings.shopper_token_jwks_url),
        ]
        if sum(sources) > 1:
            # Mixing HMAC and public keys invites algorithm confusion: one source only.
            raise ValueError(
                "set only one of SHOPPER_TOKEN_HS256_SECRET, SHOPPER_TOKEN_JWKS_FILE, "
                "SHOPPER_TOKEN_JWKS_URL"
            )
        common: dict[str, Any] = {
            # Empty means unset (compose passes "" for variables the .env leaves blank).
            "issuer": settings.shopper_token_issuer or None,
            "audience": settings.shopper_token_audience or None,
            "leeway_s": settings.shopper_token_leeway_s,
        }
        if secret and secret.get_secret_value():
            if len(secret.get_secret_value().encode()) < 32:
                raise ValueError("SHOPPER_TOKEN_HS256_SECRET must be at least 32 bytes")
            return cls(hs256_secret=secret.get_secret_value(), **common)
        if settings.shopper_token_jwks_file:
            path = Path(settings.shopper_token_jwks_file)
            try:
                jwks = jwt.PyJWKSet.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, jwt.PyJWKError) as exc:
                raise ValueError(f"SHOPPER_TOKEN_JWKS_FILE {path}: not a usable JWKS") from exc
            return cls(jwks=jwks, **common)
        if settings.shopper_token_jwks_url:
            client = jwt.PyJWKClient(settings.shopper_token_jwks_url, cache_keys=True)
            return cls(jwks_client=client, **common)
        return cls(**common)

    @property
    def configured(self) -> bool:
        """Whether any shopper token can be verified at all."""
        return self._configured

    async def verify(self, token: str) -> str:
        """The ``customer_id`` (``sub``) of a valid token; ShopperTokenError otherwise."""
        if not self._configured:
            raise ShopperTokenError("shopper tokens are not accepted by this service")
        try:
            if self.hs256_secret is not None:
                key: Any = self.hs256_secret
                algorithms = ["HS256"]
            else:
                key = await self._public_key(token)
                algorithms = ["RS256", "ES256"]
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_s,
                options={
                    "require": ["sub", "exp"],
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise ShopperTokenError("the shopper token has expired") from None
        except (jwt.PyJWTError, ValueError, KeyError):
            raise ShopperTokenError("the shopper token is not valid") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 200:
            raise ShopperTokenError("the shopper token names no shopper")
        return sub

    async def _public_key(self, token: str) -> Any:
        if self.jwks_client is not None:
            # PyJWKClient fetches over blocking urllib (then caches): keep it off the loop.
            signing = await asyncio.to_thread(self.jwks_client.get_signing_key_from_jwt, token)
            return signing.key
        assert self.jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None and len(self.jwks.keys) == 1:
            return self.jwks.keys[0].key
        return self.jwks[kid].key


# -- the caller and the route dependencies -----------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who is calling: a channel's key, and the shopper it acts for (if by shopper token)."""

    channel: str
    scopes: frozenset[str]
    shopper_id: str | None = None

    def has(self, scope: str) -> bool:
        """Whether the key holds ``scope`` (``admin`` holds them all)."""
        return ADMIN in self.scopes or scope in self.scopes

    def acts_for(self, customer_id: str) -> bool:
        """Whether this caller may see or change ``customer_id``'s data."""
        return self.shopper_id is None or hmac.compare_digest(
            self.shopper_id.encode(), customer_id.encode()
        )

    def check_shopper(self, customer_id: str) -> None:
        """403 unless this caller may act for ``customer_id``."""
        if not self.acts_for(customer_id):
            raise HTTPException(403, detail="the shopper token is for another shopper")


_bearer = HTTPBearer(auto_error=False, description="A channel's API key")
_shopper_header = APIKeyHeader(
    name=SHOPPER_TOKEN_HEADER,
    auto_error=False,
    scheme_name="ShopperToken",
    description="The shopper's JWT (sub = customer_id), for web and app keys",
)


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


def api_key_of(request: Request, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
    """The configured key the request presents; 401 without a valid one."""
    settings: ServiceSettings = request.app.state.runtime.settings
    if credentials is not None and credentials.scheme.lower() == "bearer":
        given = credentials.credentials.encode()
        found: ApiKey | None = None
        for secret, key in settings.api_key_table.items():
            # Constant time, and no early exit: no timing oracle on the keys.
            if hmac.compare_digest(given, secret.encode()):
                found = key
        if found is not None:
            return found
    raise _unauthorized("a valid API key is required (Authorization: Bearer <key>)")


def require(scope: str, *, shopper: bool = False) -> Callable[..., Awaitable[Caller]]:
    """A dependency admitting keys that hold ``scope``.

    With ``shopper=True`` a key holding the ``shopper`` scope is admitted (whatever its
    other scopes) only with a valid shopper token; the :class:`Caller` then says for whom
    (``shopper_id``) and the route must keep to that shopper's data.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: add it to omni_common.auth.SCOPES")

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        token: Annotated[str | None, Depends(_shopper_header)],
    ) -> Caller:
        key = api_key_of(request, credentials)
        if ADMIN in key.scopes:
            return Caller(key.channel, key.scopes)
        # A shopper key is always bound to its token's shopper on shopper routes, whatever
        # else it holds: its checkout.write means "my checkout", not anyone's.
        if shopper and SHOPPER in key.scopes:
            if not token:
                raise _unauthorized(
                    f"the {key.channel} key needs the shopper's token ({SHOPPER_TOKEN_HEADER})"
                )
            tokens: ShopperTokens = request.app.state.shopper_tokens
            try:
                shopper_id = await tokens.verify(token)
            except ShopperTokenError as exc:
                raise _unauthorized(str(exc)) from None
            return Caller(key.channel, key.scopes, shopper_id=shopper_id)
        if scope in key.scopes:
            return Caller(key.channel, key.scopes)
        raise HTTPException(403, detail=f"the {key.channel} key lacks scope {scope}")

    dependency.omni_scope = scope  # type: ignore[attr-defined]
    return dependency


def public(reason: str) -> Callable[[], None]:
    """A dependency declaring a route open without a key on purpose (e.g. a signed
    one-click unsubscribe link); ``reason`` says why, for reviewers and the scope check."""

    def dependency() -> None:
        return None

    dependency.omni_public = reason  # type: ignore[attr-defined]
    return dependency


def api_routes(routes: Any) -> list[Any]:
    """Every ``APIRoute`` among ``routes`` (an app's or router's), through included routers."""
    from fastapi.routing import APIRoute

    found: list[Any] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):  # FastAPI >= 0.165 includes routers lazily
            found.extend(api_routes(route.original_router.routes))
    return found


def declared_scopes(route: Any) -> set[str]:
    """The scopes a FastAPI route's dependencies require (empty: the route checks none;
    ``public`` for routes declared open with :func:`public`)."""
    found: set[str] = set()
    pending = list(getattr(route, "dependant", None).dependencies if route else [])
    while pending:
        dependant = pending.pop()
        scope = getattr(dependant.call, "omni_scope", None)
        if scope:
            found.add(scope)
        if getattr(dependant.call, "omni_public", None):
            found.add("public")
        pending.extend(dependant.dependencies)
    return found


def require_shopper(scope: str) -> Callable[..., Awaitable[Caller]]:
    """A dependency for ``/customers/{customer_id}/...`` routes: keys holding ``scope``
    reach any shopper, ``shopper`` keys only the one their token names (403 otherwise)."""
    inner = require(scope, shopper=True)

    async def dependency(request: Request, caller: Annotated[Caller, Depends(inner)]) -> Caller:
        caller.check_shopper(str(request.path_params.get("customer_id", "")))
        return caller

    return dependency
