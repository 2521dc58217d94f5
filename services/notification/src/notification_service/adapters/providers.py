"""The providers that deliver messages: SMTP for e-mail, Web Push and FCM HTTP v1 for push.

Every provider raises the same errors, so the dispatcher treats them alike:
:class:`TransientError` (429, 5xx, connection trouble: retried with backoff),
:class:`GoneAddress` (the subscription or token no longer exists: removed, next channel),
:class:`InvalidAddress` (the address cannot be used at all) and :class:`ProviderError`
(any other refusal). Push providers share one interface, :class:`PushProvider`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol

import aiohttp
import aiosmtplib
import httpx
from email_validator import EmailNotValidError, validate_email
from py_vapid import Vapid
from pywebpush import WebPushException, webpush_async

log = logging.getLogger(__name__)


class ProviderError(Exception):
    """A provider refused a message (permanently, for this address)."""


class TransientError(ProviderError):
    """Worth retrying later (rate limited, provider down); ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GoneAddress(ProviderError):
    """The push subscription or app token no longer exists (404/410, UNREGISTERED)."""


class InvalidAddress(ProviderError):
    """The address is malformed or refused by the relay."""


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

    async def send(self, to: str, content: EmailContent) -> str:
        """Hand the message to the relay; returns its Message-ID."""
        address = normalised_email(to)
        message = self.build(address, content)
        try:
            await aiosmtplib.send(
                message, hostname=self.host, port=self.port, timeout=self.timeout, **self.options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(400 <= c < 500 for c in codes):
                raise TransientError(f"recipient deferred ({codes})") from None
            raise InvalidAddress(f"recipient refused by the relay ({codes})") from None
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise TransientError(f"SMTP {exc.code} {exc.message}") from None
            raise ProviderError(f"SMTP {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
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

    async def send(self, address: Any, content: PushContent) -> str:
        """Deliver ``content`` to ``address``; returns the provider's message id."""
        ...


class WebPush:
    """Web Push (RFC 8030) with aes128gcm payloads (RFC 8291) and VAPID (RFC 8292)."""

    def __init__(
        self, vapid: Vapid, subject: str, ttl: int, session: aiohttp.ClientSession
    ) -> None:
        self.vapid = vapid
        self.subject = subject
        self.ttl = ttl
        self.session = session

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

    async def send(self, address: dict[str, Any], content: PushContent) -> str:
        """Encrypt and post to the subscription's endpoint."""
        payload = json.dumps(
            {"title": content.title, "body": content.body, "url": content.url, **content.data}
        )
        try:
            response = await webpush_async(
                subscription_info=address,
                data=payload,
                vapid_private_key=self.vapid,
                vapid_claims={"sub": self.subject},  # a fresh dict: the library fills aud/exp
                ttl=self.ttl,
                headers={"Topic": content.topic, "Urgency": content.urgency},
                timeout=10,
                aiohttp_session=self.session,
            )
        except WebPushException as exc:
            if exc.response is None:
                # Raised before any request: the subscription's keys cannot be used.
                raise InvalidAddress(f"malformed push subscription: {exc.message}") from None
            status = exc.response.status
            if status in (404, 410):
                raise GoneAddress(f"push subscription gone ({status})") from None
            if status == 429 or (status is not None and status >= 500):
                raise TransientError(
                    f"push service answered {status}",
                    _retry_after(exc.response.headers.get("Retry-After")),
                ) from None
            raise ProviderError(f"push service refused the message ({status})") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"push service unreachable: {type(exc).__name__}") from None
        except (ValueError, TypeError, KeyError) as exc:
            # Keys that are not a P-256 point / 16-byte secret: the subscription is unusable.
            raise InvalidAddress(f"malformed push subscription: {exc}") from None
        assert not isinstance(response, str)
        return response.headers.get("Location") or content.topic


class FcmPush:
    """Firebase Cloud Messaging HTTP v1 (``projects/{id}/messages:send``) for app tokens.

    The OAuth access token comes from settings (a sidecar or workload identity refreshes it).
    """

    def __init__(
        self, endpoint: str, project_id: str, access_token: str, client: httpx.AsyncClient
    ) -> None:
        self.url = f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.access_token = access_token
        self.client = client

    async def send(self, address: str, content: PushContent) -> str:
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
            response = await self.client.post(
                self.url, json=body, headers={"Authorization": f"Bearer {self.access_token}"}
            )
        except httpx.HTTPError as exc:
            raise TransientError(f"FCM unreachable: {type(exc).__name__}") from None
        if response.status_code == 200:
            return str(response.json().get("name", content.topic))
        detail = response.text[:300]
        if response.status_code == 404 or "UNREGISTERED" in detail:
            raise GoneAddress("FCM token unregistered")
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientError(
                f"FCM answered {response.status_code}",
                _retry_after(response.headers.get("Retry-After")),
            )
        if response.status_code == 400:
            raise InvalidAddress(f"FCM refused the message: {detail}")
        raise ProviderError(f"FCM answered {response.status_code}")
