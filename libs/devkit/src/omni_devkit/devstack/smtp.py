"""A real SMTP server on loopback that keeps every message it receives in a Maildir.

The dev stack runs one (``MAILDIR`` and ``SMTP_URL`` in ``.omni/dev.env``) and the test plugin
offers one per session (the ``smtp_server`` fixture): the notification service sends to it
over SMTP exactly as it would to a relay, and tests read what arrived from the Maildir.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from omni_devkit.devstack.process import free_port


class _MaildirHandler:
    """aiosmtpd handler: each accepted message is added to the Maildir, envelope kept."""

    def __init__(self, maildir: mailbox.Maildir) -> None:
        self.maildir = maildir
        self.lock = threading.Lock()
        self.count = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        # Refuse what a real relay refuses, so the sender's error path is exercised.
        if "@" not in address or address.endswith(".invalid"):
            return "550 5.1.1 no such recipient"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        message["X-Envelope-From"] = envelope.mail_from
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        with self.lock:
            self.count += 1
            # Maildir keys do not keep arrival order within a second: number the messages.
            message["X-Maildir-Seq"] = str(self.count)
            self.maildir.add(message.as_bytes())
        return "250 OK: queued"


class MaildirSmtpServer:
    """An aiosmtpd server (in its own thread) storing into ``maildir``; a context manager."""

    def __init__(self, maildir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.path = Path(maildir)
        self.host = host
        self.port = port or free_port(host)
        self.maildir = mailbox.Maildir(self.path, create=True)
        self._handler = _MaildirHandler(self.maildir)
        self._controller = Controller(
            self._handler, hostname=host, port=self.port, server_hostname="omni-dev-smtp"
        )
        self._started = False

    @property
    def url(self) -> str:
        """``smtp://host:port`` for ``SMTP_URL``."""
        return f"smtp://{self.host}:{self.port}"

    @property
    def received(self) -> int:
        """How many messages this server accepted since it started."""
        return self._handler.count

    def start(self) -> MaildirSmtpServer:
        """Listen (returns once the server answers)."""
        if not self._started:
            self._controller.start()
            self._started = True
        return self

    def stop(self) -> None:
        """Stop listening (idempotent); the Maildir stays."""
        if self._started:
            self._started = False
            self._controller.stop()

    def __enter__(self) -> MaildirSmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def messages(self) -> list[EmailMessage]:
        """Every message in the Maildir, oldest first, parsed with the modern e-mail API."""
        result: list[EmailMessage] = []
        for key in self.maildir.iterkeys():
            parsed = email.message_from_bytes(
                self.maildir.get_bytes(key), policy=email.policy.default
            )
            assert isinstance(parsed, EmailMessage)
            result.append(parsed)
        return sorted(result, key=lambda m: int(m.get("X-Maildir-Seq", "0")))

    def messages_to(self, address: str) -> list[EmailMessage]:
        """The messages whose envelope recipients include ``address``."""
        return [m for m in self.messages() if address in str(m.get("X-Envelope-To", ""))]

    async def wait_for(
        self,
        address: str,
        count: int = 1,
        timeout: float = 15.0,  # noqa: ASYNC109 - a deadline for the wait, part of the API
    ) -> list[EmailMessage]:
        """Wait until ``count`` messages for ``address`` arrived; AssertionError after
        ``timeout`` (async: the sender usually runs in the same event loop)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages_to(address)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(found)} of {count} messages for {address} arrived in {timeout:g}s"
                )
            await asyncio.sleep(0.05)
