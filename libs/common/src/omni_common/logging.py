"""JSON logs that carry the current OpenTelemetry trace and span ids."""

from __future__ import annotations

import logging
import sys

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


def configure_logging(service: str, level: str = "INFO", json_output: bool = True) -> None:
    """Route every logger to stdout, as JSON (with trace ids) or as readable text."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(TraceContextFilter(service))
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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-message INFO lines from the Kafka client and FastStream drown the signal.
    for noisy in ("aiokafka", "faststream", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
