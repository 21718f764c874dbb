"""Sliced inference's geometry: which windows of a large image the model sees, at the original resolution.

A request's ``tiles`` option (service/core/options.py) is parsed here into a :class:`TileSpec`, and
``plan_tiles`` turns it, the image's size and the model's input policy into the tile windows, or None when
the image is to be run whole as today. The policy shrinks a 4000 x 3000 photo to 426 x 320 for a model of
short side 320: an object of 60 pixels becomes 6 and vanishes. Cut into windows of 640 x 640, each shrunk
only 2 times, it keeps 30.

- ``none`` (the default): never tile.
- ``auto``: tile only an image the policy would shrink by more than ``AUTO_FACTOR``, into square windows of
  ``AUTO_FACTOR`` times the model's short side (so no object is shrunk by more than that factor); windows grow
  when needed to stay within the server's tile cap, so ``auto`` is never refused for its count.
- ``CxR`` (e.g. ``4x3``): a grid of C columns by R rows, the window size derived from the overlap.
- ``Spx`` or ``WxHpx`` (e.g. ``640px``, ``800x600px``): windows of that size in original pixels.

An image the policy does not shrink is never tiled (its tiles would only be enlarged), and a plan of one
window covering the whole image is no plan: both run exactly as an untiled request.

Along each axis the windows are spread evenly from one border to the other, neighbours overlapping by at
least ``overlap`` times the window (SAHI's ``get_slice_bboxes`` counts windows the same way, then pushes the
last one back inside the image, so its last overlap is larger than the others; spreading them evenly gives
every seam the same overlap). SAHI itself is not used: its slicing module imports its annotation, COCO and
OpenCV-GUI utilities, a dozen packages for these few lines, and its merging works on full-image masks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from contract import resized_size

AUTO_FACTOR = 2  # auto tiles an image the policy shrinks more than this, into windows shrunk exactly this much
DEFAULT_OVERLAP = 0.2  # share of a window that its neighbour sees too (SAHI's default)
MAX_OVERLAP = 0.5  # overlap must stay below it: at 0.5 every pixel is seen by two windows per axis
MIN_TILE_SIDE = 64  # px: an explicit window no smaller than this
MAX_GRID_SIDE = 64  # columns or rows of an explicit grid
_SPEC = re.compile(r"^(?:(?P<mode>none|auto)|(?P<cols>\d+)x(?P<rows>\d+)|(?P<w>\d+)(?:x(?P<h>\d+))?px)$")
SPEC_HELP = "none, auto, a grid CxR (e.g. 4x3) or a window size Spx / WxHpx in original pixels (e.g. 640px)"


@dataclass(frozen=True)
class TileSpec:
    """A parsed ``tiles`` option: the mode and, for ``grid``, columns and rows; for ``size``, the window."""

    mode: str  # "auto", "grid" or "size"
    cols: int = 0
    rows: int = 0
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Tiling:
    """A request's tiling: the spec, the overlap between neighbours, and whether the whole image is run too."""

    spec: TileSpec
    overlap: float = DEFAULT_OVERLAP
    full_image: bool = False


@dataclass(frozen=True)
class Window:
    """One tile: the pixels [x0, x1) x [y0, y1) of the original image."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


class TooManyTiles(ValueError):
    """An explicit grid or window size would cut the image into more tiles than the server takes."""


def parse_tiles(text: str) -> TileSpec | None:
    """``text`` as a TileSpec, None for ``none``; ValueError saying the accepted forms otherwise."""
    match = _SPEC.match(text.strip().lower())
    if match is None:
        raise ValueError(f"'{text}' is not one of: {SPEC_HELP}")
    if match["mode"] == "none":
        return None
    if match["mode"] == "auto":
        return TileSpec("auto")
    if match["cols"] is not None:
        cols, rows = int(match["cols"]), int(match["rows"])
        if not (1 <= cols <= MAX_GRID_SIDE and 1 <= rows <= MAX_GRID_SIDE):
            raise ValueError(f"a grid has 1 to {MAX_GRID_SIDE} columns and rows, not {cols}x{rows}")
        return TileSpec("grid", cols=cols, rows=rows)
    width = int(match["w"])
    height = width if match["h"] is None else int(match["h"])
    if min(width, height) < MIN_TILE_SIDE:
        raise ValueError(f"a window is at least {MIN_TILE_SIDE} px a side, not {width}x{height}")
    return TileSpec("size", width=width, height=height)


def axis_count(length: int, tile: int, overlap: float) -> int:
    """Windows of ``tile`` needed to cover ``length`` with neighbours overlapping by at least ``overlap``."""
    if tile >= length:
        return 1
    stride = tile - math.floor(overlap * tile)
    return math.ceil((length - tile) / stride) + 1


def axis_starts(length: int, tile: int, count: int) -> list[int]:
    """``count`` window starts spread evenly from 0 to ``length - tile``."""
    if count == 1:
        return [0]
    return [round(k * (length - tile) / (count - 1)) for k in range(count)]


def grid_tile(length: int, count: int, overlap: float) -> int:
    """The window that covers ``length`` in ``count`` windows overlapping by ``overlap``."""
    return min(length, math.ceil(length / (count - (count - 1) * overlap)))


def windows(
    height: int, width: int, tile_h: int, tile_w: int, overlap: float, rows: int = 0, cols: int = 0
) -> list[Window]:
    """The windows of ``tile_h`` x ``tile_w`` covering the image, row by row: ``rows`` x ``cols`` of them
    when given, else as many as the overlap needs."""
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    ys = axis_starts(height, tile_h, rows or axis_count(height, tile_h, overlap))
    xs = axis_starts(width, tile_w, cols or axis_count(width, tile_w, overlap))
    return [Window(x, y, x + tile_w, y + tile_h) for y in ys for x in xs]


def plan_tiles(
    spec: TileSpec | None, height: int, width: int, overlap: float, min_size: int, max_size: int, max_tiles: int
) -> list[Window] | None:
    """The windows to run for an image of ``height`` x ``width`` under the model's policy (``min_size``,
    ``max_size``), or None to run it whole. TooManyTiles when an explicit spec needs more than ``max_tiles``."""
    if spec is None:
        return None
    scale = resized_size(height, width, min_size, max_size)[0] / height
    if scale >= 1 or (spec.mode == "auto" and scale >= 1 / AUTO_FACTOR):
        return None
    if spec.mode == "auto":
        side = AUTO_FACTOR * min_size
        while len(tiles := windows(height, width, side, side, overlap)) > max_tiles:
            side = math.ceil(side * 1.1)
    elif spec.mode == "grid":
        tile_h, tile_w = grid_tile(height, spec.rows, overlap), grid_tile(width, spec.cols, overlap)
        tiles = windows(height, width, tile_h, tile_w, overlap, spec.rows, spec.cols)
    else:
        tiles = windows(height, width, spec.height, spec.width, overlap)
    if len(tiles) > max_tiles:
        raise TooManyTiles(f"these tiles cut the {width}x{height} image into {len(tiles)}; this server takes "
                           f"at most {max_tiles} a request (use larger tiles, a smaller grid, or tiles=auto)")
    return None if len(tiles) == 1 else tiles
