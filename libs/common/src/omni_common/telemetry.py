"""OpenTelemetry tracing: one trace per shopper journey, across Kafka hops.

Each consumed record gets a consumer span, child of the ``traceparent`` it carries
(``omni_common.dispatch``). An event emitted while handling it stores that span's
``traceparent`` in its outbox row; the relay's publish span
(``KafkaRuntime.publish_outbox_message``) is its child and injects its own ``traceparent``,
so the next consumer's span continues the same trace.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_configured = False


def configure_tracing(service: str, otlp_endpoint: str | None) -> trace.TracerProvider:
    """Install a global tracer provider once per process; export via OTLP when configured.

    Tests install their own provider (with an in-memory exporter) before services start;
    in that case it is kept.
    """
    global _configured
    current = trace.get_tracer_provider()
    if _configured or isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_endpoint}/v1/traces"))
        )
    trace.set_tracer_provider(provider)
    _configured = True
    return provider


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
