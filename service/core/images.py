"""Image decoding for the service: bytes -> RGB uint8 [H, W, 3], with limits checked before decoding.

Pillow reads only the header in ``Image.open``; the format and the pixel count are checked there, so
a decompression bomb or an unsupported format costs nothing. Errors say what is wrong (service/core/errors.py):
BadRequest undecodable or empty, TooLarge too many pixels, UnsupportedMediaType.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.errors import BadRequest, TooLarge, UnsupportedMediaType

# Pillow format names we accept (MPO is a multi-picture JPEG, as phone cameras write).
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF"}
SUPPORTED_TYPES = {
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/x-bmp",
    "image/x-ms-bmp",
    "image/tiff",
    "image/tif",
}


def check_content_type(content_type: str | None) -> None:
    """Refuse declared non-image types early (415); a missing or generic type is sniffed instead."""
    if not content_type:
        return
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in ("application/octet-stream", "image/*"):
        return
    if ctype not in SUPPORTED_TYPES:
        raise UnsupportedMediaType("unsupported_media_type", f"unsupported content type {ctype!r}; "
                         "send JPEG, PNG, WebP, BMP or TIFF")


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode to RGB uint8; 16-bit and 32-bit integer data are scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        if im.mode == "I" and arr.max(initial=0) <= 255:
            gray = arr.astype(np.uint8)
        else:  # 16-bit range (Pillow loads 16-bit grayscale PNG/TIFF as I;16 or I)
            gray = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        gray = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def check_size(width: int, height: int, max_pixels: int) -> None:
    """The limits on an image's size, for encoded files (read from the header) and raw pixels alike."""
    if width * height > max_pixels:
        raise TooLarge("image_too_large",
                         f"the image has {width}x{height} pixels, more than the limit of {max_pixels}")
    if width == 0 or height == 0:
        raise BadRequest("empty_image", "the image has no pixels")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP/TIFF (first frame) to RGB uint8 [H, W, 3], EXIF orientation applied."""
    if not data:
        raise BadRequest("empty_image", "the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge("image_too_large", "the image has too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest("undecodable_image", "the data is not a decodable image") from None
    if im.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaType("unsupported_media_type", f"unsupported image format {im.format}; "
                         "send JPEG, PNG, WebP, BMP or TIFF")
    check_size(*im.size, max_pixels)
    try:
        im.seek(0)
        im.load()
        rgb = _to_rgb(ImageOps.exif_transpose(im) or im)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadRequest("undecodable_image", f"the image could not be decoded ({exc})") from None
    return np.ascontiguousarray(rgb)

