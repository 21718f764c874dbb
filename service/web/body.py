"""A request's body within the server's limit, read the same way by every front door.

A body over the limit is refused with 413. Answering while the client is still sending and then closing
the connection makes the kernel reset it, and a client that writes its whole body before reading (Python's
urllib, most HTTP libraries) then sees a broken pipe instead of the answer. So, like nginx's lingering
close, the rest of an oversized body is read and dropped first, up to ``DISCARD_BYTES`` and
``DISCARD_TIMEOUT_S``; past either bound the connection is closed anyway.

``Content-Encoding: gzip`` or ``deflate`` (the zlib format, as HTTP means it) bodies are inflated under
the same limit, so a small compressed bomb is a 413 as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from service.core.errors import BadRequest, TooLarge, UnsupportedMediaType

DISCARD_BYTES = 64 * 1024 * 1024
DISCARD_TIMEOUT_S = 10.0
# zlib's window bits for each Content-Encoding we inflate: 16 + 15 expects a gzip header, 15 a zlib one.
INFLATE_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def too_large(message: str) -> TooLarge:
    return TooLarge("payload_too_large", message)


async def check_declared_length(request: Request, limit: int) -> None:
    """Refuse before reading (and before taking a slot) a body whose declared length is over ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await _discard(request.stream())
        raise too_large(f"the body has {declared} bytes, more than {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (TooLarge) as soon as it passes ``limit`` bytes (also for chunked uploads)."""
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _discard(stream)
            raise too_large(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _discard(stream: AsyncIterator[bytes]) -> None:
    """Read and drop what the client still sends, within the bounds."""
    dropped = 0
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            async for chunk in stream:
                dropped += len(chunk)
                if dropped > DISCARD_BYTES:
                    break


def content_encoding(request: Request) -> str:
    """The body's Content-Encoding, lower-case; refused (UnsupportedMediaType) unless it is one we inflate."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", *INFLATE_WBITS):
        raise UnsupportedMediaType("unsupported_content_encoding",
                       f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or an uncompressed body")
    return encoding


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """Worker thread: the body decompressed per its ``encoding`` (see ``content_encoding``), at most
    ``limit`` bytes (TooLarge beyond); a truncated or corrupt stream is a BadRequest."""
    if encoding not in INFLATE_WBITS:
        return data
    inflater = zlib.decompressobj(INFLATE_WBITS[encoding])
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise BadRequest("bad_content_encoding", f"the {encoding} body cannot be decompressed ({exc})") from None
    if len(out) > limit:
        raise too_large(f"the body is larger than {limit} bytes once decompressed")
    if not inflater.eof:
        raise BadRequest("bad_content_encoding", f"the {encoding} body is truncated")
    return out
