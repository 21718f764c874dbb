"""Image decoding: formats, EXIF orientation, mode conversion, and limits checked before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.core.errors import BadRequest, ServiceError, TooLarge, UnsupportedMediaType
from service.core.images import check_content_type, decode_image

LIMIT = 10_000_000


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h: int = 40, w: int = 60) -> np.ndarray:
    rng = np.random.default_rng(h * w)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip(fmt: str) -> None:
    arr = _rgb()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_encode(Image.fromarray(arr), fmt, **kw), LIMIT)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    assert np.array_equal(out, arr)


def test_jpeg_with_exif_orientation_is_upright() -> None:
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    out = decode_image(_encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95), LIMIT)
    assert out.shape == (60, 40, 3)
    assert out[:30].mean() > 200 and out[30:].mean() < 50  # left became top


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "CMYK"])
def test_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "LA" else "PNG")
    yy, xx = np.mgrid[0:40, 0:60]
    smooth = np.stack([xx * 4, yy * 6, (xx + yy) * 2], axis=2).astype(np.uint8)  # JPEG-friendly
    im = Image.fromarray(smooth).convert(mode)
    out = decode_image(_encode(im, fmt), LIMIT)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    ref = np.asarray(im.convert("RGB"))
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    out = decode_image(_encode(Image.fromarray(ramp), "PNG"), LIMIT)
    assert out.shape == (8, 64, 3)
    assert np.array_equal(out[..., 0], (ramp >> 8).astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_tiff_first_frame() -> None:
    frames = [Image.fromarray(np.full((10, 12, 3), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue(), LIMIT).max() == 10


def test_pixel_limit_is_checked_from_the_header() -> None:
    # 6000 x 6000 zeros: a few KB of PNG, 108 MB once decoded. Refused without decoding.
    bomb = _encode(Image.new("L", (6000, 6000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(TooLarge):
        decode_image(bomb, LIMIT)


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"", BadRequest), (b"definitely not an image", BadRequest),
     (_encode(Image.new("RGB", (8, 8)), "GIF"), UnsupportedMediaType)],
)
def test_bad_inputs(data: bytes, kind: type[ServiceError]) -> None:
    with pytest.raises(kind):
        decode_image(data, LIMIT)


def test_truncated_image_is_400() -> None:
    data = _encode(Image.fromarray(_rgb(200, 200)), "PNG")
    with pytest.raises(BadRequest):
        decode_image(data[: len(data) // 2], LIMIT)


def test_content_types() -> None:
    for ok in ("image/jpeg", "image/png; charset=binary", "application/octet-stream", None):
        check_content_type(ok)
    for bad in ("application/pdf", "text/plain", "image/gif"):
        with pytest.raises(UnsupportedMediaType):
            check_content_type(bad)
