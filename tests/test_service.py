"""The service end to end: a real uvicorn server on loopback serving the tiny exported model.

Masks are checked against torchvision's paste_masks_in_image on the same model outputs, batching
against each image run alone, every error case is followed by a success, /metrics counts what was sent.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pycocotools import mask as mask_utils

from service.core.images import decode_image
from service.core.runtime import OnnxModel, Prediction
from tests.helpers import (
    MAX_PIXELS,
    MAX_UPLOAD,
    THRESHOLD,
    TIMEOUT,
    ServerThread,
    encode,
    fill_holes,
    iou,
    metric_values,
    sample,
    scene,
)

httpx = pytest.importorskip("httpx")

FEW = 0.205  # fewer detections (and masks to compute) where masks are not the point
NONE = 0.99  # no detection: the cheapest successful request


# ---- helpers ---------------------------------------------------------------------------------------


SCORE_TOL = 1e-4  # float noise between runs of different batch composition is ~1e-6


def match(dets: list[dict], alone: Prediction) -> list[tuple[dict, int]]:
    """Pairs (response detection, index in ``alone``) of the same class, score and box.

    Random weights give nearly equal scores (~0.2 each), so matching is by value, not by rank: two
    detections whose scores differ by float noise may swap places, and one at the top-D cut may be
    replaced by its near-tie. Everything else must be matched.
    """
    used: set[int] = set()
    pairs = []
    for d in dets:
        close = np.flatnonzero(
            (alone.labels == d["class_id"]) & (np.abs(alone.scores - d["score"]) <= SCORE_TOL)
            & (np.abs(alone.boxes - np.asarray(d["box"])).max(axis=1) <= 0.05)
        )
        free = [j for j in close.tolist() if j not in used]
        if free:
            used.add(free[0])
            pairs.append((d, free[0]))
    cut = float(alone.scores.min()) if len(alone.scores) else 0.0
    unmatched = [d for d in dets if all(d is not p[0] for p in pairs)]
    assert all(d["score"] <= cut + SCORE_TOL for d in unmatched), "a detection differs from the image alone"
    assert abs(len(dets) - len(alone.scores)) <= len(unmatched) + 1
    return pairs


def assert_same_detections(body: dict, alone: Prediction, height: int, width: int) -> None:
    """A response equals what the image gives alone: classes, scores, boxes and masks."""
    dets = body["detections"]
    pairs = match(dets, alone)
    assert len(pairs) >= len(dets) - 2
    ref = reference_masks(alone, height, width)
    # Random-weight mask probabilities sit within ~0.02 of the 0.5 threshold, so float noise of the
    # batched run flips a few pixels; the masks must still be the same ones.
    ious = [iou(mask_utils.decode(d["mask"]), ref[j]) for d, j in pairs]
    assert min(ious, default=1.0) >= 0.95 and float(np.mean(ious or [1.0])) >= 0.99


def reference_masks(pred: Prediction, height: int, width: int) -> np.ndarray:
    """torchvision's paste_masks_in_image of the same m x m masks and boxes, thresholded."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    if len(pred.scores) == 0:
        return np.zeros((0, height, width), np.uint8)
    pasted = paste_masks_in_image(torch.from_numpy(pred.masks)[:, None], torch.from_numpy(pred.boxes),
                                  (height, width))
    return (pasted[:, 0].numpy() > 0.5).astype(np.uint8)


# ---- fixtures (the server and the model: tests/conftest.py) ----------------------------------------


def ok(client: Any) -> None:
    """A good request succeeds and the server is still ready."""
    r = client.post("/segment", params={"score_threshold": NONE},
                    files={"image": ("ok.png", encode(scene(99).image), "image/png")})
    assert r.status_code == 200, r.text
    assert client.get("/readyz").status_code == 200


# ---- tests -----------------------------------------------------------------------------------------


def test_health_model_and_openapi(client: Any, model: OnnxModel) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/model").json()
    assert info["classes"] == model.class_names[1:]
    assert info["name"] == model.metadata.model_name and info["min_size"] == model.metadata.min_size
    spec = client.get("/openapi.json").json()
    assert "/segment" in spec["paths"] and "SegmentResponse" in spec["components"]["schemas"]


