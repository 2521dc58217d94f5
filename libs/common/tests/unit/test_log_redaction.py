"""The log handler every service uses masks e-mails and phone numbers that slip through."""

from __future__ import annotations

import io
import json
import logging

from omni_common.logging import log_handler, redact


def test_emails_and_international_phones_are_masked_ids_are_not() -> None:
    text = "mail ann.o'neil+shop@mail.example.co.uk or call +33 6 12 34 56 78 / +1 (555) 010-9999"
    assert redact(text) == "mail <email> or call <phone> / <phone>"
    kept = "order o-20261201-000123 offset 123456789 at 2026-12-01 21:06:41"
    assert redact(kept) == kept


def test_the_service_handler_masks_messages_arguments_and_tracebacks() -> None:
    out = io.StringIO()
    logger = logging.getLogger("redaction-probe")
    logger.propagate = False
    logger.addHandler(log_handler("probe", json_output=True, stream=out))
    try:
        logger.warning("contact %s", "jane@example.org")
        try:
            raise ValueError("bad phone +44 20 7946 0958")
        except ValueError:
            logger.exception("refused")
    finally:
        logger.handlers.clear()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["message"] == "contact <email>"
    assert "ValueError: bad phone <phone>" in lines[1]["exc_info"]
    assert "jane@" not in out.getvalue() and "7946" not in out.getvalue()
