"""Composition root of the notification service."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from omni_common.http import create_http_app
from omni_common.service import ServiceRuntime
from omni_common.settings import ServiceSettings
from omni_contracts import CUSTOMER_SIGNALS, NOTIFICATION_DISPATCHED

from notification_service.adapters.metrics import NotificationMetrics
from notification_service.adapters.outbound import EndpointPolicy
from notification_service.adapters.providers import (
    FcmPush,
    ServiceAccountTokens,
    SmtpEmail,
    WebPush,
    web_push_session,
)
from notification_service.adapters.templates import Templates
from notification_service.adapters.tokens import UnsubscribeTokens
from notification_service.entrypoints import consumers
from notification_service.entrypoints.http import RateLimiter, build_router
from notification_service.service.delivery import Dispatcher
from notification_service.service.notify import Notifier
from notification_service.settings import NotificationSettings

log = logging.getLogger(__name__)

DESCRIPTION = """Tells shoppers what matters on the channel they prefer, at a decent hour:
abandoned carts, order updates (confirmed, ready for pickup, delayed, cancelled, refunded),
back in stock, loyalty. E-mail over SMTP, Web Push (VAPID) and FCM. Publishes
`notification.dispatched.v1`; `GET /customers/{id}/notifications` needs
`Authorization: Bearer <API key>`; `POST /unsubscribe/{token}` is the one-click unsubscribe."""


def _tokens(settings: NotificationSettings) -> UnsubscribeTokens:
    # Without a secret (development only: the service refuses to start elsewhere, and says
    # so at start-up) a random one: links then die with the process.
    secret = settings.unsubscribe_secret.get_secret_value().encode() or secrets.token_bytes(32)
    previous = settings.unsubscribe_secret_previous.get_secret_value().encode()
    return UnsubscribeTokens(
        secret,
        previous=[previous] if previous else [],
        max_age=timedelta(days=settings.unsubscribe_token_max_age_days),
    )


class Providers:
    """The providers, whose HTTP sessions open and close with the service."""

    def __init__(self, settings: NotificationSettings, dispatcher_ref: list[Dispatcher]) -> None:
        self.settings = settings
        self._ref = dispatcher_ref

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the push sessions, attach the providers, run the dispatcher."""
        s = self.settings
        dispatcher = self._ref[0]
        policy = EndpointPolicy(allow_private=s.notify_push_private_endpoints == "allow")
        async with (
            web_push_session(policy) as session,
            # FCM is where the operator said: no redirect is followed there either.
            httpx.AsyncClient(timeout=s.notify_push_timeout_s, follow_redirects=False) as client,
        ):
            vapid = WebPush.load_key(
                pem_file=s.vapid_private_key_file,
                pem=s.vapid_private_key.get_secret_value() if s.vapid_private_key else None,
            )
            dispatcher.webpush = (
                WebPush(
                    vapid,
                    s.vapid_subject,
                    s.push_ttl_s,
                    session,
                    policy,
                    request_timeout=s.notify_push_timeout_s,
                )
                if vapid
                else None
            )
            if s.fcm_service_account_file:
                key = ServiceAccountTokens.load(s.fcm_service_account_file)
                project = s.fcm_project_id or str(key.get("project_id") or "")
                dispatcher.fcm = FcmPush(
                    s.fcm_endpoint, project, ServiceAccountTokens(key, client), client
                )
            elif s.fcm_project_id and s.fcm_access_token:
                dispatcher.fcm = FcmPush(
                    s.fcm_endpoint, s.fcm_project_id, s.fcm_access_token.get_secret_value(), client
                )
            async with dispatcher.running():
                yield


def create_app(settings: ServiceSettings | None = None, **overrides: Any) -> FastAPI:
    """Build the notification service (nothing connects until the app starts).

    Plain platform settings (``omni run``, the test fixtures) are extended with the
    notification settings from the environment, then ``overrides``.
    """
    config = NotificationSettings.from_settings(settings, **overrides)
    runtime = ServiceRuntime(config, migrations_package="notification_service.migrations")
    metrics = NotificationMetrics(runtime.metrics)
    templates = Templates(config.notify_default_language, config.notify_templates_dir)
    tokens = _tokens(config)
    target = config.smtp_target()
    email = (
        SmtpEmail(
            target[0], target[1], config.smtp_from, timeout=config.smtp_timeout_s, options=target[2]
        )
        if target
        else None
    )
    dispatcher = Dispatcher(
        runtime, config, metrics, templates, tokens, email=email, webpush=None, fcm=None
    )
    notifier = Notifier(config, metrics, wake=dispatcher.wake, clock=runtime.clock)
    runtime.provide(notifier=notifier)
    runtime.subscribe(*consumers.subscriptions())
    runtime.timers(consumers.TIMERS, poll_interval_s=config.notify_timer_poll_s)
    runtime.publishes(NOTIFICATION_DISPATCHED, CUSTOMER_SIGNALS)
    runtime.run_alongside(Providers(config, [dispatcher]).running())

    app = create_http_app(
        runtime,
        title="Notification service",
        description=DESCRIPTION,
        routers=[
            build_router(
                notifier,
                tokens,
                config.max_page_size,
                RateLimiter(config.notify_unsubscribe_per_minute),
            )
        ],
    )
    return app
