"""A Python client of the service, and the overlay command.

    from service.client import SegmentClient, draw
    client = SegmentClient("http://127.0.0.1:8000")                 # api_key=KEY, or MRCNN_API_KEY
    detections = client.segment("photo.jpg", score_threshold=0.6)   # masks decoded to numpy
    picture = draw(image_rgb, detections)                            # the web page's overlay

    python -m service.client IMAGE... --url URL --out DIR [--json] [--api-key KEY]   # also mrcnn-segment

With a key (``api_key``, ``--api-key``, else the ``MRCNN_API_KEY`` environment variable) every request carries
``Authorization: Bearer <key>`` (docs/front_door.md).

HTTP is the standard library's http.client (the image goes as the raw body, the options in the query
string; ``send_until_answered`` says why not urllib), masks are decoded by pycocotools and the picture
is drawn by service/overlay.py: nothing beyond the service's own dependencies.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import mimetypes
import os
import select
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from commandline import ArgumentParser, CommandError, output_folder, run_command
from service.core.images import decode_image
from service.core.options import SegmentOptions
from service.overlay import draw

__all__ = ["Detection", "SegmentClient", "SegmentError", "detections_of", "draw", "main"]
DEFAULT_URL = os.environ.get("MRCNN_URL", "http://127.0.0.1:8000")
API_KEY_VARIABLE = "MRCNN_API_KEY"
OPTION_NAMES = tuple(SegmentOptions.model_fields)
SEND_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Detection:
    """One detection of a response, its mask as a boolean [H, W] array of the whole image."""

    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the image's pixels
    area: int
    mask: np.ndarray | None  # None when the request left rle out of its formats
    polygons: list[list[float]] | None


class SegmentError(Exception):
    """The server refused the request (``status`` and ``code`` are its), or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def detections_of(body: dict[str, Any]) -> list[Detection]:
    """The detections of a /segment response, the RLE masks decoded in one pycocotools call."""
    dets = body["detections"]
    masks = None
    if dets and all("mask" in d for d in dets):
        masks = mask_utils.decode([d["mask"] for d in dets]).astype(bool)  # [H, W, N]
    return [
        Detection(
            label=d["label"], class_id=d["class_id"], score=d["score"], box=tuple(d["box"]), area=d["area"],
            mask=None if masks is None else masks[:, :, i], polygons=d.get("polygons"),
        )
        for i, d in enumerate(dets)
    ]


