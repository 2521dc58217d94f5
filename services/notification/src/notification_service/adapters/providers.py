"""The providers that deliver messages: SMTP for e-mail, Web Push and FCM HTTP v1 for push.

Every provider raises the same errors, so the dispatcher treats them alike:
:class:`TransientError` (429, 5xx, connection trouble: retried with backoff; :class:`TimedOut`
when the time given ran out), :class:`GoneAddress` (the subscription or token no longer exists:
removed, next channel), :class:`InvalidAddress` (the address cannot be used at all;
:class:`RefusedEndpoint` when it points where the service must not call) and
:class:`ProviderError` (any other refusal). Each carries a ``code``, the only part of a
failure the shopper or a channel is told (``endpoint_refused``, ``endpoint_gone``,
``timeout``, ...); the message is for the logs. Every call takes the deadline it must be over by.
Push providers share one interface, :class:`PushProvider`.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import httpx
import jwt
from email_validator import EmailNotValidError, validate_email
from py_vapid import Vapid
from pywebpush import WebPusher, WebPushException

from notification_service.adapters.outbound import (
    EndpointPolicy,
    GuardedResolver,
    RefusedAddress,
    refused_by_policy,
)

log = logging.getLogger(__name__)

# What is read of a provider's answer beyond its status line and headers: enough for FCM's
# error JSON, never a push service's whole page.
MAX_ANSWER_BYTES = 16 * 1024


class ProviderError(Exception):
    """A provider refused a message (permanently, for this address)."""

    code: ClassVar[str] = "rejected"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]


class TransientError(ProviderError):
    """Worth retrying later (rate limited, provider down); ``retry_after`` in seconds."""

    code: ClassVar[str] = "unavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TimedOut(TransientError):
    """The provider did not answer in the time the call had."""

    code: ClassVar[str] = "timeout"


class GoneAddress(ProviderError):
    """The push subscription or app token no longer exists (404/410, UNREGISTERED)."""

    code: ClassVar[str] = "endpoint_gone"


class InvalidAddress(ProviderError):
    """The address is malformed or refused by the relay."""

    code: ClassVar[str] = "invalid_address"


class RefusedEndpoint(InvalidAddress):
    """The address points where the service must not call (see ``adapters.outbound``), or its
    push service tried to send the request elsewhere."""

    code: ClassVar[str] = "endpoint_refused"


class NotConfigured(ProviderError):
    """No provider for the channel in this deployment."""

    code: ClassVar[str] = "not_configured"


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (the event loop's clock), never quite none: a call
    given no time at all times out at once rather than waiting without a bound."""
    return max(0.001, deadline - asyncio.get_running_loop().time())


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


# -- e-mail --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmailContent:
    """What goes into one e-mail."""

    subject: str
    text: str
    html: str
    message_id: str
    unsubscribe_url: str | None = None


def normalised_email(address: str) -> str:
    """The address in normal form; :class:`InvalidAddress` if it is not one."""
    try:
        return validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidAddress(f"invalid e-mail address: {exc}") from None


