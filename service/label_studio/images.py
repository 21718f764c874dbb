"""A task's image file, from the URL Label Studio puts in the task, read within the server's byte limit.

Label Studio gives its own files as paths on itself (``/data/upload/...`` for uploads, ``/data/local-files/?d=...``
for local storage, ``/tasks/.../resolve/...`` for cloud storage): they are read from the configured Label Studio
URL with its token, which is sent to Label Studio only (not along a redirect, e.g. to a presigned bucket URL).
Plain http(s) URLs are read as they are, and data URLs decoded. The bytes then go through the same decoding
and pixel limit as /segment's (the pipeline's); this module only moves bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPResponse

from service.core.errors import BadRequest, TooLarge

CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class LabelStudio:
    """Where the Label Studio whose tasks we read lives, and the token its files are read with (None: none)."""

    url: str | None
    token: str | None

    def owns(self, url: str) -> bool:
        return self.url is not None and url.startswith(self.url.rstrip("/") + "/")


def read_task_image(url: str, studio: LabelStudio, limit: int, timeout_s: float) -> bytes:
    """Worker thread: the file at ``url`` (a Label Studio path, an http(s) or a data URL), at most ``limit``
    bytes (TooLarge beyond). BadRequest when it cannot be read, saying why."""
    if url.startswith("data:"):
        return data_url_bytes(url)
    if url.startswith("/"):
        if studio.url is None:
            raise BadRequest("label_studio_url_unset", f"the task's image {url!r} is a file of Label Studio's: "
                             "set MRCNN_LABEL_STUDIO_URL (and MRCNN_LABEL_STUDIO_TOKEN) for the server to read it")
        url = studio.url.rstrip("/") + url
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise BadRequest("unsupported_image_url", f"the task's image {url!r} is not an http(s) or data URL nor a "
                         "Label Studio file; connect the storage to Label Studio so that it serves the files")
    request = urllib.request.Request(url)
    if studio.token and studio.owns(url):
        request.add_unredirected_header("Authorization", authorization(studio, timeout_s))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return read_limited(response, limit)
    except urllib.error.HTTPError as exc:
        raise BadRequest("image_unreadable", f"GET {url} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BadRequest("image_unreadable", f"GET {url} failed ({exc})") from None


def read_limited(response: HTTPResponse, limit: int) -> bytes:
    """The response's body, refused (TooLarge) as soon as it passes ``limit`` bytes."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    while chunk := response.read(CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> TooLarge:
    return TooLarge("payload_too_large", f"the task's image has more than {limit} bytes ({size} read)")


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL (``data:image/png;base64,...``). They are fewer than the request
    body's, so the body's byte limit bounds them too."""
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise BadRequest("bad_data_url", "the task's data URL is not base64-encoded")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("bad_base64", "the task's data URL is not valid base64") from None


def authorization(studio: LabelStudio, timeout_s: float) -> str:
    """The Authorization header for Label Studio: ``Token`` with a legacy token; a personal access token (a
    JWT refresh token) is exchanged for an access token first (POST /api/token/refresh), then ``Bearer``."""
    assert studio.token is not None and studio.url is not None
    if studio.token.count(".") != 2:  # a legacy token is 40 hex digits; a JWT is header.payload.signature
        return f"Token {studio.token}"
    refresh = urllib.request.Request(
        studio.url.rstrip("/") + "/api/token/refresh", data=json.dumps({"refresh": studio.token}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    try:
        with urllib.request.urlopen(refresh, timeout=timeout_s) as response:
            access = json.loads(read_limited(response, CHUNK_BYTES))["access"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        raise BadRequest("label_studio_token_refused",
                         f"Label Studio refused MRCNN_LABEL_STUDIO_TOKEN ({exc})") from None
    return f"Bearer {access}"
