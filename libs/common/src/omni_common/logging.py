"""JSON logs that carry the current OpenTelemetry trace and span ids, and no personal data.

Services never log e-mails, phones, addresses or names; :class:`PiiRedactionFilter` is the
backstop for what slips through (an exception quoting a value): e-mail addresses and
international phone numbers are masked in every record before it is written.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the active span to every record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else None
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else None
        record.service = self.service
        return True


_EMAIL = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")
# E.164-style numbers (+33 6 12 34 56 78, +1 (555) 010-9999); bare digit runs are ids.
_PHONE = re.compile(r"\+\d[\d ().-]{6,}\d")


NOISY_LOGGERS = ("aiokafka", "faststream", "uvicorn.access")
"""Libraries kept at WARNING whatever the service's level."""


def redact(text: str) -> str:
    """``text`` with e-mail addresses and international phone numbers masked."""
    return _PHONE.sub("<phone>", _EMAIL.sub("<email>", text))


class PiiRedactionFilter(logging.Filter):
    """Masks e-mail addresses and phone numbers in a record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def log_handler(
    service: str, json_output: bool = True, stream: TextIO | None = None
) -> logging.Handler:
    """The handler every service logs through: trace ids, PII masked, JSON or text."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.addFilter(TraceContextFilter(service))
    handler.addFilter(PiiRedactionFilter())
    if json_output:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{service}{trace_id}{span_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-5s %(name)s [%(trace_id)s] %(message)s")
        )
    return handler


def configure_logging(service: str, level: str = "INFO", json_output: bool = True) -> None:
    """Route every logger to stdout, as JSON (with trace ids) or as readable text."""
    handler = log_handler(service, json_output)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-message INFO lines from the Kafka client and FastStream drown the signal (and at
    # DEBUG aiokafka dumps raw message values: personal data).
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
