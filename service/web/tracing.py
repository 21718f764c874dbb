"""OpenTelemetry traces, configured by the standard ``OTEL_*`` environment variables and off when they do not
ask for them.

``OTEL_TRACES_EXPORTER`` names the exporters (comma-separated: ``otlp``, ``console``, or any installed
``opentelemetry_traces_exporter`` entry point; ``none`` or unset: no tracing, no cost beyond a no-op
tracer). The rest is read by the SDK itself: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the
resource), ``OTEL_TRACES_SAMPLER`` (the sampler), ``OTEL_EXPORTER_OTLP_ENDPOINT`` and friends (the OTLP/HTTP
exporter), ``OTEL_BSP_*`` (the batch span processor). The server span of each request is FastAPI's
instrumentation's, which continues an incoming W3C ``traceparent``; the core's spans go under it
(service/core/tracing.py).
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import TracerProvider as ApiTracerProvider

from service.web.health import PROBE_PATHS

EXPORTERS_VARIABLE = "OTEL_TRACES_EXPORTER"
EXPORTER_GROUP = "opentelemetry_traces_exporter"
# The OTLP exporter this server ships speaks HTTP/protobuf (opentelemetry-exporter-otlp-proto-http).
ALIASES = {"otlp": "otlp_proto_http"}


class TracingConfigError(ValueError):
    """OTEL_TRACES_EXPORTER names an exporter that is not installed."""


def exporter(name: str) -> SpanExporter:
    """The installed exporter registered under ``name`` (or its alias), made with its defaults, which read
    its own OTEL_* variables."""
    wanted = ALIASES.get(name, name)
    found = entry_points(group=EXPORTER_GROUP, name=wanted)
    if not found:
        known = sorted({ep.name for ep in entry_points(group=EXPORTER_GROUP)} | set(ALIASES))
        raise TracingConfigError(f"{EXPORTERS_VARIABLE}: no trace exporter {name!r}; installed: {', '.join(known)}")
    made: SpanExporter = next(iter(found)).load()()
    return made


def tracer_provider_from_env() -> TracerProvider | None:
    """A tracer provider exporting to the exporters ``OTEL_TRACES_EXPORTER`` names, or None (tracing off)."""
    names = [n.strip() for n in os.environ.get(EXPORTERS_VARIABLE, "").split(",") if n.strip()]
    if not names or names == ["none"]:
        return None
    provider = TracerProvider(resource=Resource.create())
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(exporter(name)))
    return provider


def instrument(app: FastAPI, provider: ApiTracerProvider) -> None:
    """A server span per request, continuing the request's ``traceparent``; none for the probes (a platform
    asks them every few seconds), and without the per-message ``http send``/``receive`` spans, which would
    outnumber the ones that say where the time went."""
    probes = ",".join(f"{path}$" for path in PROBE_PATHS)  # regular expressions searched in the URL
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=probes,
                                       exclude_spans=["receive", "send"])