def test_masks_match_torchvision_paste(client: Any, model: OnnxModel) -> None:
    img = scene(1, (150, 200)).image
    r = client.post("/segment", files={"image": ("a.png", encode(img), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 200, "height": 150}
    assert body["model"]["name"] == model.metadata.model_name
    assert set(body["timings"]) == {"decode_ms", "queue_ms", "inference_ms", "postprocess_ms", "total_ms"}
    dets = body["detections"]
    assert dets, "the tiny model gave no detection at the test threshold"
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True) and min(scores) > THRESHOLD
    alone = model.predict([img], THRESHOLD)[0]
    ref = reference_masks(alone, 150, 200)
    pairs = match(dets, alone)
    assert len(pairs) >= len(dets) - 2
    for d, j in pairs:
        assert d["label"] == model.class_names[d["class_id"]]
        decoded = mask_utils.decode(d["mask"])
        assert d["mask"]["size"] == [150, 200]
        assert iou(decoded, ref[j]) >= 0.95
        assert d["area"] == int(decoded.sum())
        raster = np.zeros((150, 200), np.uint8)
        for poly in d["polygons"]:
            cv2.fillPoly(raster, [np.floor(np.asarray(poly).reshape(-1, 2)).astype(np.int32)], 1)
        filled = fill_holes(decoded)
        # Holes are dropped: the outlines cover the mask with its holes filled, and the mask itself
        # whenever its holes are small.
        assert iou(raster, filled) >= 0.9
        if filled.sum() - decoded.sum() <= 0.05 * decoded.sum():
            assert iou(raster, decoded) >= 0.9
        assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in d["polygons"])


def test_concurrent_requests_are_batched_and_answered_each_alone(
    server: ServerThread, client: Any, model: OnnxModel
) -> None:
    sizes = [(100 + 8 * i, 140 + 5 * (i % 5)) for i in range(16)]  # distinct sizes: padding matters
    images = [scene(100 + i, s).image for i, s in enumerate(sizes)]
    before = metric_values(client.get("/metrics").text)
    barrier = threading.Barrier(16)

    def send(i: int) -> dict:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT, trust_env=False) as c:
            barrier.wait()
            r = c.post("/segment", files={"image": (f"{i}.png", encode(images[i]), "image/png")})
        assert r.status_code == 200, r.text
        return r.json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(send, range(16)))
    after = metric_values(client.get("/metrics").text)
    calls = sample(after, "mrcnn_batch_size_count") - sample(before, "mrcnn_batch_size_count")
    images_run = sample(after, "mrcnn_batch_size_sum") - sample(before, "mrcnn_batch_size_sum")
    assert images_run == 16
    assert calls < 16, "no two requests shared a model call"
    assert max(b["batch_size"] for b in bodies) > 1
    assert sum(len(b["detections"]) for b in bodies) >= 16, "too few detections to compare"
    for img, body in zip(images, bodies, strict=True):
        h, w = img.shape[:2]
        assert body["image"] == {"width": w, "height": h}
        assert_same_detections(body, model.predict([img], THRESHOLD)[0], h, w)


def test_options(client: Any, model: OnnxModel) -> None:
    img = encode(scene(2).image)
    full = client.post("/segment", files={"image": ("a.png", img, "image/png")}).json()["detections"]
    assert len(full) >= 2
    rle_only = client.post("/segment?formats=rle&max_detections=2", content=img,
                           headers={"content-type": "image/png"}).json()["detections"]
    assert len(rle_only) == 2 and all("mask" in d and "polygons" not in d for d in rle_only)
    assert [d["score"] for d in rle_only] == [d["score"] for d in full[:2]]
    wanted = full[0]["label"]
    form = {"classes": wanted, "formats": "polygons", "score_threshold": str(full[1]["score"])}
    only = client.post("/segment", files={"image": ("a.png", img, "image/png")}, data=form).json()
    assert only["detections"] and all(d["label"] == wanted for d in only["detections"])
    assert all("polygons" in d and "mask" not in d for d in only["detections"])
    assert all(d["score"] > full[1]["score"] for d in only["detections"])


def test_image_variants(client: Any) -> None:
    img = scene(3, (90, 130)).image
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = client.post("/segment", params={"score_threshold": NONE},
                          content=encode(img, "JPEG", exif=exif.tobytes()), headers={"content-type": "image/jpeg"})
    assert rotated.status_code == 200 and rotated.json()["image"] == {"width": 90, "height": 130}
    gray16 = img[..., 0].astype(np.uint16) * 257  # other formats and modes: tests/test_service_images.py
    r = client.post("/segment", params={"score_threshold": NONE}, content=encode(gray16, "TIFF"),
                    headers={"content-type": "image/tiff"})
    assert r.status_code == 200 and r.json()["image"] == {"width": 130, "height": 90}, r.text


