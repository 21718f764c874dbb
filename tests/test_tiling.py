"""Sliced inference: the tiling geometry, the merge across seams, the places a tiled request holds, and the
demo model served on loopback finding small objects in a 4000 x 3000 image with ``tiles=auto`` that it misses
without (docs/tiling.md)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.core.batcher import DynamicBatcher, QueueFull
from service.core.postprocess import encode_local
from service.core.stitching import Pieces, local_masks, merge
from service.core.tiling import (
    AUTO_FACTOR,
    MAX_GRID_SIDE,
    TileSpec,
    TooManyTiles,
    Window,
    parse_tiles,
    plan_tiles,
    windows,
)
from tests.conftest import KnownImage
from tests.helpers import ServerThread, encode, metric_values, sample
from tests.large_scene import large_scene, scores, seam_objects

POLICY = {"min_size": 320, "max_size": 533}  # the demo model's (models/demo/README.md)
BIG = (3000, 4000)  # height, width: the policy shrinks it to 320 x 426, 9.4 times
CAP = 48  # the fixture server's MRCNN_MAX_TILES
# The bars of the large-image test. Measured (docs/tiling.md): untiled recall 0.00, tiled 1.00, precision
# 0.98, every cut object once with mask IoU 0.92-0.97.
UNTILED_RECALL_AT_MOST = 0.2
TILED_RECALL_AT_LEAST = 0.9
TILED_PRECISION_AT_LEAST = 0.9
CUT_IOU_AT_LEAST = 0.8


# -- the geometry -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "spec"),
    [("none", None), ("auto", TileSpec("auto")), (" AUTO ", TileSpec("auto")), ("4x3", TileSpec("grid", 4, 3)),
     ("640px", TileSpec("size", width=640, height=640)), ("800x600px", TileSpec("size", width=800, height=600))],
)
def test_the_tiles_option_reads_its_forms(text: str, spec: TileSpec | None) -> None:
    assert parse_tiles(text) == spec


@pytest.mark.parametrize("text", ["", "yes", "4x", "x3", "0x3", f"{MAX_GRID_SIDE + 1}x2", "4x3x2", "10px", "-5px",
                                  "640 px", "4.5x3"])
def test_the_tiles_option_refuses_other_forms(text: str) -> None:
    with pytest.raises(ValueError, match="not|grid|window"):
        parse_tiles(text)


def covered(tiles: list[Window], height: int, width: int) -> np.ndarray:
    seen = np.zeros((height, width), np.int32)
    for t in tiles:
        seen[t.y0 : t.y1, t.x0 : t.x1] += 1
    return seen


@pytest.mark.parametrize(("height", "width", "tile", "overlap"),
                         [(3000, 4000, 640, 0.2), (1000, 777, 300, 0.0), (901, 2000, 512, 0.45), (700, 640, 640, 0.2)])
def test_windows_cover_the_image_with_the_overlap_asked(height: int, width: int, tile: int, overlap: float) -> None:
    tiles = windows(height, width, tile, tile, overlap)
    assert (covered(tiles, height, width) > 0).all()
    assert {(t.width, t.height) for t in tiles} == {(min(tile, width), min(tile, height))}
    xs, ys = sorted({t.x0 for t in tiles}), sorted({t.y0 for t in tiles})
    for starts, side, length in ((xs, min(tile, width), width), (ys, min(tile, height), height)):
        seams = [side - (b - a) for a, b in zip(starts, starts[1:], strict=False)]
        assert all(s >= math.floor(overlap * side) for s in seams), seams
        assert len(starts) == 1 or max(seams) - min(seams) <= 1  # spread evenly
        # no window more than needed: one fewer, spread evenly, would overlap less than asked (or not cover)
        if len(starts) == 2:
            assert side < length
        elif len(starts) > 2:
            assert (length - side) / (len(starts) - 2) > side - math.floor(overlap * side)


def test_a_grid_has_its_columns_and_rows_and_overlap() -> None:
    tiles = plan_tiles(TileSpec("grid", 4, 3), *BIG, 0.25, **POLICY, max_tiles=CAP)
    assert tiles is not None and len(tiles) == 12
    assert len({t.x0 for t in tiles}) == 4 and len({t.y0 for t in tiles}) == 3
    t = tiles[0]
    assert tiles[1].x0 <= t.x1 - 0.25 * t.width + 1 and (covered(tiles, *BIG) > 0).all()


def test_auto_tiles_only_what_the_policy_shrinks_more_than_its_factor() -> None:
    auto = TileSpec("auto")
    side = AUTO_FACTOR * POLICY["min_size"]
    tiles = plan_tiles(auto, *BIG, 0.2, **POLICY, max_tiles=CAP)
    assert tiles is not None and {(t.width, t.height) for t in tiles} == {(side, side)} and len(tiles) == 48
    assert plan_tiles(auto, 600, 800, 0.2, **POLICY, max_tiles=CAP) is None  # shrunk 1.9 times: run whole
    assert plan_tiles(auto, 700, 800, 0.2, **POLICY, max_tiles=CAP) is not None  # 2.2 times
    # past the cap, auto grows its windows instead of refusing
    fewer = plan_tiles(auto, *BIG, 0.2, **POLICY, max_tiles=12)
    assert fewer is not None and len(fewer) <= 12 and fewer[0].width > side


def test_an_image_the_policy_does_not_shrink_is_never_tiled() -> None:
    for spec in (TileSpec("auto"), TileSpec("grid", 3, 3), TileSpec("size", width=100, height=100)):
        assert plan_tiles(spec, 320, 480, 0.2, **POLICY, max_tiles=CAP) is None
    # one window over the whole image is no plan either
    assert plan_tiles(TileSpec("size", width=5000, height=5000), *BIG, 0.2, **POLICY, max_tiles=CAP) is None
    assert plan_tiles(TileSpec("grid", 1, 1), *BIG, 0.2, **POLICY, max_tiles=CAP) is None


def test_explicit_tiles_past_the_cap_are_refused() -> None:
    with pytest.raises(TooManyTiles, match="into 64; this server takes at most 48"):
        plan_tiles(TileSpec("grid", 8, 8), *BIG, 0.2, **POLICY, max_tiles=CAP)
    with pytest.raises(TooManyTiles, match="at most 48"):
        plan_tiles(TileSpec("size", width=256, height=256), *BIG, 0.2, **POLICY, max_tiles=CAP)


# -- the merge --------------------------------------------------------------------------------------------
def disc(cx: int, cy: int, r: int, height: int = 400, width: int = 600) -> np.ndarray:
    ys, xs = np.ogrid[:height, :width]
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def pieces(parts: list[tuple[np.ndarray, Window, float, int]]) -> Pieces:
    """Detections given as full-image masks, each clipped to the window it was seen in, kept box-locally."""
    origins, masks, boxes = [], [], []
    for mask, view, _, _ in parts:
        clipped = np.zeros_like(mask)
        clipped[view.y0 : view.y1, view.x0 : view.x1] = mask[view.y0 : view.y1, view.x0 : view.x1]
        ys, xs = np.nonzero(clipped)
        origins.append((xs.min(), ys.min()))
        masks.append(clipped[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return Pieces(np.array(boxes, np.float32), np.array([p[2] for p in parts], np.float32),
                  np.array([p[3] for p in parts], np.int64),
                  np.array([(v.x0, v.y0, v.x1, v.y1) for _, v, _, _ in parts], np.int64),
                  np.array(origins, np.int64), masks)


def full_masks(p: Pieces, height: int = 400, width: int = 600) -> np.ndarray:
    rles = encode_local(local_masks(p, (height, width)), polygons=False).rles
    assert rles is not None
    return np.moveaxis(mask_utils.decode(rles), 2, 0).astype(bool)


LEFT, RIGHT = Window(0, 0, 340, 400), Window(260, 0, 600, 400)  # two tiles sharing x in [260, 340)


def test_an_object_cut_by_a_seam_comes_back_once_with_its_whole_mask() -> None:
    whole = disc(300, 200, 90)  # wider than the shared strip: neither tile sees it whole
    other = disc(480, 80, 40)  # the same class elsewhere, seen by the right tile only
    p = pieces([(whole, LEFT, 0.7, 1), (whole, RIGHT, 0.9, 1), (other, RIGHT, 0.8, 1)])
    merged = merge(p)
    assert len(merged) == 2
    assert merged.scores.tolist() == pytest.approx([0.9, 0.8]) and merged.labels.tolist() == [1, 1]
    masks = full_masks(merged)
    assert np.array_equal(masks[0], whole) and np.array_equal(masks[1], other)
    assert merged.boxes[0].tolist() == [210, 110, 391, 291]  # the union of the two pieces' boxes


def test_a_piece_of_an_object_another_tile_saw_whole_joins_it() -> None:
    whole = disc(320, 200, 30)  # inside the shared strip's reach: the right tile sees it whole
    merged = merge(pieces([(whole, LEFT, 0.95, 2), (whole, RIGHT, 0.6, 2)]))
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.95)
    assert np.array_equal(full_masks(merged)[0], whole)


def test_neighbours_and_other_classes_stay_apart() -> None:
    a, b = disc(300, 200, 50), disc(300, 200, 50)
    touching = disc(300, 301, 50) & ~a  # the same class, adjacent across the seam, not overlapping
    merged = merge(pieces([(a, LEFT, 0.9, 1), (b, RIGHT, 0.8, 3), (touching, RIGHT, 0.7, 1)]))
    assert len(merged) == 3 and sorted(merged.labels.tolist()) == [1, 1, 3]


def test_duplicates_within_one_view_merge_and_small_overlaps_do_not() -> None:
    view = Window(0, 0, 600, 400)
    big, inside, apart = disc(200, 200, 80), disc(210, 200, 60), disc(330, 200, 60)  # apart: IoS 0.12 with big
    merged = merge(pieces([(big, view, 0.9, 1), (inside, view, 0.5, 1), (apart, view, 0.6, 1)]))
    assert len(merged) == 2
    masks = full_masks(merged)
    assert np.array_equal(masks[0], big) and np.array_equal(masks[1], apart)


def test_stitched_masks_encode_as_pycocotools_does() -> None:
    shapes = [disc(100, 100, 60), disc(500, 300, 99), disc(590, 10, 20)]
    p = pieces([(m, Window(0, 0, 600, 400), 0.5, 1) for m in shapes])
    rles = encode_local(local_masks(p, (400, 600)), polygons=False).rles
    assert rles == [{"size": [400, 600], "counts": mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))[
        "counts"].decode()} for m in shapes]


# -- the places a tiled request holds ----------------------------------------------------------------------
def test_a_tiled_request_holds_one_place_per_image_and_gives_them_back() -> None:
    async def main() -> None:
        b: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: [x + 1 for x in xs], max_batch_size=4, capacity=6)
        await b.start()
        with b.admit() as other:
            with b.admit() as tiled:
                with pytest.raises(QueueFull, match="needs 6 places"):
                    tiled.hold(6)  # the other request holds one of the 6
                tiled.hold(5)
                with pytest.raises(QueueFull):
                    b.admit().__enter__()
                results = [await job.future for job in [tiled.submit(i) for i in range(5)]]
                assert results == [1, 2, 3, 4, 5]
                with pytest.raises(RuntimeError, match="once per place"):
                    tiled.submit(9)
            assert b.admitted == 1
            assert await other.submit(7).future == 8
        assert b.admitted == 0
        await b.stop()

    asyncio.run(main())


# -- the served demo model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiling_server() -> Iterator[ServerThread]:
    """The demo model served with room for a 12-megapixel PNG and the tile cap CAP."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=40_000_000, max_tiles=CAP,
                        request_timeout_s=600)
    with ServerThread(create_app(settings)) as server:
        yield server


