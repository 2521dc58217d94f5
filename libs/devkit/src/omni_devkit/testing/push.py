"""A push service on loopback for tests and benchmarks: Web Push and an FCM HTTP v1 look-alike.

Web Push (RFC 8030): :meth:`PushEndpoint.subscribe` plays a browser. It makes a P-256 key
pair and an auth secret and returns the ``PushSubscription.toJSON()`` a browser would hand
to the web app. Every message posted to that endpoint is checked as a real push service
and user agent would: the VAPID JWT (RFC 8292) must be signed by the key in ``k`` (and, when
``vapid_public_key`` is given, be that key), ``aud`` must be this origin and ``exp`` within
24 h; the body must decrypt (RFC 8291, ``aes128gcm``) with the subscription's private key.
A subscription can be made ``gone`` (410), ``not_found`` (404) or ``flaky`` (429 first), or
be a push service one should not trust: ``hang`` (never answers), ``redirect`` (307 elsewhere),
``huge`` (a refusal whose body is tens of megabytes; ``huge_bytes_sent`` says how much of it
the client took).

FCM HTTP v1: ``POST /v1/projects/{project}/messages:send`` checks the request shape
(bearer token, ``message.token``, string-only ``data``) and answers like Google does,
including ``404 UNREGISTERED`` for a token made ``gone``. It is a shape check, not Google.

Google's OAuth token endpoint for service accounts: :meth:`PushEndpoint.service_account`
makes a key (the JSON Google hands out, its ``token_uri`` here); ``POST /token`` takes the
JWT bearer grant (RFC 7523), verifies the assertion's RS256 signature with that key, its
``iss``, ``aud``, ``scope`` and lifetime, and issues access tokens that live
``expires_in`` seconds, which the FCM look-alike then accepts (401 once expired or revoked).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import http_ece
import jwt
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from omni_devkit.devstack.process import free_port


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    """Encode as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class VapidError(ValueError):
    """The VAPID authorisation of a push request is missing or wrong."""


