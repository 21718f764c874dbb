"""Sliced inference on a 4000 x 3000 image with 80 small shapes (tests/large_scene.py) and the demo model,
served on loopback, side by side:

- untiled: one request, the image shrunk to 426 x 320 by the model's policy;
- ``tiles=auto``, one request: 48 tiles of 640 x 640 through the batcher as one request's batches, stitched
  in the server;
- tile by tile: the client cuts the same 48 windows and sends one request per tile, one after the other and
  8 at a time, then stitches the answers itself with the same merge (service/core/stitching.py);

each with its recall and precision at mask IoU 0.5; and the merge's own cost for 500 detections (250 objects
each cut by a seam, seen in two tiles).

Run: ``python -m benchmarks.tiling_speed`` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
from pycocotools import mask as mask_utils

from benchmarks import machine, table, write_section
from service.app import create_app
from service.core.postprocess import encode_local
from service.core.settings import DEFAULT_MODEL_PATH, Settings
from service.core.stitching import Pieces, local_masks, merge
from service.core.tiling import TileSpec, Window, plan_tiles
from tests.helpers import ServerThread, encode
from tests.large_scene import LargeScene, large_scene, scores, seam_objects

SIZE = (3000, 4000)
MERGE_OBJECTS = 250


def post(url: str, data: bytes, **params: str | float) -> dict[str, Any]:
    r = httpx.post(f"{url}/segment", params={"formats": "rle", "score_threshold": 0.5, **params}, content=data,
                   headers={"content-type": "image/png"}, timeout=600)
    r.raise_for_status()
    answer: dict[str, Any] = r.json()
    return answer


def pieces_of(answers: list[dict[str, Any]], tiles: list[Window]) -> Pieces:
    """The per-tile answers as box-local pieces in image coordinates (what the server does inside)."""
    boxes, scores_, labels, views, origins, masks = [], [], [], [], [], []
    for answer, t in zip(answers, tiles, strict=True):
        for d in answer["detections"]:
            full = mask_utils.decode(d["mask"]).astype(bool)
            ys, xs = np.nonzero(full)
            if ys.size == 0:
                continue
            masks.append(full[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
            origins.append((xs.min() + t.x0, ys.min() + t.y0))
            x1, y1, x2, y2 = d["box"]
            boxes.append((x1 + t.x0, y1 + t.y0, x2 + t.x0, y2 + t.y0))
            scores_.append(d["score"])
            labels.append(d["class_id"])
            views.append((t.x0, t.y0, t.x1, t.y1))
    return Pieces(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores_, np.float32),
                  np.array(labels, np.int64), np.array(views, np.int64).reshape(-1, 4),
                  np.array(origins, np.int64).reshape(-1, 2), masks)


def stitched(p: Pieces, size: tuple[int, int]) -> dict[str, Any]:
    merged = merge(p)
    rles = encode_local(local_masks(merged, size), polygons=False).rles or []
    return {"detections": [{"mask": r, "class_id": int(c)} for r, c in zip(rles, merged.labels, strict=True)]}


def tile_by_tile(url: str, scene: LargeScene, tiles: list[Window], workers: int) -> dict[str, Any]:
    crops = [encode(np.ascontiguousarray(scene.image[t.y0 : t.y1, t.x0 : t.x1])) for t in tiles]
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda c: post(url, c), crops))
    return stitched(pieces_of(answers, tiles), scene.image.shape[:2])


def merge_input(seed: int = 0) -> Pieces:
    """MERGE_OBJECTS discs of radius 30-100 px on the 4000 x 3000 image, each cut by a vertical seam: the part
    each of two tiles (sharing a 160 px strip around the disc's centre) sees, 2 x MERGE_OBJECTS pieces."""
    rng = np.random.default_rng(seed)
    boxes, scores_, labels, views, origins, masks = [], [], [], [], [], []
    discs: list[tuple[int, int, int]] = []
    while len(discs) < MERGE_OBJECTS:  # apart from each other: each object is one detection after the merge
        r = int(rng.integers(30, 100))
        cx, cy = int(rng.integers(r + 600, SIZE[1] - r - 600)), int(rng.integers(r, SIZE[0] - r))
        if any((cx - x) ** 2 + (cy - y) ** 2 <= (r + q) ** 2 for x, y, q in discs):
            continue
        discs.append((cx, cy, r))
        yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
        disc = xx**2 + yy**2 <= r * r
        label = int(rng.integers(1, 5))
        for x0, x1 in ((cx - 560, cx + 80), (cx - 80, cx + 560)):
            lo, hi = max(x0, cx - r), min(x1, cx + r + 1)
            masks.append(disc[:, lo - (cx - r) : hi - (cx - r)])
            origins.append((lo, cy - r))
            boxes.append((lo, cy - r, hi, cy + r + 1))
            scores_.append(float(rng.uniform(0.5, 1)))
            labels.append(label)
            views.append((x0, 0, x1, SIZE[0]))
    return Pieces(np.array(boxes, np.float32), np.array(scores_, np.float32), np.array(labels, np.int64),
                  np.array(views, np.int64), np.array(origins, np.int64), masks)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median seconds of ``repeats`` calls (after one warm-up) and the last call's result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
    tiles = plan_tiles(TileSpec("auto"), *SIZE, 0.2, 320, 533, 48)
    assert tiles is not None
    scene = large_scene(0, SIZE, placed=seam_objects(tiles))
    data = encode(scene.image)
    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=64_000_000, request_timeout_s=600)
    rows = []
    with ServerThread(create_app(settings)) as server:
        url = server.url
        runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("untiled (1 request, image shrunk 9.4x)", lambda: post(url, data)),
            ("tiles=auto: 48 tiles, 1 request, batches of 8", lambda: post(url, data, tiles="auto")),
            ("tile by tile: 48 requests, one at a time", lambda: tile_by_tile(url, scene, tiles, 1)),
            ("tile by tile: 48 requests, 8 at a time", lambda: tile_by_tile(url, scene, tiles, 8)),
        ]
        for name, run in runs:
            seconds, answer = timed(run, args.repeats)
            s = scores(answer, scene, tiles)
            rows.append([name, f"{seconds:.2f}", f"{s['recall']:.2f}", f"{s['precision']:.2f}",
                         str(len(answer["detections"]))])
            print(rows[-1], flush=True)
    p = merge_input()
    merge_s, merged = timed(lambda: merge(p), 10)
    encode_s, _ = timed(lambda: encode_local(local_masks(merged, SIZE), polygons=False), 10)
    body = "\n\n".join([
        "## Sliced inference: a 4000x3000 image, 80 small shapes, the demo model",
        f"Command: `python -m benchmarks.tiling_speed` (median of {args.repeats} runs after a warm-up; the server "
        f"on loopback with its default settings: batches of up to 8, 2 worker threads). {machine()}. The machine "
        "was shared with other sessions' work while this ran: compare the rows with each other, not with other "
        "sections. Latency is the client's, from sending the 12-megapixel PNG to the parsed answer; tile by tile "
        "it includes the client's own work: cutting and PNG-encoding the 48 crops, decoding the answers' masks "
        "and the same merge. Recall and precision: mask IoU >= 0.5 with an object of the same class.",
        table(["run", "latency s", "recall", "precision", "detections"], rows),
        f"Merge step alone (service/core/stitching.py `merge`, greedy merging on mask IoS in the shared view) for "
        f"{len(p)} detections ({MERGE_OBJECTS} objects each cut by a seam, blocks of 60-200 px): "
        f"{merge_s * 1e3:.1f} ms, giving {len(merged)} detections; then their RLE (`local_masks` + `encode_local`): "
        f"{encode_s * 1e3:.1f} ms.",
    ])
    print(body)
    if not args.no_write:
        write_section("tiling_speed", body)


if __name__ == "__main__":
    main()