def post(server: ServerThread, data: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{server.url}/segment", params={"formats": "rle", **params}, content=data,
                      headers={"content-type": "image/png"}, timeout=600)


@pytest.mark.parametrize("tiles", ["auto", "2x2", "100px", "64x64px"])
def test_tiling_an_image_the_model_does_not_shrink_is_a_no_op(demo_server: ServerThread, shapes_image: KnownImage,
                                                               tiles: str) -> None:
    small = cv2.resize(shapes_image.image, (308, 309), interpolation=cv2.INTER_AREA)  # the policy enlarges it
    data = encode(small)
    plain = post(demo_server, data).json()
    tiled = post(demo_server, data, tiles=tiles, tile_full_image="true").json()
    assert "tiles" not in tiled and tiled["detections"] == plain["detections"] and len(plain["detections"]) >= 4


@pytest.mark.parametrize(
    ("params", "message"),
    [({"tiles": "sometimes"}, "tiles: Value error, 'sometimes' is not one of: none, auto, a grid"),
     ({"tiles": "0x2"}, "a grid has 1 to 64 columns and rows, not 0x2"),
     ({"tiles": "8px"}, "a window is at least 64 px a side, not 8x8"),
     ({"tiles": "auto", "tile_overlap": "0.5"}, "tile_overlap: Input should be less than 0.5"),
     ({"tiles": "auto", "tile_overlap": "-0.1"}, "tile_overlap: Input should be greater than or equal to 0"),
     ({"tiles": "auto", "tile_full_image": "maybe"}, "tile_full_image: Input should be a valid boolean")],
)
def test_bad_tiling_options_are_422(demo_server: ServerThread, shapes_image: KnownImage, params: dict[str, str],
                                    message: str) -> None:
    data = shapes_image.path.read_bytes()
    for sent in (post(demo_server, data, **params),
                 httpx.post(f"{demo_server.url}/segment", timeout=60,
                            json={"image": __import__("base64").b64encode(data).decode(), **params})):
        assert sent.status_code == 422, sent.text
        assert sent.json()["error"]["code"] == "invalid_option" and message in sent.json()["error"]["message"]
    assert httpx.get(f"{demo_server.url}/healthz").status_code == 200