class SegmentClient:
    """The service at ``url``; every call is one HTTP request, errors are SegmentError. ``api_key`` is sent as
    ``Authorization: Bearer <key>``; None (the default) takes it from MRCNN_API_KEY when that is set, "" sends
    none."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        key = os.environ.get(API_KEY_VARIABLE, "") if api_key is None else api_key
        if any(c in key for c in "\r\n\0"):
            raise ValueError("the API key has a line break or NUL: it cannot go in a header")
        self._api_key = key or None  # private, and never in a message: it is a secret

    def __repr__(self) -> str:
        return f"SegmentClient({self.url!r}, timeout={self.timeout:g}, api_key={'***' if self._api_key else None})"

    def model(self) -> dict[str, Any]:
        """GET /v1/model: name, version, classes, input policy."""
        info: dict[str, Any] = json.loads(self._exchange("GET", "/v1/model"))
        return info

    def request(self, image: str | os.PathLike[str] | bytes, **options: object) -> dict[str, Any]:
        """POST /segment: the parsed response. ``options`` are /segment's (score_threshold,
        max_detections, classes, formats, tiles, tile_overlap, tile_full_image; lists may be given as lists);
        formats defaults to rle."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; /segment takes {list(OPTION_NAMES)}")
        options.setdefault("formats", "rle")
        query = urllib.parse.urlencode(
            {k: ",".join(map(str, v)) if isinstance(v, list | tuple) else v for k, v in options.items()
             if v is not None}
        )
        data, content_type = read_image(image)
        body: dict[str, Any] = json.loads(self._exchange("POST", f"/segment?{query}", data, content_type))
        return body

    def segment(self, image: str | os.PathLike[str] | bytes, **options: object) -> list[Detection]:
        """POST /segment: the detections, best first, masks decoded."""
        return detections_of(self.request(image, **options))

    def _exchange(self, method: str, path: str, body: bytes = b"", content_type: str | None = None) -> bytes:
        """One request on a fresh connection; the body's 2xx answer, or SegmentError."""
        parts = urllib.parse.urlsplit(self.url)
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = connection(parts.netloc, timeout=self.timeout)
        try:
            conn.putrequest(method, parts.path + path)
            if content_type:
                conn.putheader("Content-Type", content_type)
            if self._api_key:
                conn.putheader("Authorization", f"Bearer {self._api_key}")
            if body or method == "POST":
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            send_until_answered(conn, body)
            response = conn.getresponse()
            data = response.read()
        except TimeoutError:
            raise SegmentError(f"no answer from {self.url} within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise SegmentError(f"cannot reach the server at {self.url} ({exc or type(exc).__name__})") from None
        finally:
            conn.close()
        if response.status >= 400:
            raise refusal(response.status, data)
        return data


def send_until_answered(conn: http.client.HTTPConnection, body: bytes) -> None:
    """Send ``body``, stopping early if the server answers first.

    The server refuses a body over its limit (413) from the declared Content-Length alone and closes the
    connection without reading the rest; a client that kept sending would get a connection reset instead
    of the server's message (urllib does). So the socket is checked for an answer between chunks.
    """
    view = memoryview(body)
    for start in range(0, len(view), SEND_CHUNK):
        if select.select([conn.sock], [], [], 0)[0]:
            return
        try:
            conn.sock.sendall(view[start : start + SEND_CHUNK])
        except (BrokenPipeError, ConnectionResetError):
            return  # the answer, if any, is read next


def refusal(status: int, body: bytes) -> SegmentError:
    """The server's own message, from its JSON error body when it has one."""
    try:
        error = json.loads(body)["error"]
        return SegmentError(f"{status} {error['code']}: {error['message']}", status, error["code"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return SegmentError(f"{status}: {text[0] if text else 'no message'}", status)


def read_image(image: str | os.PathLike[str] | bytes) -> tuple[bytes, str]:
    """The bytes to send and their content type (from the file name; unknown: the server sniffs)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image), "application/octet-stream"
    path = Path(image)
    data = path.read_bytes()
    guessed = mimetypes.guess_type(path.name)[0]
    return data, guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


# ---- the command -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m service.client",
                       description="Segment images with the service and write their overlays.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the service (default: MRCNN_URL or {DEFAULT_URL})")
    p.add_argument("--out", type=output_folder, default=Path("."),
                   help="folder for IMAGE-stem.overlay.png, -2, -3... for a stem seen before (default: .)")
    p.add_argument("--score-threshold", type=float, help="drop detections at or below it (default: the server's)")
    p.add_argument("--max-detections", type=int)
    p.add_argument("--classes", help="class names to keep, comma-separated")
    p.add_argument("--tiles", help="sliced inference for large images: auto, a grid CxR, a window Spx or WxHpx "
                   "(default: none)")
    p.add_argument("--tile-overlap", type=float, help="share of a tile its neighbour sees too (default: 0.2)")
    p.add_argument("--tile-full-image", action="store_true", help="with --tiles, also run the whole image")
    p.add_argument("--json", action="store_true", help="print each raw response (one line each) instead of a table")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--api-key", default=None, help=f"the server's API key, sent as 'Authorization: Bearer' "
                   f"(default: {API_KEY_VARIABLE}; prefer it, a command line is visible to other users)")
    return p.parse_args(argv)


def overlay_path(folder: Path, image: Path, written: set[Path]) -> Path:
    """``folder/<stem>.overlay.png``, or ``<stem>-2``, ``-3``... when this run already wrote that name (x.jpg
    and x.png, a/x.jpg and b/x.jpg), so one run never overwrites its own overlays."""
    out, n = folder / f"{image.stem}.overlay.png", 1
    while out in written:
        n += 1
        out = folder / f"{image.stem}-{n}.overlay.png"
    return out


def table(dets: Sequence[Detection]) -> str:
    rows = [f"  {'label':<14} {'score':>6}  {'box (x1, y1, x2, y2)':<28} {'area':>8}"]
    for d in dets:
        box = "[" + ", ".join(f"{v:.1f}" for v in d.box) + "]"
        rows.append(f"  {d.label:<14} {d.score:>6.3f}  {box:<28} {d.area:>8}")
    return "\n".join(rows)


def overlay_png(data: bytes, dets: Sequence[Detection]) -> bytes:
    """The overlay of the image as the server decoded it (orientation applied), as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(draw(decode_image(data, sys.maxsize), dets)).save(buf, format="PNG")
    return buf.getvalue()


def segment_images(argv: Sequence[str] | None = None) -> int:
    """0 when every image was segmented, 1 otherwise (one ``error:`` line per image that failed)."""
    args = parse_args(argv)
    try:
        client = SegmentClient(args.url, args.timeout, args.api_key)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    options = {"score_threshold": args.score_threshold, "max_detections": args.max_detections,
               "classes": args.classes, "tiles": args.tiles, "tile_overlap": args.tile_overlap,
               "tile_full_image": args.tile_full_image or None}
    failed = False
    written: set[Path] = set()
    for path in args.images:
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"error: {path}: cannot read it ({exc.strerror or exc})", file=sys.stderr)
            failed = True
            continue
        try:
            body = client.request(data, **options)
        except SegmentError as exc:
            if exc.status in (None, 401):  # the server is down, or refuses the key: every other image would fail too
                raise CommandError(f"{path}: {exc}") from None
            print(f"error: {path}: {exc}", file=sys.stderr)
            failed = True
            continue
        dets = detections_of(body)
        out = overlay_path(args.out, path, written)
        write_overlay(out, overlay_png(data, dets))
        written.add(out)
        if args.json:
            print(json.dumps(body, separators=(",", ":")))
        else:
            total = body["timings"]["total_ms"]
            print(f"{path}: {len(dets)} detection(s) in {total:.0f} ms -> {out}")
            print(table(dets))
    return 1 if failed else 0


def write_overlay(out: Path, png: bytes) -> None:
    """Write the overlay (encoded before, so a failure leaves no half file); a folder that cannot take it
    stops the run, as every later image would fail the same way."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
    except OSError as exc:
        raise CommandError(f"cannot write {out} ({exc.strerror or exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``mrcnn-segment``: exit 0 when every image was segmented, 1 otherwise, 2 for a bad command line."""
    return run_command(segment_images, argv)


if __name__ == "__main__":
    raise SystemExit(main())
