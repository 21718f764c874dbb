"""The server's log lines: text (the default) or one JSON object a line (``MRCNN_LOG_FORMAT=json``), for a
log pipeline (Loki, Elasticsearch, Cloud Logging) to index without parsing.

Every line about a request carries its request ID and, when tracing is on, its trace ID, taken from the
request's context by ``ContextFilter``; uvicorn's own lines go through the same handler (uvicorn is run
with ``log_config=None``). A record's ``fields`` (the per-request line's, service/web/request_log.py) become
members of its JSON object, or ``key=value`` pairs of its text line.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from opentelemetry import trace

from service.core.settings import LogFormat
from service.web import request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``trace_id`` (None outside a request or a trace) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.current.get()
        span = trace.get_current_span().get_span_context()
        record.trace_id = format(span.trace_id, "032x") if span.is_valid else None
        return True


def context_of(record: logging.LogRecord) -> dict[str, object]:
    """The record's request context and fields, in order, without the missing ones."""
    context = {"request_id": getattr(record, "request_id", None), "trace_id": getattr(record, "trace_id", None)}
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        context.update(fields)
    return {key: value for key, value in context.items() if value is not None}


class TextFormatter(logging.Formatter):
    """The text line, followed by the record's context as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{key}={value}" for key, value in context_of(record).items())
        return f"{line} {context}" if context else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the context, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context_of(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: LogFormat, level: str) -> None:
    """The root logger's one handler (stderr) in ``log_format``, at ``level``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
