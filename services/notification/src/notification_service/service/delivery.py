"""The dispatcher: sends pending notifications through the providers, exactly once if it can,
at most twice if the process dies mid-send.

For each message: a transaction claims it and records the intent (``sending``, attempts+1,
a new claim token); the provider is called outside any transaction, under one deadline for
the whole delivery (every channel, device and retry) that ends before the claim's lease;
another transaction records the outcome and emits ``notification.sent`` /
``notification.failed`` through the outbox, if the claim still holds the token. A crash
between intent and outcome leaves the row ``sending``; once its lease has run out another
worker takes it over and sends it again, with the same Message-ID / push ``Topic`` so the
receiver can tell; a second interruption fails it instead of sending a third time. A live
send is never taken over: it is over, one way or the other, before its lease ends.

What a failure tells the shopper (the row's reason, ``notification.failed``'s ``error``) is
codes, ``channel:code`` per channel tried (``push:endpoint_refused; email:timeout``), never
a provider's words: those go to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from omni_common.service import ServiceRuntime, Tx
from omni_contracts import (
    NotificationChannel,
    NotificationFailed,
    NotificationSent,
    NotificationSuppressed,
    PushAddressesGone,
    SuppressionReason,
)

from notification_service.adapters.metrics import NotificationMetrics
from notification_service.adapters.providers import (
    EmailContent,
    FcmPush,
    GoneAddress,
    InvalidAddress,
    NotConfigured,
    ProviderError,
    PushContent,
    SmtpEmail,
    TimedOut,
    TransientError,
    WebPush,
)
from notification_service.adapters.repository import (
    Claim,
    NotificationRepository,
    NotificationRow,
)
from notification_service.adapters.templates import (
    Rendered,
    TemplateFailed,
    Templates,
    UnknownTemplate,
)
from notification_service.adapters.tokens import Unsubscribe, UnsubscribeTokens
from notification_service.domain.model import (
    Contact,
    Purpose,
    Reason,
    Status,
    push_topic,
    route,
    zone_of,
)
from notification_service.settings import NotificationSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Values shown to the shopper in their own zone rather than as UTC timestamps.
_TIME_PARAMS = ("promised_by", "eta", "collect_by", "valid_until", "expires_at")


@dataclass
class Outcome:
    """What one send produced (for one message, or for every message of a digest)."""

    status: Status
    channel: NotificationChannel | None = None
    provider_message_id: str | None = None
    error: str | None = None
    reason: Reason | None = None
    rendered: Rendered | None = None
    body: str | None = None
    gone_endpoints: list[str] = field(default_factory=list)
    gone_tokens: list[str] = field(default_factory=list)
    # A digest's messages, each with its own subject (what it was about).
    subjects: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """What goes out on one channel: one notification, or a digest of several."""

    rows: tuple[NotificationRow, ...]
    rendered: Rendered
    push_data: dict[str, str]
    subjects: dict[str, str]

    @property
    def first(self) -> NotificationRow:
        """The notification that names the message (its Message-ID, its push Topic)."""
        return self.rows[0]


def _being_cancelled() -> bool:
    """Whether the current task is really being cancelled (vs. a stray CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Dispatcher:
    """Claims pending notifications and delivers them with ``concurrency`` workers."""

    def __init__(
        self,
        runtime: ServiceRuntime,
        settings: NotificationSettings,
        metrics: NotificationMetrics,
        templates: Templates,
        tokens: UnsubscribeTokens,
        *,
        email: SmtpEmail | None,
        webpush: WebPush | None,
        fcm: FcmPush | None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.templates = templates
        self.tokens = tokens
        self.email = email
        self.webpush = webpush
        self.fcm = fcm
        self._wake = asyncio.Event()
        domain = settings.smtp_from.rpartition("@")[2].strip(" >") or "omni.invalid"
        self._message_id_domain = domain

    def wake(self) -> None:
        """A notification became pending: stop waiting."""
        self._wake.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Dispatcher]:
        """Run the workers while the context is open."""
        tasks = [
            asyncio.create_task(self._worker(), name=f"dispatcher-{n}")
            for n in range(self.settings.notify_dispatch_concurrency)
        ]
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _worker(self) -> None:
        while True:
            try:
                if not await self.dispatch_one():
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), self.settings.notify_dispatch_poll_s
                        )
            except asyncio.CancelledError:
                if _being_cancelled():
                    raise
                # A library's own timeout surfacing as a cancellation must not end the
                # worker; a message left ``sending`` is taken over once its lease ends.
                log.warning("dispatch round cancelled from inside; continuing", exc_info=True)
            except Exception:
                log.exception("dispatch round failed")
                await asyncio.sleep(self.settings.notify_dispatch_poll_s)

    # -- one message -----------------------------------------------------------------------

    async def dispatch_one(self) -> bool:
        """Send the next pending notification (with the digest it heads); False when there
        was none."""
        async with self.runtime.transaction() as tx:
            repo = NotificationRepository(tx.conn)
            claim = await repo.claim(self.settings.notify_send_lease_s)
            if claim is None:
                return False
            # The deadline counts from the claim: the lease does too.
            deadline = asyncio.get_running_loop().time() + self.settings.notify_delivery_deadline_s
            if claim.taken_over and claim.taken_over_before:
                # Interrupted twice: a third send could reach the shopper a third time.
                await self._finish(
                    tx, claim, claim.rows, Outcome(Status.FAILED, error="interrupted_twice")
                )
                return True
            row = claim.row
            contact = await repo.contact(row.customer_id)
            refusal = route(contact, Purpose(row.purpose)).refusal
            if refusal is not None:
                await self._finish(
                    tx, claim, claim.rows, Outcome(Status.SUPPRESSED, reason=refusal)
                )
                return True
            going: list[NotificationRow] = []
            for each in claim.rows:
                if each.kind == "cart_reminder" and await repo.cart_closed(
                    str(each.params.get("cart_id"))
                ):
                    bought = Outcome(Status.SUPPRESSED, reason=Reason.ALREADY_BOUGHT)
                    await self._finish(tx, claim, [each], bought)
                else:
                    going.append(each)
        if not going:
            return True
        if claim.taken_over:
            log.warning("resending %s after an interrupted send", row.notification_id)
        assert contact is not None
        outcome, failed = await self.deliver(going, contact, deadline)
        async with self.runtime.transaction() as tx:
            for each, failure in failed:
                await self._finish(tx, claim, [each], failure)
            alone = {each.notification_id for each, _ in failed}
            await self._finish(
                tx, claim, [r for r in going if r.notification_id not in alone], outcome
            )
        return True

    async def _finish(
        self,
        tx: Tx,
        claim: Claim,
        rows: list[NotificationRow] | tuple[NotificationRow, ...],
        outcome: Outcome,
    ) -> None:
        """Record ``outcome`` for ``rows`` (a message, or a digest's messages) and tell it,
        as long as ``claim`` still holds them."""
        repo = NotificationRepository(tx.conn)
        channel = outcome.channel.value if outcome.channel else None
        rendered = outcome.rendered
        told = []
        for row in rows:
            held = await repo.finish(
                row.notification_id,
                claim.token,
                outcome.status.value,
                channel=channel,
                reason=outcome.reason.value if outcome.reason else outcome.error,
                provider_message_id=outcome.provider_message_id,
                language=rendered.language if rendered else None,
                subject=outcome.subjects.get(
                    row.notification_id, rendered.subject if rendered else None
                ),
                body=outcome.body,
            )
            if held:
                told.append(row)
            else:
                # Another claim took the message over: its outcome, and its events, are its own.
                log.warning(
                    "outcome of %s not recorded: its claim was taken over", row.notification_id
                )
        if not told:
            return
        if outcome.gone_endpoints or outcome.gone_tokens:
            await repo.remove_push_addresses(
                told[0].customer_id, outcome.gone_endpoints, outcome.gone_tokens
            )
            self.metrics.addresses_removed.labels(self.metrics.service).inc(
                len(outcome.gone_endpoints) + len(outcome.gone_tokens)
            )
            # The profile owns the devices: told, so its next snapshot does not bring them back.
            await tx.emit(
                PushAddressesGone(
                    customer_id=told[0].customer_id,
                    endpoints=outcome.gone_endpoints[:100],
                    push_tokens=outcome.gone_tokens[:100],
                )
            )
        for row in told:
            await self._tell(tx, row, outcome)

    async def _tell(self, tx: Tx, row: NotificationRow, outcome: Outcome) -> None:
        common: dict[str, Any] = {
            "customer_id": row.customer_id,
            "notification_id": row.notification_id,
            "template": row.kind,
        }
        if outcome.status is Status.SENT:
            assert outcome.channel and outcome.provider_message_id
            await tx.emit(
                NotificationSent(
                    **common,
                    channel=outcome.channel,
                    provider_message_id=outcome.provider_message_id[:200],
                    digest_id=row.digest_id,
                ),
                correlation_id=row.correlation_id,
            )
        elif outcome.status is Status.FAILED:
            await tx.emit(
                NotificationFailed(
                    **common,
                    error=(outcome.error or "failed")[:200],
                    channel=outcome.channel,
                    attempts=max(row.attempts, 1),
                    digest_id=row.digest_id,
                ),
                correlation_id=row.correlation_id,
            )
        elif outcome.reason is not None:
            try:
                reason = SuppressionReason(outcome.reason.value)
            except ValueError:
                reason = None
            if reason is not None:
                await tx.emit(
                    NotificationSuppressed(**common, reason=reason),
                    correlation_id=row.correlation_id,
                )
        self.metrics.outcome(
            row.kind,
            outcome.status.value,
            outcome.reason.value if outcome.reason else (outcome.error or "").split(";")[0],
        )

    # -- delivering ------------------------------------------------------------------------

    def _values(self, row: NotificationRow, contact: Contact) -> dict[str, Any]:
        zone = zone_of(contact.preferences, self.settings.notify_default_time_zone)
        values = dict(row.params)
        for name in _TIME_PARAMS:
            if isinstance(values.get(name), str):
                local = datetime.fromisoformat(values[name]).astimezone(zone)
                values[name] = local.strftime("%Y-%m-%d %H:%M %Z")
        values.setdefault("url", None)
        return values

    def _message(
        self,
        rows: list[NotificationRow],
        members: dict[str, Rendered],
        contact: Contact,
        unsubscribe_url: str | None,
    ) -> Message:
        """One notification as its template renders it, or a digest of several (the
        ``digest`` template, given each one's own rendering)."""
        language = contact.preferences.language
        first = rows[0]
        if len(rows) == 1:
            values = self._values(first, contact)
            values["unsubscribe_url"] = unsubscribe_url
            rendered = self.templates.render(first.kind, language, values)
            data = {"notification_id": first.notification_id, "kind": first.kind}
            return Message(tuple(rows), rendered, data, {})
        items = [
            {
                "kind": row.kind,
                "subject": members[row.notification_id].subject,
                "text": members[row.notification_id].text,
                "push": members[row.notification_id].push,
                "url": row.params.get("url"),
            }
            for row in rows
        ]
        values = {
            "items": items,
            "count": len(items),
            "url": self.settings.shop_url,
            "unsubscribe_url": unsubscribe_url,
        }
        rendered = self.templates.render("digest", language, values)
        data = {
            "notification_id": first.notification_id,
            "kind": "digest",
            "count": str(len(items)),
        }
        subjects = {r.notification_id: members[r.notification_id].subject for r in rows}
        return Message(tuple(rows), rendered, data, subjects)

    async def deliver(
        self, rows: list[NotificationRow], contact: Contact, deadline: float
    ) -> tuple[Outcome, list[tuple[NotificationRow, Outcome]]]:
        """Try the shopper's channels in order until one provider accepts the message (one
        notification, or a digest of the shopper's marketing messages that came due
        together), all by ``deadline`` (the event loop's clock): once it passes, no channel is
        tried any more. Returns the outcome, and the digest's messages that failed on their
        own (their template) with theirs."""
        purpose = Purpose(rows[0].purpose)
        failed: list[tuple[NotificationRow, Outcome]] = []
        members: dict[str, Rendered] = {}
        if len(rows) > 1:
            # Each message of a digest as it would go alone (no unsubscribe link: the
            # digest has one); one whose template fails fails alone.
            for row in rows:
                try:
                    values = {**self._values(row, contact), "unsubscribe_url": None}
                    members[row.notification_id] = self.templates.render(
                        row.kind, contact.preferences.language, values
                    )
                except (UnknownTemplate, TemplateFailed) as exc:
                    failed.append((row, self._template_failure(row, exc)))
            rows = [r for r in rows if r.notification_id in members]
            if len(rows) == 1:
                members.clear()  # the one left goes alone, as its own message
            if not rows:
                return Outcome(Status.FAILED, error="template_error"), failed
        errors: list[str] = []
        gone_endpoints: list[str] = []
        gone_tokens: list[str] = []
        last_channel: NotificationChannel | None = None
        for channel in route(contact, purpose).channels:
            last_channel = channel
            unsubscribe_url = None
            if channel is NotificationChannel.EMAIL and purpose is Purpose.MARKETING:
                token = self.tokens.sign(Unsubscribe(rows[0].customer_id, "email", purpose.value))
                unsubscribe_url = (
                    f"{self.settings.notify_public_url.rstrip('/')}/unsubscribe/{token}"
                )
            try:
                message = self._message(rows, members, contact, unsubscribe_url)
            except (UnknownTemplate, TemplateFailed) as exc:
                # Not the channel's fault: no other channel can do better.
                return self._template_failure(rows[0], exc), failed
            try:
                if asyncio.get_running_loop().time() >= deadline:
                    raise TimedOut("the delivery's deadline passed before this channel")
                # The providers bound each call; this bounds the channel as a whole.
                async with asyncio.timeout_at(deadline):
                    if channel is NotificationChannel.EMAIL:
                        message_id = await self._email(message, contact, unsubscribe_url, deadline)
                        body = message.rendered.text
                    elif channel is NotificationChannel.PUSH:
                        url = (
                            self._values(rows[0], contact).get("url")
                            if len(rows) == 1
                            else self.settings.shop_url
                        )
                        message_id = await self._push(
                            message,
                            contact,
                            url,
                            purpose,
                            gone_endpoints,
                            gone_tokens,
                            deadline,
                        )
                        body = message.rendered.push
                    else:
                        raise NotConfigured("no SMS provider configured")
            except TimeoutError:
                error: ProviderError = TimedOut("the delivery's deadline passed")
            except ProviderError as exc:
                error = exc
            else:
                return (
                    Outcome(
                        Status.SENT,
                        channel,
                        message_id,
                        rendered=message.rendered,
                        body=body,
                        gone_endpoints=gone_endpoints,
                        gone_tokens=gone_tokens,
                        subjects=message.subjects,
                    ),
                    failed,
                )
            kind = type(error).__name__
            self.metrics.provider_errors.labels(self.metrics.service, channel.value, kind).inc()
            errors.append(f"{channel.value}:{error.code}")
            log.info(
                "%s for %s failed (%s: %s); next channel",
                channel.value,
                rows[0].notification_id,
                error.code,
                error,
            )
        outcome = Outcome(
            Status.FAILED,
            last_channel,
            error="; ".join(errors) or "no_channel",
            gone_endpoints=gone_endpoints,
            gone_tokens=gone_tokens,
        )
        return outcome, failed

    @staticmethod
    def _template_failure(row: NotificationRow, exc: Exception) -> Outcome:
        code = "unknown_template" if isinstance(exc, UnknownTemplate) else "template_error"
        log.warning("%s of %s: %s", code, row.notification_id, exc)
        return Outcome(Status.FAILED, error=code)

    async def _email(
        self, message: Message, contact: Contact, unsubscribe: str | None, deadline: float
    ) -> str:
        if self.email is None:
            raise NotConfigured("no SMTP relay configured")
        assert contact.email
        rendered = message.rendered
        content = EmailContent(
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            message_id=f"<{message.first.notification_id}@{self._message_id_domain}>",
            unsubscribe_url=unsubscribe,
        )
        email, to = self.email, contact.email
        return await self._retrying(
            "email", lambda: email.send(to, content, deadline=deadline), deadline
        )

    async def _push(
        self,
        message: Message,
        contact: Contact,
        url: str | None,
        purpose: Purpose,
        gone_endpoints: list[str],
        gone_tokens: list[str],
        deadline: float,
    ) -> str:
        row = message.first
        content = PushContent(
            title=message.rendered.subject,
            body=message.rendered.push,
            url=url,
            topic=push_topic(row.notification_id),
            data=message.push_data,
            urgency="high" if purpose is Purpose.TRANSACTIONAL else "normal",
        )
        targets: list[tuple[Any, Any, list[str], str]] = []
        for sub in contact.push_subscriptions:
            targets.append((self.webpush, dict(sub), gone_endpoints, str(sub.get("endpoint"))))
        for token in contact.push_tokens:
            targets.append((self.fcm, token, gone_tokens, token))

        async def one(provider: Any, address: Any) -> str:
            if provider is None:
                raise NotConfigured("no push provider configured")
            return await self._retrying(
                "push", lambda: provider.send(address, content, deadline=deadline), deadline
            )

        # Every device the shopper registered gets the message, all at once: a slow one
        # does not hold the others up.
        results = await asyncio.gather(
            *(one(provider, address) for provider, address, _, _ in targets),
            return_exceptions=True,
        )
        delivered: list[str] = []
        failures: list[ProviderError] = []
        for (_, _, gone, key), result in zip(targets, results, strict=True):
            if isinstance(result, str):
                delivered.append(result)
            elif isinstance(result, GoneAddress):
                gone.append(key)
                failures.append(result)
            elif isinstance(result, ProviderError):
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
        if delivered:
            return delivered[0]
        if not failures:
            raise InvalidAddress("no push address")
        for failure in failures:
            log.info("push to a device of %s failed: %s", row.notification_id, failure)
        if all(isinstance(f, GoneAddress) for f in failures):
            raise GoneAddress("every push address is gone")
        # The shopper is told one code: the first device's that is not merely gone.
        first = next(f for f in failures if not isinstance(f, GoneAddress))
        raise ProviderError("no push device took the message", code=first.code)

    async def _retrying(self, channel: str, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Call a provider; retry transient failures (429/5xx) with exponential backoff, as
        long as the next attempt would start before ``deadline``."""
        s = self.settings
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            for attempt in range(1, s.notify_send_attempts + 1):
                try:
                    return await call()
                except InvalidAddress:
                    raise
                except asyncio.CancelledError:
                    if _being_cancelled():
                        raise
                    exc = TransientError(f"{channel} provider call cancelled (its timeout)")
                    if attempt == s.notify_send_attempts:
                        raise exc from None
                    delay = min(s.notify_retry_backoff_s, s.notify_retry_backoff_max_s)
                    if loop.time() + delay >= deadline:
                        raise TimedOut(f"{channel}: no time left for another attempt") from None
                    await asyncio.sleep(delay)
                except TransientError as exc:
                    self.metrics.provider_errors.labels(
                        self.metrics.service, channel, type(exc).__name__
                    ).inc()
                    if attempt == s.notify_send_attempts:
                        raise
                    backoff = s.notify_retry_backoff_s * 2 ** (attempt - 1)
                    delay = exc.retry_after if exc.retry_after is not None else backoff
                    delay = min(delay, s.notify_retry_backoff_max_s)
                    if loop.time() + delay >= deadline:
                        raise
                    await asyncio.sleep(delay)
            raise AssertionError("unreachable")
        finally:
            self.metrics.provider_seconds.labels(self.metrics.service, channel).observe(
                time.perf_counter() - started
            )
