"""OpenTelemetry tracing: one trace per shopper journey, across Kafka hops.

Each consumed record gets a consumer span, child of the ``traceparent`` it carries
(``omni_common.dispatch``). An event emitted while handling it stores that span's
``traceparent`` in its outbox row; the relay's publish span
(``KafkaRuntime.publish_outbox_message``) is its child and injects its own ``traceparent``,
so the next consumer's span continues the same trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_configured = False
# The provider configure_tracing installed, and whether it exports anything.
_installed: trace.TracerProvider | None = None
_installed_exports = False


def configure_tracing(service: str, otlp_endpoint: str | None) -> trace.TracerProvider:
    """Install a global tracer provider once per process; export via OTLP when configured.

    Tests install their own provider (with an in-memory exporter) before services start;
    in that case it is kept.
    """
    global _configured, _installed, _installed_exports
    current = trace.get_tracer_provider()
    if _configured or isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    _installed, _installed_exports = provider, bool(otlp_endpoint)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_endpoint}/v1/traces"))
        )
    trace.set_tracer_provider(provider)
    _configured = True
    return provider


def spans_wanted() -> bool:
    """Whether spans made here go anywhere: an exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``) or
    a provider someone else installed (a test reading them). Otherwise no span is made, and
    each event's ``traceparent`` is passed on as it came, so a journey stays one trace."""
    provider = trace.get_tracer_provider()
    if provider is _installed:
        return _installed_exports
    return isinstance(provider, TracerProvider)


def trace_headers(headers: Iterable[tuple[str, bytes | str]]) -> dict[str, str]:
    """The W3C trace headers among a record's headers."""
    carrier: dict[str, str] = {}
    for key, value in headers:
        if key in ("traceparent", "tracestate"):
            if isinstance(value, bytes):
                with contextlib.suppress(UnicodeDecodeError):
                    carrier[key] = value.decode()
            else:
                carrier[key] = value
    return carrier


def current_trace_headers() -> dict[str, str]:
    """The W3C trace headers of the active span (empty when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_headers_of(context: otel_context.Context) -> dict[str, str]:
    """The W3C trace headers of the span in ``context`` (empty when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def attach_trace_headers(headers: Mapping[str, str]) -> object:
    """Make the trace in ``headers`` current; returns a token for :func:`detach`."""
    return otel_context.attach(propagate.extract(dict(headers)))


def detach(token: object) -> None:
    """Undo :func:`attach_trace_headers`."""
    otel_context.detach(token)  # type: ignore[arg-type]
