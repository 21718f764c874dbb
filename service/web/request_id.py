"""Request IDs: one per HTTP request, to follow it from the client through every log line and back.

An incoming ``X-Request-ID`` (from a client, or a proxy such as nginx's ``$request_id``) is kept when it
is a sane token: 1 to 128 characters of letters, digits and ``-._:/+=@``. Anything else (too long, spaces,
control characters that could forge log lines) is replaced by a fresh random one rather than refused: an
ID is a help, never a reason to fail a request. The ID is the request's context (``current``), read by the
log formatter (service/web/logs.py) and the error bodies; service/web/request_log.py sets it and echoes it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

HEADER = "X-Request-ID"
_SANE = re.compile(r"[A-Za-z0-9\-._:/+=@]{1,128}")

current: ContextVar[str | None] = ContextVar("request_id", default=None)


def request_id_for(given: str | None) -> str:
    """``given`` when it is a sane ID, else a new one (32 hex digits)."""
    if given is not None and _SANE.fullmatch(given):
        return given
    return uuid.uuid4().hex