def _bomb() -> bytes:
    """3000 x 3000 = 9 MP of zeros (over MAX_PIXELS): tiny as PNG, large once decoded."""
    return encode(np.zeros((3000, 3000), np.uint8))


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 400, "undecodable_image"),
        ({"files": {"image": ("x.png", b"", "image/png")}}, 400, "empty_image"),
        ({"files": {"picture": ("x.png", b"abc", "image/png")}}, 400, "missing_image"),
        ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400,
         "bad_multipart"),
        ({"content": b"\0" * (MAX_UPLOAD + 1), "headers": {"content-type": "image/png"}}, 413,
         "payload_too_large"),
        ({"content": "bomb", "headers": {"content-type": "image/png"}}, 413, "image_too_large"),
        ({"content": b"%PDF-1.4", "headers": {"content-type": "application/pdf"}}, 415, "unsupported_media_type"),
        ({"content": "gif", "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
        ({"content": b"abc"}, 415, "unsupported_media_type"),
        ({"params": {"score_threshold": "2"}}, 422, "invalid_option"),
        ({"params": {"max_detections": "100000"}}, 422, "invalid_option"),
        ({"params": {"classes": "no-such-class"}}, 422, "invalid_option"),
        ({"data": {"formats": "jpeg"}}, 422, "invalid_option"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
        ({"json": ["not", "an", "object"]}, 400, "bad_json"),
        ({"json": {"score_threshold": 0.5}}, 400, "missing_image"),
        ({"json": {"image": "not base64!"}}, 400, "bad_base64"),
        ({"json": {"image": "ok", "max_detections": 0}}, 422, "invalid_option"),
        ({"json": {"image": "bomb"}}, 413, "image_too_large"),
        ({"content": b"abc", "headers": {"content-type": "image/png", "content-encoding": "br"}}, 415,
         "unsupported_content_encoding"),
        ({"content": b"not gzip", "headers": {"content-type": "image/png", "content-encoding": "gzip"}}, 400,
         "bad_content_encoding"),
        ({"content": "gzip bomb", "headers": {"content-type": "image/png", "content-encoding": "gzip"}}, 413,
         "payload_too_large"),
    ],
)
def test_errors_then_success(client: Any, kwargs: dict, status: int, code: str) -> None:
    kwargs = dict(kwargs)
    made = {"bomb": _bomb, "gif": lambda: encode(scene(4).image, "GIF"), "ok": lambda: encode(scene(5).image),
            "gzip bomb": lambda: gzip.compress(b"\0" * (MAX_UPLOAD + 1))}
    if kwargs.get("content") in made:
        kwargs["content"] = made[kwargs["content"]]()
    body = kwargs.get("json")
    if isinstance(body, dict) and body.get("image") in made:  # the JSON body's image, base64-encoded
        kwargs["json"] = {**body, "image": base64.b64encode(made[body["image"]]()).decode()}
    if not {"content", "files", "json"} & set(kwargs):
        kwargs["files"] = {"image": ("ok.png", made["ok"](), "image/png")}
    r = client.post("/segment", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    ok(client)


def test_json_body_answers_as_the_multipart_form(client: Any) -> None:
    """The JSON body (the image base64-encoded, the options as members) gives the multipart answer: also as
    a data: URL, gzip-compressed, and with the options in the query string."""
    png = encode(scene(11).image)
    classes = ["circle", "star"]
    form = client.post("/segment", files={"image": ("a.png", png, "image/png")},
                       data={"score_threshold": "0.1", "max_detections": "5", "classes": ",".join(classes)})
    members = {"score_threshold": 0.1, "max_detections": 5, "classes": classes}
    image = base64.b64encode(png).decode()
    as_json = [
        client.post("/segment", json={"image": image, **members}),
        client.post("/segment", content=gzip.compress(json.dumps({"image": f"data:image/png;base64,{image}",
                                                                  **members}).encode()),
                    headers={"content-type": "application/json", "content-encoding": "gzip"}),
        client.post("/segment", params={**members, "classes": ",".join(classes)}, json={"image": image}),
    ]

    def answer(r: Any) -> dict:
        assert r.status_code == 200, r.text
        return {k: v for k, v in r.json().items() if k not in ("timings", "batch_size")}

    expected = answer(form)
    assert expected["detections"] and {d["label"] for d in expected["detections"]} <= set(classes)
    assert all(answer(r) == expected for r in as_json)


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_gets_the_413_even_while_its_client_writes(
    server: ServerThread, client: Any, chunked: bool
) -> None:
    """urllib sends the whole body before it reads the answer: the server reads and drops the rest of an
    oversized body, instead of closing on it (a reset the client would see instead of the 413)."""
    size = 3 * MAX_UPLOAD
    data: Any = iter([b"\0" * 65536] * (size // 65536)) if chunked else b"\0" * size
    request = urllib.request.Request(server.url + "/segment", data=data, headers={"Content-Type": "image/png"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(request, timeout=TIMEOUT)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["code"] == "payload_too_large"
    ok(client)


def test_full_queue_is_503_at_once(server: ServerThread, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seg = server.pipeline
    gate, real = threading.Event(), seg.batcher._run_batch

    def gated(payloads: list) -> list:
        gate.wait(30)
        return real(payloads)

    monkeypatch.setattr(seg.batcher, "_run_batch", gated)
    cap = 2
    monkeypatch.setattr(seg.batcher, "capacity", cap)
    with concurrent.futures.ThreadPoolExecutor(cap) as pool:
        held = [pool.submit(httpx.post, server.url + "/segment", params={"score_threshold": NONE},
                            content=encode(scene(10 + i).image), headers={"content-type": "image/png"},
                            timeout=TIMEOUT, trust_env=False)
                for i in range(cap)]
        deadline = time.monotonic() + 30
        while seg.batcher.admitted < cap:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t = time.perf_counter()
        r = client.post("/segment", content=encode(scene(6).image), headers={"content-type": "image/png"})
        assert time.perf_counter() - t < 1.0
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
        gate.set()
        assert [f.result().status_code for f in held] == [200] * cap
    ok(client)


def test_deadline_is_504_and_the_work_dropped(
    server: ServerThread, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg = server.pipeline
    gate, entered, real = threading.Event(), threading.Event(), seg.batcher._run_batch
    ran: list[int] = []

    def gated(payloads: list) -> list:
        entered.set()
        gate.wait(30)
        ran.append(len(payloads))
        return real(payloads)

    monkeypatch.setattr(seg.batcher, "_run_batch", gated)
    monkeypatch.setattr(seg.settings, "request_timeout_s", 0.5)

    def post(seed: int) -> Any:
        return httpx.post(server.url + "/segment", params={"score_threshold": NONE},
                          content=encode(scene(seed).image), headers={"content-type": "image/png"},
                          timeout=TIMEOUT, trust_env=False)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, 20)  # runs, blocked in the model
        assert entered.wait(30)
        second = pool.submit(post, 21)  # queued behind it
        for f in (first, second):
            r = f.result()
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    gate.set()
    monkeypatch.setattr(seg.settings, "request_timeout_s", float(TIMEOUT))
    ok(client)
    assert ran[0] == 1 and sum(ran) == 2  # the expired request never reached the model; then ok()


def test_metrics_count_requests(client: Any) -> None:
    before = metric_values(client.get("/metrics").text)
    good = [client.post("/segment", params={"score_threshold": FEW},
                        files={"image": (f"{i}.png", encode(scene(30 + i).image), "image/png")})
            for i in range(3)]
    bad = [client.post("/segment", content=b"junk", headers={"content-type": "image/png"}),
           client.post("/segment?score_threshold=9", content=b"x", headers={"content-type": "image/png"}),
           client.post("/segment?max_detections=many", content=b"x", headers={"content-type": "image/png"})]
    text = client.get("/metrics").text
    after = metric_values(text)
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"mrcnn_request_duration_seconds", "mrcnn_queue_wait_seconds", "mrcnn_inference_duration_seconds",
            "mrcnn_batch_size", "mrcnn_queue_depth", "mrcnn_requests", "mrcnn_detections"} <= families

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert [r.status_code for r in good] == [200] * 3 and [r.status_code for r in bad] == [400, 422, 422]
    assert delta("mrcnn_requests_total", route="segment", status="200") == 3
    assert delta("mrcnn_requests_total", route="segment", status="400") == 1
    assert delta("mrcnn_requests_total", route="segment", status="422") == 2
    assert delta("mrcnn_request_duration_seconds_count", route="segment", status="200") == 3
    assert delta("mrcnn_detections_total") == sum(len(r.json()["detections"]) for r in good)
    assert delta("mrcnn_batch_size_sum") == 3 and delta("mrcnn_queue_wait_seconds_count") == 3
    assert delta("mrcnn_inference_duration_seconds_count") >= 1
    assert sample(after, "mrcnn_queue_depth") == 0


def test_decoder_and_runtime_agree_with_the_server_input(model: OnnxModel) -> None:
    """The reference path of these tests decodes exactly like the server."""
    # CONTRACT.md: the threshold reaches the graph, before the mask head.
    assert "score_threshold" in {i.name for i in model.session.get_overridable_initializers()}
    img = scene(7).image
    assert np.array_equal(decode_image(encode(img), MAX_PIXELS), img)
    preds = model.predict([img, scene(8, (200, 100)).image], FEW)
    assert [p.image_size for p in preds] == [(120, 160), (200, 100)]
    for p in preds:
        assert (p.boxes[:, 2] <= p.image_size[1]).all() and (p.boxes[:, 3] <= p.image_size[0]).all()
