"""Synchronous multipart/form-data parsing of an already-read body, for a worker thread.

Starlette's ``Request.form()`` parses on the event loop; a 20 MB upload would hold the loop for tens
of ms. Here python-multipart's streaming parser runs over the bytes in a thread instead, with callbacks
that keep each part's slices in memory. Its higher-level FormParser (Field and File objects, files copied
into a BytesIO) gives the same form 1.3x to 4x slower: 0.050 ms against 0.040 ms for a 480x640 JPEG and
103 ms against 28 ms at the 20 MiB upload limit (benchmarks/libraries_vs_ours.py, RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:  # python-multipart declares its callbacks' types for type checkers only
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 64 * 1024  # option fields are short; a huge one is an error, not an option


class MultipartError(ValueError):
    """The body is not valid multipart/form-data."""


@dataclass
class FilePart:
    content_type: str | None
    data: bytes


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)  # each text field's values, in order
    files: dict[str, FilePart] = field(default_factory=dict)  # the first file of each name


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)


def parse_multipart(body: bytes, content_type: str) -> Form:
    """Fields (as text) and files (first of each name) of a multipart body."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("multipart body without a boundary")
    parts: list[_Part] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[header[0].strip().lower()] = header[1].strip()
        header[0], header[1] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].chunks.append(data[start:end])

    callbacks: MultipartCallbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as exc:
        raise MultipartError(f"malformed multipart body ({exc})") from None
    return _collect(parts)


def _collect(parts: list[_Part]) -> Form:
    form = Form()
    for part in parts:
        _, disp = parse_options_header(part.headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(part.chunks)
        if b"filename" in disp:
            if name not in form.files:
                ctype = part.headers.get(b"content-type")
                form.files[name] = FilePart(ctype.decode("latin-1") if ctype else None, data)
        elif name:
            if len(data) > MAX_FIELD_BYTES:
                raise MultipartError(f"form field {name!r} is too long")
            form.fields.setdefault(name, []).append(data.decode("utf-8", "replace"))
    return form
