"""``omni bench notify``: trigger -> delivered, messages per second, beside the raw SMTP rate.

Starts an SMTP server (Maildir) and a Web Push endpoint (VAPID-verifying, decrypting) on
loopback, runs the notification service in-process (its ``create_app``) against a real
broker and PostgreSQL (``KAFKA_BOOTSTRAP_SERVERS`` + ``DATABASE_URL``, else embedded ones:
Apache Kafka when Java is here, as the dev stack chooses), gives half the shoppers e-mail
and half a browser push subscription, publishes one ``order.confirmed`` per shopper and
times until every message arrived at the SMTP server or the push endpoint. The baseline,
measured in the same run: plain aiosmtplib sends to the same SMTP server with the same
concurrency (one connection per message, as the service does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import typer
from omni_common.topics import create_topics
from omni_contracts import Channel, OrderConfirmed, Preferences, ProfileUpdated

from omni_devkit.bench.kit import infrastructure
from omni_devkit.cli import bench_app, fail
from omni_devkit.devstack.postgres import create_database
from omni_devkit.devstack.process import DevStackError
from omni_devkit.devstack.smtp import MaildirSmtpServer
from omni_devkit.devstack.stack import load_service_factory
from omni_devkit.devstack.vapid import ensure_vapid_keys
from omni_devkit.testing.events import ChannelPublisher
from omni_devkit.testing.push import PushEndpoint
from omni_devkit.testing.services import running


async def _raw_smtp_rate(smtp: MaildirSmtpServer, count: int, concurrency: int) -> float:
    """Messages per second straight into the same server, ``concurrency`` at a time."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            message = EmailMessage()
            message["From"], message["To"] = "bench@omni.example", f"raw-{n}@example.com"
            message["Subject"] = "raw"
            message.set_content("raw SMTP baseline")
            await aiosmtplib.send(message, hostname=smtp.host, port=smtp.port)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


@contextlib.asynccontextmanager
async def _service(
    bootstrap: str, database: str, smtp: MaildirSmtpServer, push: PushEndpoint, key_file: str
) -> AsyncIterator[Any]:
    from omni_common.settings import ServiceSettings

    settings = ServiceSettings(
        service_name="notification",
        omni_env="development",  # a developer's machine: its push endpoint is on loopback
        kafka_bootstrap_servers=bootstrap,
        database_url=database,
        topic_prefix=_prefix(database),
        api_keys="bench:bench-key:admin",
        consumer_session_timeout_ms=2_000,
        consumer_heartbeat_interval_ms=300,
        log_level="WARNING",
        metrics_port=0,  # whichever is free: nothing scrapes it here
    )
    # The service's own composition root, found as `omni run` finds it; the keywords are
    # NotificationSettings overrides (a local SMTP server and push keys, a brisk dispatcher).
    create_app = load_service_factory("notification")
    app = create_app(
        settings,
        smtp_url=smtp.url,
        vapid_private_key_file=key_file,
        unsubscribe_secret="bench-secret-0123456789",
        notify_push_private_endpoints="allow",  # the bench's push endpoint is on loopback
        notify_dispatch_poll_s=0.05,
        notify_dispatch_concurrency=8,
    )
    async with running(app, api_key="bench-key") as svc:
        yield svc


def _prefix(database: str) -> str:
    return database.rsplit("/", 1)[-1] + "."


async def measure(
    bootstrap: str,
    database: str,
    *,
    messages: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Deliver ``messages`` order confirmations (half e-mail, half Web Push) and time them.

    ``database`` is a database of its own (its name is the topic prefix).
    """
    root = Path(tempfile.mkdtemp(prefix="omni-bench-notify-"))
    prefix = _prefix(database)
    await create_topics(bootstrap, prefix=prefix)
    keys = ensure_vapid_keys(root)
    try:
        with MaildirSmtpServer(root / "maildir") as smtp:
            async with (
                PushEndpoint(vapid_public_key=keys.public_key) as push,
                ChannelPublisher(bootstrap, prefix) as channel,
                _service(bootstrap, database, smtp, push, str(keys.private_key_file)) as svc,
            ):
                customers = [f"bench-{uuid.uuid4().hex[:10]}" for _ in range(messages)]
                for n, customer in enumerate(customers):
                    if n % 2:
                        fields: dict[str, Any] = {"push_subscriptions": [push.subscribe()]}
                    else:
                        fields = {"email": f"{customer}@example.com"}
                    await channel.publish(
                        ProfileUpdated(
                            customer_id=customer, version=1, preferences=Preferences(), **fields
                        )
                    )
                await _until(lambda: _contacts(svc), messages, "contacts")
                say(f"{messages} shoppers known; publishing {messages} order confirmations")
                before = smtp.received
                started = time.perf_counter()
                for customer in customers:
                    await channel.publish(
                        OrderConfirmed(
                            order_id=f"o-{customer}", customer_id=customer, channel=Channel.WEB
                        )
                    )

                async def delivered() -> int:
                    return smtp.received - before + len(push.messages)

                await _until(delivered, messages, "deliveries", timeout=60 + messages / 5)
                elapsed = time.perf_counter() - started
                rejected = list(push.rejected)
            raw = await _raw_smtp_rate(smtp, max(50, messages), concurrency=8)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "messages": messages,
        "notify_msgs_per_s": round(messages / elapsed, 1),
        "raw_smtp_msgs_per_s": round(raw, 1),
        "seconds": round(elapsed, 2),
        "push_rejected": len(rejected),
    }


async def _contacts(svc: Any) -> int:
    # The service's contact list (its own table) is the only sign that it learnt a profile.
    async with svc.runtime.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM contacts"))


async def _until(
    count: Callable[[], Any],
    target: int,
    what: str,
    timeout: float = 60.0,  # noqa: ASYNC109 - a deadline for the wait
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = count()
        if asyncio.iscoroutine(value):
            value = await value
        if value >= target:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {value} of {target} {what} after {timeout:g}s")
        await asyncio.sleep(0.02)


@bench_app.command("notify")
def bench_notify(
    messages: int = typer.Option(300, min=10, help="notifications to deliver"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON line"),
) -> None:
    """Notifications per second from trigger to SMTP server / push endpoint vs. raw SMTP."""

    async def run(bootstrap: str, server: str) -> dict[str, Any]:
        name = f"bench_notify_{uuid.uuid4().hex[:8]}"
        database = await create_database(server, name)
        return await measure(bootstrap, database, messages=messages, say=progress)

    def progress(line: str) -> None:  # on stderr: --json keeps stdout to its one line
        typer.echo(line, err=True)

    # The in-process service's FastStream logs (every fetched batch) would bury the figures.
    logging.getLogger("faststream").setLevel(logging.WARNING)
    try:
        with infrastructure(progress, name="notify") as (bootstrap, server):
            result = asyncio.run(run(bootstrap, server))
    except (DevStackError, OSError, TimeoutError) as exc:
        fail(f"bench notify: {exc}")
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f"notify: {result['notify_msgs_per_s']} msgs/s trigger -> delivered"
        f" ({result['messages']} messages, half e-mail, half Web Push, {result['seconds']} s)"
        f" vs raw SMTP {result['raw_smtp_msgs_per_s']} msgs/s into the same server"
    )
