"""The picture of a result: every mask tinted in its class's colour, its box, and a ``name score`` label.

The style is defined here once. ``style()`` is what the web page (service/page/static/page.js) fetches from
``GET /page.json``, and ``draw`` renders the same picture in Python, so a PNG written by the overlay
command and the page's canvas agree: the same colours, the same integer blend of the masks (identical
pixels), boxes on the same pixel rows and columns, labels in the same place (only the font differs).

Rules both sides follow: a class's colour is ``PALETTE[(class_id - 1) % len(PALETTE)]``; masks are
blended lowest score first (so the best detection ends on top) as ``(p * (256 - a) + c * a + 128) >> 8``
with ``a = MASK_ALPHA``; a box covers the pixels from floor(x1), floor(y1) to ceil(x2), ceil(y2)
(exclusive), clipped to the image, drawn inward with the line width; the label sits on a filled
rectangle above the box's top-left corner, or inside the box when there is no room above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Sasha Trubetskoy's "20 simple, distinct colours" (the first 16, those that stay readable at half opacity).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128),
)
MASK_ALPHA = 128  # out of 256: half opacity
HIGHLIGHT_ALPHA = 208  # the page's hovered detection
MIN_LINE_PX, LINE_DIVISOR = 2, 320  # line width: max(MIN_LINE_PX, long side // LINE_DIVISOR)
MIN_FONT_PX, FONT_DIVISOR = 12, 40  # label text height, the same rule
DARK_TEXT_ABOVE = 150  # label text is black on colours brighter than this (Rec. 601 luma), white otherwise


class Drawable(Protocol):
    """What ``draw`` reads of a detection (service.client.Detection has it)."""

    @property
    def label(self) -> str: ...
    @property
    def class_id(self) -> int: ...
    @property
    def score(self) -> float: ...
    @property
    def box(self) -> Sequence[float]: ...
    @property
    def mask(self) -> np.ndarray | None: ...


def class_colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[(class_id - 1) % len(PALETTE)]


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > DARK_TEXT_ABOVE else (255, 255, 255)


def line_and_font_px(width: int, height: int) -> tuple[int, int]:
    long_side = max(width, height)
    return max(MIN_LINE_PX, long_side // LINE_DIVISOR), max(MIN_FONT_PX, long_side // FONT_DIVISOR)


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The box's pixels as x0, y0, x1, y1 (x1, y1 exclusive), clipped to the image."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return x0, y0, max(x0, x1), max(y0, y1)


def style() -> dict[str, object]:
    """The page's copy of the style (GET /page.json)."""
    return {
        "palette": [{"fill": list(c), "text": list(text_colour(c))} for c in PALETTE],
        "mask_alpha": MASK_ALPHA,
        "highlight_alpha": HIGHLIGHT_ALPHA,
        "min_line_px": MIN_LINE_PX,
        "line_divisor": LINE_DIVISOR,
        "min_font_px": MIN_FONT_PX,
        "font_divisor": FONT_DIVISOR,
    }


def label_text(det: Drawable) -> str:
    return f"{det.label} {det.score:.2f}"


def blend_masks(image: np.ndarray, detections: Sequence[Drawable], alpha: int = MASK_ALPHA) -> np.ndarray:
    """A copy of ``image`` (RGB uint8 [H, W, 3]) with every detection's mask tinted, lowest score first."""
    out = image.copy()
    for det in sorted(detections, key=lambda d: d.score):
        if det.mask is None:
            continue
        inside = det.mask.astype(bool)
        colour = np.array(class_colour(det.class_id), np.int32)
        out[inside] = ((out[inside].astype(np.int32) * (256 - alpha) + colour * alpha + 128) >> 8).astype(np.uint8)
    return out


def draw(image: np.ndarray, detections: Sequence[Drawable], boxes: bool = True) -> np.ndarray:
    """The overlay of ``detections`` on ``image`` (RGB uint8 [H, W, 3]): masks, and unless ``boxes`` is
    False the boxes and labels, as the web page draws them. Returns a new RGB uint8 array."""
    out = blend_masks(image, detections)
    if not boxes or not detections:
        return out
    height, width = out.shape[:2]
    line, font_px = line_and_font_px(width, height)
    pad = max(1, font_px // 6)
    font = ImageFont.load_default(size=font_px)
    canvas = Image.fromarray(out)
    pen = ImageDraw.Draw(canvas)
    ordered = sorted(detections, key=lambda d: d.score)
    for det in ordered:
        x0, y0, x1, y1 = pixel_box(det.box, width, height)
        if x1 > x0 and y1 > y0:
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), outline=class_colour(det.class_id), width=line)
    for det in ordered:  # labels after all boxes, so that no box crosses a label
        x0, y0, _, _ = pixel_box(det.box, width, height)
        text = label_text(det)
        label_w, label_h = math.ceil(pen.textlength(text, font=font)) + 2 * pad, font_px + 2 * pad
        top = y0 - label_h if y0 >= label_h else y0
        fill = class_colour(det.class_id)
        pen.rectangle((x0, top, x0 + label_w - 1, top + label_h - 1), fill=fill)
        pen.text((x0 + pad, top + pad), text, fill=text_colour(fill), font=font)
    return np.asarray(canvas)
