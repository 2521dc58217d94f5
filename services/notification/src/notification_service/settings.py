"""Settings of the notification service: the platform's plus its own (env vars, 12-factor)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from omni_common.settings import Duration, ServiceSettings
from pydantic import Field, SecretStr, field_validator, model_validator

from notification_service.domain.model import Budget, Purpose, PurposePolicy


class NotificationSettings(ServiceSettings):
    """Notification-specific knobs; each is also an env var of the same name in upper case.

    - ``SMTP_URL`` (``smtp://[user:pass@]host:port``, ``smtps://`` for implicit TLS,
      ``?starttls=true``), or ``SMTP_HOST``/``SMTP_PORT``; ``SMTP_FROM`` the sender;
    - ``VAPID_PRIVATE_KEY_FILE`` (PEM) or ``VAPID_PRIVATE_KEY``, ``VAPID_SUBJECT``: Web Push,
      to endpoints ``NOTIFY_PUSH_PRIVATE_ENDPOINTS`` allows;
    - ``FCM_SERVICE_ACCOUNT_FILE`` or ``FCM_PROJECT_ID`` + ``FCM_ACCESS_TOKEN``,
      ``FCM_ENDPOINT``: native app push (FCM v1);
    - ``NOTIFY_PUBLIC_URL``: where this service is reached from the outside (unsubscribe
      links); ``SHOP_URL``: the web shop (links back to carts); ``UNSUBSCRIBE_SECRET``
      (required outside development), ``UNSUBSCRIBE_SECRET_PREVIOUS``,
      ``UNSUBSCRIBE_TOKEN_MAX_AGE_DAYS``, ``NOTIFY_UNSUBSCRIBE_PER_MINUTE``;
    - sending once: ``NOTIFY_SEND_LEASE_S`` and the shorter ``NOTIFY_DELIVERY_DEADLINE_S``;
    - ``CART_REMINDER_SECOND_AFTER`` (default 24 h; seconds or ISO 8601 duration),
      the contact budget (``NOTIFY_BUDGET_*``) and digest, ``NOTIFY_DEFAULT_TIME_ZONE``,
      ``NOTIFY_DEFAULT_LANGUAGE``, ``NOTIFY_TEMPLATES_DIR`` (replaces the packaged templates).
    """

    service_name: str = "notification"
    # No shopper waits on its consumers: under load, events gather for a moment and are
    # handled in lots (see ServiceSettings.consumer_linger_ms).
    consumer_linger_ms: int = Field(default=100, ge=0, le=1000)
    outbox_relay_linger_ms: int = Field(default=50, ge=0, le=1000)

    smtp_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "shop@omni.example"
    smtp_timeout_s: float = Field(default=10.0, gt=0)

    vapid_private_key_file: str | None = None
    vapid_private_key: SecretStr | None = None
    vapid_public_key: str | None = None
    vapid_subject: str = "mailto:ops@omni.example"
    push_ttl_s: int = Field(default=24 * 3600, ge=0)
    # A push subscription's endpoint is the shopper's to choose: deny keeps it outside the
    # service's own network (https, public addresses only, checked when connecting). allow
    # is for a developer's machine and tests, whose push service runs on loopback.
    notify_push_private_endpoints: Literal["allow", "deny"] = "deny"
    # One request to a push service at most (each device, each attempt).
    notify_push_timeout_s: float = Field(default=5.0, gt=0)

    fcm_project_id: str | None = None
    fcm_access_token: SecretStr | None = None
    # A Google service account key (JSON): access tokens are fetched and refreshed from it
    # (the JWT bearer grant); wins over FCM_ACCESS_TOKEN, which expires within the hour.
    fcm_service_account_file: str | None = None
    fcm_endpoint: str = "https://fcm.googleapis.com"

    notify_public_url: str = "http://127.0.0.1:8004"
    shop_url: str = "http://127.0.0.1:3000"
    # Empty: a random secret per process (links die with it), in development only: elsewhere
    # the service refuses to start without one (see startup_refusals).
    unsubscribe_secret: SecretStr = SecretStr("")
    # The secret being rotated out: links it signed still verify; new ones use the current.
    unsubscribe_secret_previous: SecretStr = SecretStr("")
    # Longer than any mail client keeps a message's link alive, short enough that a leaked
    # link does not work forever.
    unsubscribe_token_max_age_days: float = Field(default=90.0, gt=0)
    # Requests to /unsubscribe per client address per minute (GET and POST together).
    notify_unsubscribe_per_minute: int = Field(default=60, ge=1)

    cart_reminder_second_after: Duration = timedelta(hours=24)
    # The contact budget: per shopper, over a rolling window, every channel counted, a digest
    # once. Marketing goes only while the shopper had fewer contacts than its budget, else it
    # waits for the next slot inside the budget and outside quiet hours (never dropped, unless
    # that slot is more than NOTIFY_DEFER_MAX_HOURS after it was first decided: by then it
    # would not be news). Transactional messages are never held back; they use the budget up
    # unless NOTIFY_BUDGET_COUNTS_TRANSACTIONAL is false.
    notify_budget_window_hours: float = Field(default=24.0, gt=0)
    notify_budget_marketing: int = Field(default=2, ge=1)
    notify_budget_counts_transactional: bool = True
    notify_defer_max_hours: float = Field(default=72.0, gt=0)
    # Marketing messages that come due together go as one digest; a message may wait this long
    # for others to join it (0: only those due at the same moment).
    notify_digest_wait_s: float = Field(default=0.0, ge=0)
    notify_default_time_zone: str = "UTC"
    notify_default_language: str = "en"
    notify_templates_dir: str | None = None

    # Provider calls: attempts per channel on 429/5xx, with exponential backoff.
    notify_send_attempts: int = Field(default=3, ge=1)
    notify_retry_backoff_s: float = Field(default=0.2, gt=0)
    notify_retry_backoff_max_s: float = Field(default=5.0, gt=0)
    # A message claimed for sending longer ago than this is taken as interrupted by a crash.
    notify_send_lease_s: float = Field(default=60.0, gt=0)
    # One delivery (every channel, device and retry) is over by then, and its outcome is
    # recorded before the lease runs out: a live send is never taken over.
    notify_delivery_deadline_s: float = Field(default=30.0, gt=0)
    notify_dispatch_concurrency: int = Field(default=4, ge=1)
    # New messages wake the dispatcher once committed; the poll finds retries come due and
    # messages queued by other instances.
    notify_dispatch_poll_s: float = Field(default=2.0, gt=0)
    notify_timer_poll_s: float = Field(default=0.5, gt=0)
    # Shoppers told per transaction when a SKU is back: each takes an advisory lock until the
    # batch commits, and PostgreSQL's lock table is shared by every session.
    notify_fanout_batch: int = Field(default=200, ge=1, le=5000)
    # The largest page of GET /customers/{id}/notifications.
    max_page_size: int = Field(default=200, ge=1)

    # Both are otherwise only read when a message is decided or rendered, long after a
    # start-up that looked fine: a mistyped zone would silently mean UTC.
    @field_validator("notify_default_time_zone")
    @classmethod
    def _a_known_time_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (UTC, Europe/Paris)") from None
        return value

    # Checked here too (UnsubscribeTokens refuses it) so that it stops the service with the
    # settings' one-line message, which never quotes a secret, rather than a traceback.
    @field_validator("unsubscribe_secret", "unsubscribe_secret_previous")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if 0 < len(value.get_secret_value().encode()) < 16:
            raise ValueError("needs at least 16 bytes")
        return value

    def startup_refusals(self) -> list[str]:
        """Outside development, one-click unsubscribe links must verify on every replica and
        after every restart: a secret per process would break them."""
        refusals = super().startup_refusals()
        if not self.development and not self.unsubscribe_secret.get_secret_value():
            refusals.append(
                "UNSUBSCRIBE_SECRET is not set (unsubscribe links would verify on this process"
                " alone); OMNI_ENV=development allows that on a developer's machine"
            )
        return refusals

    def startup_warnings(self) -> list[str]:
        """The platform's, a development instance signing with a secret of its own, and push
        endpoints allowed inside the network outside development."""
        warnings = super().startup_warnings()
        if self.notify_push_private_endpoints == "allow" and not self.development:
            warnings.append(
                "NOTIFY_PUSH_PRIVATE_ENDPOINTS=allow outside development: a shopper's push"
                " subscription may make this service call addresses inside its network"
            )
        if not self.unsubscribe_secret.get_secret_value():
            warnings.append(
                "UNSUBSCRIBE_SECRET is not set: unsubscribe links die with this process"
            )
        return warnings

    @model_validator(mode="after")
    def _deadline_within_the_lease(self) -> NotificationSettings:
        if self.notify_delivery_deadline_s >= self.notify_send_lease_s:
            raise ValueError(
                "NOTIFY_DELIVERY_DEADLINE_S must be shorter than NOTIFY_SEND_LEASE_S (a send"
                " still running when its lease ends would be taken over and sent twice)"
            )
        return self

    # Read here so that a key that is not one stops the start, not the first push.
    @field_validator("fcm_service_account_file")
    @classmethod
    def _a_service_account_key(cls, value: str | None) -> str | None:
        if value:
            from notification_service.adapters.providers import ServiceAccountTokens

            ServiceAccountTokens.load(value)
        return value

    @field_validator("notify_templates_dir")
    @classmethod
    def _an_existing_directory(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{value!r} is not a directory")
        return value

    def purpose_policy(self, purpose: Purpose) -> PurposePolicy:
        """How ``purpose`` meets the contact budget (see the budget's settings)."""
        if purpose is Purpose.MARKETING:
            return PurposePolicy(counted=True, deferred=True, digest=True)
        return PurposePolicy(
            counted=self.notify_budget_counts_transactional, deferred=False, digest=False
        )

    @property
    def budget(self) -> Budget:
        """The contact budget a deferrable message waits for."""
        return Budget(
            self.notify_budget_marketing, timedelta(hours=self.notify_budget_window_hours)
        )

    def smtp_target(self) -> tuple[str, int, dict[str, Any]] | None:
        """``(host, port, aiosmtplib options)`` of the SMTP relay, None if not configured."""
        if self.smtp_url:
            url = urlsplit(self.smtp_url)
            if url.scheme not in ("smtp", "smtps"):
                raise ValueError(f"SMTP_URL scheme {url.scheme!r} is not smtp or smtps")
            options: dict[str, Any] = {
                "use_tls": url.scheme == "smtps",
                "start_tls": "starttls=true" in url.query.lower() or None,
            }
            if url.username:
                options.update(username=url.username, password=url.password or "")
            default_port = 465 if url.scheme == "smtps" else 25
            return url.hostname or "127.0.0.1", url.port or default_port, options
        if self.smtp_host:
            return self.smtp_host, self.smtp_port, {}
        return None
