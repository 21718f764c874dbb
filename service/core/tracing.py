"""The spans of the inference core, with OpenTelemetry's API alone (the SDK, the exporters and the HTTP
server span are service/web/tracing.py's; with tracing off the tracer is a no-op one).

Under a request's server span: ``decode``, ``queue wait`` (from submission to its batch's start; drawn after
the fact, from the batcher's times), ``postprocess`` and the door's ``encode``. A batch serves several
requests, so its ``inference`` span is one, child of the first request's span, with a link to each request's
span (OpenTelemetry's fan-in); each request's ``queue wait`` links back to it. Both carry the batch size; the
inference span also the detections found, the post-processing span those kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, Tracer

TRACER_NAME = "service"
DECODE, QUEUE_WAIT, INFERENCE, POSTPROCESS, ENCODE = "decode", "queue wait", "inference", "postprocess", "encode"
BATCH_SIZE, DETECTIONS, PRIORITY = "mrcnn.batch_size", "mrcnn.detections", "mrcnn.priority"


@dataclass
class BatchTrace:
    """What a request's trace and its batch's span tell each other: the request's context (captured when it
    joins the queue) in, the batch's span context out."""

    context: otel_context.Context = field(default_factory=otel_context.get_current)
    batch: SpanContext | None = None


@contextlib.contextmanager
def batch_span(tracer: Tracer, traces: list[BatchTrace]) -> Iterator[Span]:
    """The one span of a batch (in the inference thread), told to each of its requests."""
    links = [Link(trace.get_current_span(t.context).get_span_context()) for t in traces]
    with tracer.start_as_current_span(INFERENCE, context=traces[0].context, links=links,
                                      attributes={BATCH_SIZE: len(traces)}) as span:
        for t in traces:
            t.batch = span.get_span_context()
        yield span


def record_queue_wait(tracer: Tracer, batch: BatchTrace, submitted_ns: int, queue_s: float, batch_size: int,
                      priority: int) -> None:
    """The request's ``queue wait`` span, drawn once its batch has run: from ``submitted_ns`` (wall clock) for
    ``queue_s``, linked to the batch's span."""
    links = [Link(batch.batch)] if batch.batch is not None else []
    span = tracer.start_span(QUEUE_WAIT, start_time=submitted_ns, links=links,
                             attributes={BATCH_SIZE: batch_size, PRIORITY: priority})
    span.end(end_time=submitted_ns + int(queue_s * 1e9))
