"""service/client.py against the real server (the bundled demo model on loopback): SegmentClient's
detections and options, ``draw``'s pixels, and the overlay command's files, table and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.client import Detection, SegmentClient, SegmentError, draw, main
from service.overlay import MASK_ALPHA, class_colour
from tests.conftest import DEMO_MAX_UPLOAD, KnownImage
from tests.helpers import assert_found, assert_overlay, drawing_zones, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client(demo_server) -> SegmentClient:
    return SegmentClient(demo_server.url, timeout=600)


@pytest.fixture(scope="module")
def detections(client: SegmentClient, shapes_image: KnownImage) -> list[Detection]:
    return client.segment(shapes_image.path, score_threshold=0.5)


def stack(dets: list[Detection]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([d.mask for d in dets]), np.array([d.class_id for d in dets])


def test_segment_finds_the_known_objects(detections: list[Detection], shapes_image: KnownImage) -> None:
    height, width = shapes_image.image.shape[:2]
    assert len(detections) == len(shapes_image.labels)
    for d in detections:
        assert d.mask.dtype == bool and d.mask.shape == (height, width)
        assert d.area == int(d.mask.sum()) and d.score > 0.5 and d.polygons is None
        ys, xs = np.nonzero(d.mask)
        x1, y1, x2, y2 = d.box
        assert x1 - 1 <= xs.min() and xs.max() <= x2 and y1 - 1 <= ys.min() and ys.max() <= y2
    assert_found(shapes_image.masks, shapes_image.labels, *stack(detections))


def test_options_model_and_refusals(client: SegmentClient, shapes_image: KnownImage) -> None:
    assert client.model()["classes"] == ["circle", "square", "triangle", "star"]
    data = shapes_image.path.read_bytes()
    (one,) = client.segment(data, classes=["circle"], max_detections=1, formats=["rle", "polygons"])
    assert one.label == "circle" and one.mask is not None and len(one.polygons) >= 1
    assert all(d.mask is None and d.polygons for d in client.segment(data, formats="polygons"))
    with pytest.raises(TypeError, match="threshold"):
        client.segment(data, threshold=0.5)
    with pytest.raises(SegmentError, match="422 invalid_option: classes") as refused:
        client.segment(data, classes="dog")
    assert refused.value.status == 422 and refused.value.code == "invalid_option"


def test_draw_tints_masks_and_leaves_the_rest(detections: list[Detection], shapes_image: KnownImage) -> None:
    image = shapes_image.image
    masks, labels = stack(detections)
    colours = [class_colour(c) for c in labels]
    alphas = [MASK_ALPHA] * len(detections)
    assert_overlay(draw(image, detections, boxes=False), image, masks, colours, alphas)
    picture = draw(image, detections)
    height, width = image.shape[:2]
    zones = drawing_zones([d.box for d in detections], width, height)
    assert_overlay(picture, image, masks, colours, alphas, exclude=zones)
    for d in detections:  # each box's left edge is in its class's colour (except where a label sits)
        x0, y0, _, y1 = (int(v) for v in np.floor(d.box))
        edge = picture[y0:y1, x0]
        assert (edge == class_colour(d.class_id)).all(axis=1).mean() >= 0.5
    assert np.array_equal(image, shapes_image.image), "draw changed its input"


def test_command_writes_overlays_and_prints_a_table(
    demo_server, detections: list[Detection], shapes_image: KnownImage, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert main([str(shapes_image.path), "--url", demo_server.url, "--out", str(out), "--score-threshold", "0.5"]) == 0
    written = np.asarray(Image.open(out / "shapes.overlay.png").convert("RGB"))
    assert np.array_equal(written, draw(shapes_image.image, detections))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{shapes_image.path}: {len(detections)} detection(s)")
    assert "label" in lines[1] and "score" in lines[1] and "box" in lines[1] and "area" in lines[1]
    for line, d in zip(lines[2:], detections, strict=True):
        assert line.split()[:2] == [d.label, f"{d.score:.3f}"] and line.split()[-1] == str(d.area)

    assert main([str(shapes_image.path), "--url", demo_server.url, "--out", str(out), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["image"] == {"width": shapes_image.image.shape[1], "height": shapes_image.image.shape[0]}
    assert all("mask" in d for d in body["detections"]) and "timings" in body


def test_command_errors_are_one_line(demo_server, shapes_image: KnownImage, tmp_path: Path, capsys) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(0).bytes(DEMO_MAX_UPLOAD + 1))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    args = [str(big), str(text), str(missing), str(shapes_image.path), "--url", demo_server.url,
            "--out", str(tmp_path / "out"), "--json"]
    assert main(args) == 1
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert f"413 payload_too_large: the body has {DEMO_MAX_UPLOAD + 1} bytes" in errors[0]
    assert "400 undecodable_image" in errors[1] and "cannot read it" in errors[2]
    assert json.loads(captured.out)["detections"], "the good image is still segmented"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shapes.overlay.png"]

    down = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "service.client", str(shapes_image.path), "--url", down,
                           "--out", str(tmp_path / "down")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {shapes_image.path}: cannot reach the server at {down} "
                                        "([Errno 111] Connection refused)"]
    assert not (tmp_path / "down").exists()


def test_images_with_one_stem_get_one_overlay_each(demo_server, shapes_image: KnownImage, tmp_path: Path,
                                                   capsys) -> None:
    """x.jpg, x.png and another folder's x.png: three overlays, none written over another of the same run."""
    (tmp_path / "b").mkdir()
    images = [tmp_path / "x.jpg", tmp_path / "x.png", tmp_path / "b" / "x.png"]
    for path in images:
        Image.fromarray(shapes_image.image).save(path)
    out = tmp_path / "out"
    assert main([*map(str, images), "--url", demo_server.url, "--out", str(out)]) == 0
    names = ["x.overlay.png", "x-2.overlay.png", "x-3.overlay.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    said = [line.split(" -> ")[1] for line in capsys.readouterr().out.splitlines() if " -> " in line]
    assert said == [str(out / name) for name in names]


def test_the_command_sends_the_api_key(shapes_image: KnownImage, tmp_path: Path, capsys, monkeypatch) -> None:
    """``--api-key`` or MRCNN_API_KEY goes as ``Authorization: Bearer``; without it a keyed server's 401 stops the
    run at the first image (every other would be refused too)."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings
    from tests.helpers import ServerThread

    key = "client-key-7Hq2Lw9Zx4Nc1Vb8Mk5Pj3Rt6Ys0Ua"
    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600,
                        api_keys=key)
    image = str(shapes_image.path)
    monkeypatch.delenv("MRCNN_API_KEY", raising=False)
    with ServerThread(create_app(settings)) as server:
        assert main([image, "--url", server.url, "--out", str(tmp_path / "a"), "--api-key", key]) == 0
        monkeypatch.setenv("MRCNN_API_KEY", key)
        assert SegmentClient(server.url, timeout=600).model()["classes"]
        assert main([image, "--url", server.url, "--out", str(tmp_path / "b")]) == 0
        capsys.readouterr()
        monkeypatch.delenv("MRCNN_API_KEY")
        assert main([image, image, "--url", server.url, "--out", str(tmp_path / "c")]) == 1
        errors = capsys.readouterr().err.splitlines()
        assert errors == [f"error: {image}: 401 missing_api_key: an API key is required: send it as 'Authorization: "
                          "Bearer <key>' or 'X-API-Key: <key>'"]
        with pytest.raises(SegmentError) as refused:
            SegmentClient(server.url, api_key="wrong").model()
        assert refused.value.status == 401 and refused.value.code == "invalid_api_key"
