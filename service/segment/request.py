"""POST /segment's request: the image file and the options, from a multipart form, a JSON object with the
image base64-encoded (as annotation tools such as CVAT's serverless functions send it) or a raw image body,
and the OpenAPI schema of the three. The parsing runs in a worker thread."""

from __future__ import annotations

import base64
import json
from typing import Any

from starlette.requests import Request

from service.core.errors import BadRequest, UnsupportedMediaType
from service.core.images import check_content_type
from service.core.options import SegmentOptions
from service.segment.multipart import MultipartError, parse_multipart
from service.web.body import inflate

SEGMENT_OPTIONS = SegmentOptions.model_json_schema()["properties"]
# The request body's schema: the image as a multipart file (with the options as form fields), as a JSON
# object (the image base64-encoded, with the options as members) or raw.
SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}, **SEGMENT_OPTIONS},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "byte",
                                  "description": "The image file, base64-encoded (a data: URL is accepted)"},
                        **SEGMENT_OPTIONS,
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def check_segment_type(request: Request) -> None:
    """Refuse before reading a raw body without a supported image type (UnsupportedMediaType)."""
    content_type = request.headers.get("content-type", "")
    if not content_type:
        raise UnsupportedMediaType("unsupported_media_type", "send the image as multipart field 'image', as a JSON "
                       "object with the base64 image in 'image', or as a raw body with an image/* content type")
    if not (is_multipart(content_type) or is_json(content_type)):
        check_content_type(content_type)


def is_multipart(content_type: str) -> bool:
    return content_type.lower().startswith("multipart/form-data")


def is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "application/json"


def image_from_multipart(body: bytes, content_type: str) -> tuple[bytes, dict[str, list[str]]]:
    """Worker thread: the ``image`` file part and the text fields of a multipart body."""
    try:
        form = parse_multipart(body, content_type)
    except MultipartError as exc:
        raise BadRequest("bad_multipart", str(exc)) from None
    part = form.files.get("image")
    if part is None:
        raise BadRequest("missing_image", "multipart field 'image' (a file) is required")
    check_content_type(part.content_type)
    return part.data, form.fields


def image_from_json(body: bytes) -> tuple[bytes, dict[str, Any]]:
    """Worker thread: the decoded ``image`` member and the other members of a JSON body. The image is
    smaller than the body, so the body's byte limit bounds it too."""
    try:
        values = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest("bad_json", f"the body is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise BadRequest("bad_json", "the body must be a JSON object")
    encoded = values.pop("image", None)
    if not isinstance(encoded, str):
        raise BadRequest("missing_image", "member 'image' (the image file, base64-encoded) is required")
    if encoded.startswith("data:"):  # a data URL, as browsers' FileReader writes it
        encoded = encoded.partition(",")[2]
    try:
        data = base64.b64decode("".join(encoded.split()), validate=True)
    except ValueError:
        raise BadRequest("bad_base64", "member 'image' is not valid base64") from None
    return data, values


def image_and_options(
    body: bytes, content_type: str, encoding: str, options: SegmentOptions, limit: int
) -> tuple[bytes, SegmentOptions]:
    """Worker thread: the image file of a /segment body, and the query's options overridden by the
    body's (form fields or JSON members)."""
    body = inflate(body, encoding, limit)
    if is_multipart(content_type):
        data, fields = image_from_multipart(body, content_type)
        return data, options.with_form(fields)
    if is_json(content_type):
        data, values = image_from_json(body)
        return data, options.overridden(values)
    return body, options