def verify_vapid(
    authorization: str, audience: str, expected_key: str | None = None
) -> dict[str, Any]:
    """Check an RFC 8292 ``Authorization: vapid t=<jwt>, k=<key>`` header; returns the claims."""
    scheme, _, params = authorization.partition(" ")
    if scheme.lower() != "vapid":
        raise VapidError(f"scheme {scheme!r} is not vapid")
    parts = dict(item.strip().split("=", 1) for item in params.split(",") if "=" in item)
    token, key = parts.get("t"), parts.get("k")
    if not token or not key:
        raise VapidError("vapid needs t= and k=")
    if expected_key is not None and key.rstrip("=") != expected_key.rstrip("="):
        raise VapidError("signed with another application server key")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(key))
    try:
        head_b64, claims_b64, sig_b64 = token.split(".")
    except ValueError:
        raise VapidError("the JWT does not have three parts") from None
    header = json.loads(b64url_decode(head_b64))
    if header.get("alg") != "ES256":
        raise VapidError(f"JWT alg {header.get('alg')!r} is not ES256")
    raw = b64url_decode(sig_b64)
    if len(raw) != 64:
        raise VapidError("an ES256 signature is 64 bytes (r || s)")
    signature = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
    try:
        public.verify(signature, f"{head_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise VapidError("the JWT signature does not verify") from None
    claims: dict[str, Any] = json.loads(b64url_decode(claims_b64))
    if claims.get("aud") != audience:
        raise VapidError(f"aud {claims.get('aud')!r} is not {audience!r}")
    now = time.time()
    if not now < float(claims.get("exp", 0)) <= now + 24 * 3600:
        raise VapidError("exp must be in the future and within 24 hours")
    if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
        raise VapidError("sub must be a mailto: or https: contact")
    return claims


@dataclass
class PushMessage:
    """One push message the endpoint accepted and decrypted."""

    subscription_id: str
    payload: bytes
    headers: dict[str, str]  # lower-case names
    claims: dict[str, Any]

    def json(self) -> Any:
        """The decrypted payload as JSON."""
        return json.loads(self.payload)


@dataclass
class _Subscription:
    id: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    behaviour: str
    failures_left: int = 0
    redirect_to: str | None = None


@dataclass
class FcmMessage:
    """One FCM HTTP v1 request the endpoint accepted."""

    project: str
    token: str
    message: dict[str, Any]
    authorization: str


@dataclass
class PushEndpoint:
    """The loopback push service; ``async with PushEndpoint() as push: ...``."""

    host: str = "127.0.0.1"
    port: int = 0
    vapid_public_key: str | None = None
    fcm_access_token: str = "test-fcm-token"
    messages: list[PushMessage] = field(default_factory=list)
    fcm_messages: list[FcmMessage] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    # Access tokens issued by the token endpoint: token -> (expiry on time.time(), account).
    issued: dict[str, tuple[float, str]] = field(default_factory=dict)
    _accounts: dict[str, tuple[Any, int]] = field(default_factory=dict)
    # Requests that reached a ``hang`` subscription (each is held until the endpoint stops).
    hanging: int = 0
    huge_bytes_sent: int = 0
    HUGE_BODY_BYTES = 32 * 1024 * 1024
    _subs: dict[str, _Subscription] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        """``http://host:port``, the VAPID audience of this push service."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> PushEndpoint:
        """Listen on a free port."""
        self.port = self.port or free_port(self.host)
        app = web.Application()
        app.router.add_post("/push/{sub_id}", self._push)
        app.router.add_post("/v1/projects/{project}/messages:send", self._fcm)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PushEndpoint:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- playing the browser and the app -------------------------------------------------------

    def subscribe(
        self, behaviour: str = "ok", failures: int = 0, redirect_to: str | None = None
    ) -> dict[str, Any]:
        """A new browser subscription (``PushSubscription.toJSON()``).

        ``behaviour``: ``ok``; ``gone`` (410) or ``not_found`` (404): the push service forgot
        it; ``flaky``: ``failures`` answers 429 with ``Retry-After: 0`` first, then ok;
        ``hang``: the request is never answered; ``redirect``: 307 to ``redirect_to``;
        ``huge``: 400 with a body of :attr:`HUGE_BODY_BYTES`.
        """
        sub_id = uuid.uuid4().hex
        private_key = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        self._subs[sub_id] = _Subscription(
            sub_id, private_key, auth, behaviour, failures, redirect_to
        )
        public = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "endpoint": f"{self.origin}/push/{sub_id}",
            "keys": {"p256dh": b64url_encode(public), "auth": b64url_encode(auth)},
        }

    def fcm_token(self, behaviour: str = "ok") -> str:
        """A native app's registration token (``gone`` tokens answer 404 UNREGISTERED)."""
        token = f"fcm-{uuid.uuid4().hex}"
        self._tokens[token] = behaviour
        return token

    def service_account(self, project: str = "omni-test", expires_in: int = 3600) -> dict[str, Any]:
        """A service account key as Google gives it out, whose ``token_uri`` is this endpoint;
        the access tokens it gets live ``expires_in`` seconds."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"notify-{uuid.uuid4().hex[:8]}@{project}.iam.gserviceaccount.com"
        self._accounts[email] = (key.public_key(), expires_in)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "type": "service_account",
            "project_id": project,
            "private_key_id": uuid.uuid4().hex,
            "private_key": pem.decode(),
            "client_email": email,
            "client_id": str(uuid.uuid4().int)[:21],
            "token_uri": f"{self.origin}/token",
        }

    def revoke_tokens(self) -> None:
        """Every access token issued so far stops working (FCM answers 401)."""
        self.issued.clear()

    def received(self, subscription: dict[str, Any]) -> list[PushMessage]:
        """The messages decrypted for ``subscription``."""
        sub_id = subscription["endpoint"].rsplit("/", 1)[-1]
        return [m for m in self.messages if m.subscription_id == sub_id]

    async def wait_for(
        self,
        subscription: dict[str, Any],
        count: int = 1,
        timeout: float = 15.0,  # noqa: ASYNC109
    ) -> list[PushMessage]:
        """Wait until ``count`` messages for ``subscription`` arrived."""
        deadline = time.monotonic() + timeout
        while len(found := self.received(subscription)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} push messages in {timeout:g}s")
            await asyncio.sleep(0.05)
        return found

    # -- the push service ------------------------------------------------------------------------

    async def _push(self, request: web.Request) -> web.StreamResponse:
        sub = self._subs.get(request.match_info["sub_id"])
        if sub is None or sub.behaviour == "not_found":
            return web.Response(status=404, text="no such subscription")
        if sub.behaviour == "gone":
            return web.Response(status=410, text="subscription expired")
        if sub.behaviour == "hang":
            self.hanging += 1
            await asyncio.Event().wait()  # until the endpoint stops (the task is cancelled)
        if sub.behaviour == "redirect":
            return web.Response(status=307, headers={"Location": sub.redirect_to or "/"})
        if sub.behaviour == "huge":
            return await self._huge(request)
        if sub.failures_left > 0:
            sub.failures_left -= 1
            return web.Response(status=429, headers={"Retry-After": "0"}, text="slow down")
        try:
            claims = verify_vapid(
                request.headers.get("Authorization", ""), self.origin, self.vapid_public_key
            )
        except (VapidError, ValueError) as exc:
            self.rejected.append(f"vapid: {exc}")
            return web.Response(status=401, text=str(exc))
        if request.headers.get("Content-Encoding") != "aes128gcm":
            self.rejected.append("content-encoding")
            return web.Response(status=415, text="aes128gcm only (RFC 8291)")
        if "TTL" not in request.headers:
            self.rejected.append("ttl")
            return web.Response(status=400, text="TTL header required (RFC 8030)")
        body = await request.read()
        try:
            payload = http_ece.decrypt(
                body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm"
            )
        except Exception as exc:
            self.rejected.append(f"decrypt: {exc}")
            return web.Response(status=400, text=f"cannot decrypt: {exc}")
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.messages.append(PushMessage(sub.id, payload, headers, claims))
        return web.Response(status=201, headers={"Location": f"{self.origin}/msg/{uuid.uuid4()}"})

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=400, headers={"Content-Type": "text/plain"})
        response.content_length = self.HUGE_BODY_BYTES
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            while self.huge_bytes_sent < self.HUGE_BODY_BYTES:
                await response.write(chunk)
                self.huge_bytes_sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return response

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        assertion = str(form.get("assertion", ""))
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False})["iss"]
            public_key, expires_in = self._accounts[issuer]
            claims = jwt.decode(
                assertion,
                public_key,
                algorithms=["RS256"],
                audience=f"{self.origin}/token",
                issuer=issuer,
                options={"require": ["iat", "exp", "scope"]},
            )
            if "https://www.googleapis.com/auth/firebase.messaging" not in claims["scope"]:
                raise ValueError("scope")
            if claims["exp"] - claims["iat"] > 3600:
                raise ValueError("an assertion lives an hour at most")
        except (jwt.PyJWTError, KeyError, ValueError, TypeError) as exc:
            self.rejected.append(f"token: {exc}")
            return web.json_response({"error": "invalid_grant"}, status=400)
        token = f"ya29.{uuid.uuid4().hex}"
        self.issued[token] = (time.time() + expires_in, issuer)
        return web.json_response(
            {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}
        )

    def _authorised(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "Bearer":
            return False
        if token == self.fcm_access_token:
            return True
        expiry = self.issued.get(token)
        return expiry is not None and time.time() < expiry[0]

    async def _fcm(self, request: web.Request) -> web.Response:
        if not self._authorised(request.headers.get("Authorization")):
            return _fcm_error(401, "UNAUTHENTICATED", "bad credentials")
        try:
            body = await request.json()
            message = body["message"]
            token = message["token"]
            data = message.get("data", {})
            if not isinstance(token, str) or not isinstance(data, dict):
                raise TypeError("token must be a string and data an object")
            if not all(isinstance(v, str) for v in data.values()):
                raise TypeError("data values must be strings")
            if "notification" not in message and not data:
                raise TypeError("a message needs notification or data")
        except (ValueError, KeyError, TypeError) as exc:
            self.rejected.append(f"fcm: {exc}")
            return _fcm_error(400, "INVALID_ARGUMENT", str(exc))
        behaviour = self._tokens.get(token)
        if behaviour is None or behaviour == "gone":
            return _fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
        project = request.match_info["project"]
        self.fcm_messages.append(
            FcmMessage(project, token, message, request.headers["Authorization"])
        )
        return web.json_response({"name": f"projects/{project}/messages/{uuid.uuid4().hex}"})


def _fcm_error(status: int, code: str, text: str, detail: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": text, "status": code}
    if detail:
        error["details"] = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": detail}
        ]
    return web.json_response({"error": error}, status=status)