def test_the_tile_cap_is_enforced(demo_server: ServerThread) -> None:
    """MRCNN_MAX_TILES (default 48, the demo server's) refuses explicit tiles past it; tiles=auto is not
    refused (test_auto_tiles_only_what_the_policy_shrinks_more_than_its_factor)."""
    data = encode(np.full((1500, 2000, 3), 90, np.uint8))  # shrunk 4.7 times by the policy
    for tiles in ("7x7", "128px"):
        sent = post(demo_server, data, tiles=tiles)
        assert sent.status_code == 422
        assert sent.json()["error"]["code"] == "too_many_tiles"
        assert "this server takes at most 48 a request" in sent.json()["error"]["message"]
    ok = post(demo_server, data, tiles="2x2", tile_full_image="true")
    assert ok.status_code == 200 and ok.json()["tiles"] == 5 and ok.json()["detections"] == []


@pytest.mark.slow
def test_tiles_auto_finds_the_small_objects_of_a_large_image(tiling_server: ServerThread) -> None:
    tiles = plan_tiles(TileSpec("auto"), *BIG, 0.2, **POLICY, max_tiles=CAP)
    assert tiles is not None
    scene = large_scene(0, BIG, placed=seam_objects(tiles))
    data = encode(scene.image)
    whole = scores(post(tiling_server, data, score_threshold=0.5).json(), scene, tiles)
    answer = post(tiling_server, data, score_threshold=0.5, tiles="auto").json()
    tiled = scores(answer, scene, tiles)
    print(f"{len(scene.shapes)} objects, {len(tiled['cut'])} of them cut: untiled recall {whole['recall']:.2f} "
          f"precision {whole['precision']:.2f}; tiles=auto recall {tiled['recall']:.2f} precision "
          f"{tiled['precision']:.2f}, cut objects' IoU {[round(i, 2) for _, i in tiled['cut']]}")
    assert answer["tiles"] == 48 and len(scene.shapes) >= 70 and len(tiled["cut"]) >= 12
    assert whole["recall"] <= UNTILED_RECALL_AT_MOST
    assert tiled["recall"] >= TILED_RECALL_AT_LEAST and tiled["precision"] >= TILED_PRECISION_AT_LEAST
    for count, best in tiled["cut"]:
        assert count == 1 and best >= CUT_IOU_AT_LEAST
    assert tiled["duplicates"] == 0
    values = metric_values(httpx.get(f"{tiling_server.url}/metrics").text)
    assert sample(values, "mrcnn_tiles_per_request_bucket", le="48.0") - sample(
        values, "mrcnn_tiles_per_request_bucket", le="32.0") >= 1