class SmtpEmail:
    """Sends e-mail to an SMTP relay with aiosmtplib."""

    def __init__(
        self, host: str, port: int, sender: str, *, timeout: float, options: dict[str, Any]
    ) -> None:
        self.host, self.port, self.sender = host, port, sender
        self.timeout = timeout
        self.options = {k: v for k, v in options.items() if v is not None}

    def build(self, to: str, content: EmailContent) -> EmailMessage:
        """The MIME message (text and HTML alternatives; RFC 8058 headers for marketing)."""
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = content.subject
        message["Date"] = formatdate(usegmt=True)
        # Stable per notification: a resend after a crash is recognisably the same message.
        message["Message-ID"] = content.message_id
        if content.unsubscribe_url:
            message["List-Unsubscribe"] = f"<{content.unsubscribe_url}>"
            message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        message.set_content(content.text)
        message.add_alternative(content.html, subtype="html")
        return message

    async def send(self, to: str, content: EmailContent, *, deadline: float) -> str:
        """Hand the message to the relay by ``deadline``; returns its Message-ID."""
        address = normalised_email(to)
        message = self.build(address, content)
        try:
            # aiosmtplib's own timeout is per command: the conversation as a whole is bounded
            # here, so a relay answering each command slowly cannot outlast the call.
            async with asyncio.timeout_at(deadline):
                await aiosmtplib.send(
                    message,
                    hostname=self.host,
                    port=self.port,
                    timeout=min(self.timeout, remaining(deadline)),
                    **self.options,
                )
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            raise TimedOut("SMTP relay did not answer in time") from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(400 <= c < 500 for c in codes):
                raise TransientError(f"recipient deferred ({codes})") from None
            raise InvalidAddress(f"recipient refused by the relay ({codes})") from None
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise TransientError(f"SMTP {exc.code} {exc.message}") from None
            raise ProviderError(f"SMTP {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TransientError(f"SMTP relay unreachable: {type(exc).__name__}: {exc}") from None
        return content.message_id


# -- push ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushContent:
    """What goes into one push message (the payload the service worker or app shows)."""

    title: str
    body: str
    url: str | None
    topic: str
    data: dict[str, str]
    urgency: str = "normal"


class PushProvider(Protocol):
    """A push service: Web Push subscriptions or native app tokens."""

    async def send(self, address: Any, content: PushContent, *, deadline: float) -> str:
        """Deliver ``content`` to ``address`` by ``deadline`` (the event loop's clock); returns
        the provider's message id."""
        ...


def web_push_session(policy: EndpointPolicy) -> aiohttp.ClientSession:
    """The HTTP session Web Push requests go through: its resolver applies ``policy`` to every
    address a name resolves to, when the connection is made."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), limit=100)
    # No cookies: a push service's answer must not reach another's request.
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


class WebPush:
    """Web Push (RFC 8030) with aes128gcm payloads (RFC 8291) and VAPID (RFC 8292).

    pywebpush encrypts; the request is ours: to an endpoint the policy allows, never
    following a redirect, reading the status and headers and none of the body.
    """

    def __init__(
        self,
        vapid: Vapid,
        subject: str,
        ttl: int,
        session: aiohttp.ClientSession,
        policy: EndpointPolicy,
        request_timeout: float = 10.0,
    ) -> None:
        self.vapid = vapid
        self.subject = subject
        self.ttl = ttl
        self.session = session
        self.policy = policy
        self.request_timeout = request_timeout

    @classmethod
    def load_key(cls, *, pem_file: str | None, pem: str | None) -> Vapid | None:
        """The VAPID key from a PEM file, or from a string: PEM, or base64url of the raw key
        (as web-push tools print it) or of its DER; None when neither is set."""
        if pem_file:
            return Vapid.from_file(private_key_file=pem_file)
        if pem and pem.lstrip().startswith("-----BEGIN"):
            return Vapid.from_pem(pem.strip().encode())
        if pem:
            return Vapid.from_string(private_key=pem)
        return None

    def _encrypted(self, address: dict[str, Any], content: PushContent) -> bytes:
        payload = json.dumps(
            {"title": content.title, "body": content.body, "url": content.url, **content.data}
        )
        try:
            body = WebPusher(address).encode(payload.encode(), "aes128gcm")["body"]
        except (WebPushException, ValueError, TypeError, KeyError, binascii.Error) as exc:
            # Keys that are not a P-256 point / 16-byte secret: the subscription is unusable.
            raise InvalidAddress(f"malformed push subscription: {exc}") from None
        return bytes(body)

    async def send(self, address: dict[str, Any], content: PushContent, *, deadline: float) -> str:
        """Encrypt and post to the subscription's endpoint."""
        endpoint = str(address.get("endpoint", ""))
        try:
            self.policy.check_url(endpoint)
        except RefusedAddress as exc:
            raise RefusedEndpoint(f"push endpoint refused: {exc}") from None
        body = self._encrypted(address, content)
        url = urlsplit(endpoint)
        claims = {
            "sub": self.subject,
            "aud": f"{url.scheme}://{url.netloc}",
            # RFC 8292 allows a day at most; a push service may refuse anything near it.
            "exp": int(time.time()) + 12 * 3600,
        }
        headers = {
            "TTL": str(self.ttl),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Topic": content.topic,
            "Urgency": content.urgency,
            **self.vapid.sign(claims),
        }
        try:
            async with self.session.post(
                endpoint,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=min(remaining(deadline), self.request_timeout)),
            ) as response:
                status = response.status
                location = response.headers.get("Location")
                retry_after = response.headers.get("Retry-After")
                if status >= 300:
                    response.close()  # its body stays unread: drop the connection instead
        except TimeoutError:
            raise TimedOut("push service did not answer in time") from None
        except aiohttp.InvalidURL:
            raise RefusedEndpoint("push endpoint is not a usable URL") from None
        except (aiohttp.ClientError, OSError) as exc:
            if refused_by_policy(exc):
                raise RefusedEndpoint("push endpoint resolves to a refused address") from None
            raise TransientError(f"push service unreachable: {type(exc).__name__}") from None
        if 300 <= status < 400:
            raise RefusedEndpoint(f"push service redirected ({status}); not followed")
        if status in (404, 410):
            raise GoneAddress(f"push subscription gone ({status})")
        if status == 429 or status >= 500:
            raise TransientError(f"push service answered {status}", _retry_after(retry_after))
        if status >= 400:
            raise ProviderError(f"push service refused the message ({status})")
        return location or content.topic