@pytest.mark.slow
def test_every_door_tiles_alike(demo_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/segment, the Open Inference Protocol's parameters (tritonclient), the Python client and its command
    all take the tiling options and give the same stitched detections."""
    import tritonclient.http as httpclient

    from service.client import SegmentClient, main

    scene = large_scene(3, (1200, 1600), count=12)
    path = tmp_path / "scene.png"
    path.write_bytes(encode(scene.image))
    options = {"tiles": "2x2", "tile_overlap": 0.25, "score_threshold": 0.5}
    body = SegmentClient(demo_server.url, timeout=600).request(path, **options)
    assert body["tiles"] == 4 and len(body["detections"]) >= 10
    triton = httpclient.InferenceServerClient(demo_server.url.removeprefix("http://"))
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([path.read_bytes()], dtype=object))
    name = httpx.get(f"{demo_server.url}/v1/model").json()["name"]
    result = triton.infer(name, [image], parameters=options)
    np.testing.assert_allclose(result.as_numpy("boxes"), [d["box"] for d in body["detections"]], atol=0.006)
    assert [json.loads(m) for m in result.as_numpy("masks")] == [d["mask"] for d in body["detections"]]
    assert main([str(path), "--url", demo_server.url, "--out", str(tmp_path), "--tiles", "2x2", "--tile-overlap",
                 "0.25", "--score-threshold", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["detections"] == body["detections"]
    assert (tmp_path / "scene.overlay.png").is_file()