class ServiceAccountTokens:
    """OAuth access tokens for FCM from a Google service account key (the JSON file Google
    gives out): the JWT bearer grant (RFC 7523), a token at a time, fetched again before it
    expires or when FCM refuses it. Call it for the current token."""

    SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
    GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

    def __init__(self, key: dict[str, Any], client: httpx.AsyncClient) -> None:
        self.client_email = str(key["client_email"])
        self.token_uri = str(key["token_uri"])
        self.key_id = key.get("private_key_id")
        self._private_key = key["private_key"]
        self.client = client
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    @staticmethod
    def load(path: str) -> dict[str, Any]:
        """The key file's content; ValueError, naming what is missing, if it is not one."""
        try:
            key = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"not a readable JSON file ({type(exc).__name__})") from None
        if not isinstance(key, dict):
            raise ValueError("not a service account key (a JSON object)")
        missing = [f for f in ("client_email", "private_key", "token_uri") if not key.get(f)]
        if missing:
            raise ValueError(f"not a service account key (no {', '.join(missing)})")
        return key

    async def __call__(self, *, refresh: bool = False) -> str:
        """The current access token; a new one when asked, or when this one nears its end."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if refresh or self._token is None or loop.time() >= self._refresh_at:
                self._token, lifetime = await self._fetch()
                # Early enough that a token is never used in its last moments.
                self._refresh_at = loop.time() + lifetime - min(300.0, lifetime / 10)
            return self._token

    async def _fetch(self) -> tuple[str, float]:
        now = int(time.time())
        assertion = jwt.encode(
            {
                "iss": self.client_email,
                "scope": self.SCOPE,
                "aud": self.token_uri,
                "iat": now,
                "exp": now + 3600,
            },
            self._private_key,
            algorithm="RS256",
            headers={"kid": self.key_id} if self.key_id else None,
        )
        try:
            response = await self.client.post(
                self.token_uri, data={"grant_type": self.GRANT, "assertion": assertion}
            )
        except httpx.HTTPError as exc:
            raise TransientError(f"token endpoint unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise TransientError(f"token endpoint answered {response.status_code}")
        try:
            answer = response.json()
            return str(answer["access_token"]), float(answer.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise TransientError("token endpoint answered no access token") from None


class FcmPush:
    """Firebase Cloud Messaging HTTP v1 (``projects/{id}/messages:send``) for app tokens.

    The OAuth access token comes from ``access_token`` (a callable returning the current one,
    e.g. a service account's, refreshed as it expires) and is asked again once when FCM
    answers 401.
    """

    def __init__(
        self,
        endpoint: str,
        project_id: str,
        access_token: Any,
        client: httpx.AsyncClient,
    ) -> None:
        self.url = f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.access_token = access_token
        self.client = client

    async def _token(self, *, refresh: bool = False) -> str:
        if isinstance(self.access_token, str):
            return self.access_token
        return str(await self.access_token(refresh=refresh))

    async def send(self, address: str, content: PushContent, *, deadline: float) -> str:
        """Post one message to one registration token."""
        body = {
            "message": {
                "token": address,
                "notification": {"title": content.title, "body": content.body},
                "data": {**content.data, **({"url": content.url} if content.url else {})},
                "android": {
                    "collapse_key": content.topic,
                    "priority": "high" if content.urgency == "high" else "normal",
                },
                "apns": {"headers": {"apns-collapse-id": content.topic}},
            }
        }
        try:
            async with asyncio.timeout_at(deadline):
                status, answer, retry_after = await self._post(body, await self._token())
                if status == 401 and not isinstance(self.access_token, str):
                    # The token expired early or was revoked: one fresh one, one more try.
                    token = await self._token(refresh=True)
                    status, answer, retry_after = await self._post(body, token)
        except TimeoutError:
            raise TimedOut("FCM did not answer in time") from None
        except httpx.HTTPError as exc:
            raise TransientError(f"FCM unreachable: {type(exc).__name__}") from None
        if status == 200:
            try:
                return str(json.loads(answer).get("name", content.topic))
            except (ValueError, AttributeError):
                return content.topic
        detail = answer[:300].decode(errors="replace")
        if status == 404 or "UNREGISTERED" in detail:
            raise GoneAddress("FCM token unregistered")
        if status == 429 or status >= 500:
            raise TransientError(f"FCM answered {status}", _retry_after(retry_after))
        if status == 400:
            raise InvalidAddress(f"FCM refused the message: {detail}")
        raise ProviderError(f"FCM answered {status}")

    async def _post(self, body: dict[str, Any], token: str) -> tuple[int, bytes, str | None]:
        """``(status, at most MAX_ANSWER_BYTES of the answer, Retry-After)``."""
        async with self.client.stream(
            "POST", self.url, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            answer = b""
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) >= MAX_ANSWER_BYTES:
                    break
            return (
                response.status_code,
                answer[:MAX_ANSWER_BYTES],
                response.headers.get("Retry-After"),
            )
