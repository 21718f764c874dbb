"""The request pipeline on its own: Triton's execute contract (one result or error per request), the
lifecycle states, the options declared once, the response's three steps, and the one work step that
every front door shares."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.core.errors import InvalidOption, TooLarge, Unavailable
from service.core.options import SegmentOptions, resolve
from service.core.pipeline import BatchItem, Pipeline
from service.core.postprocess import encode_detections, select_detections
from service.core.runtime import OnnxModel
from service.core.settings import Settings
from service.segment.response import response_body
from tests.helpers import encode, scene


@pytest.fixture(scope="module")
def pipeline(tiny_onnx_model: Path) -> Pipeline:
    settings = Settings(model_path=tiny_onnx_model, score_threshold=0.05, warmup=False)
    return Pipeline(settings, OnnxModel(tiny_onnx_model, intra_op_threads=1))


def _request(pipeline: Pipeline, seed: int, size: tuple[int, int] = (120, 160)) -> BatchItem:
    return BatchItem(pipeline.model.resize(scene(seed, size).image), 0.05)


def test_execute_gives_each_request_its_own_result(pipeline: Pipeline) -> None:
    requests = [_request(pipeline, 1), _request(pipeline, 2, (90, 200))]
    together = pipeline.execute(requests)
    alone = [pipeline.execute([r])[0] for r in requests]
    assert len(together) == 2
    for a, b in zip(together, alone, strict=True):
        assert a.image_size == b.image_size and len(a.scores) == len(b.scores) > 0
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_one_bad_request_does_not_fail_its_neighbours(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request the model cannot run (here: an image ORT refuses) gets its own error; the others in its
    batch still get their detections."""
    good = [_request(pipeline, 3), _request(pipeline, 4)]
    real_run = pipeline.model.run

    def run(images: np.ndarray, sizes: np.ndarray, thresholds: object) -> dict:
        if (sizes == 7).any():
            raise RuntimeError("the model refused this input")
        return real_run(images, sizes, thresholds)

    monkeypatch.setattr(pipeline.model, "run", run)
    bad = BatchItem(pipeline.model.resize(np.zeros((7, 7, 3), np.uint8)), 0.05)
    bad = BatchItem(type(bad.image)(bad.image.chw[:, :7, :7], (7, 7)), 0.05)
    results = pipeline.execute([good[0], bad, good[1]])
    assert isinstance(results[1], RuntimeError)
    assert [r.image_size for r in (results[0], results[2])] == [(120, 160), (120, 160)]


def test_lifecycle_states(pipeline: Pipeline) -> None:
    async def main() -> list[str]:
        states = [pipeline.state]
        await pipeline.start()
        states.append(pipeline.state)
        pipeline.drain()
        states.append(pipeline.state)
        await pipeline.stop()
        with pytest.raises(Unavailable) as refused:
            async with pipeline.admitted("segment", 0.0):
                pass
        assert refused.value.code == "shutting_down"
        return states

    assert asyncio.run(main()) == ["starting", "ready", "draining"]


def test_options_from_query_and_form_are_the_same_model(pipeline: Pipeline) -> None:
    info = pipeline.model.metadata
    query = SegmentOptions.validated({"classes": ["circle,star"], "formats": ["rle"], "score_threshold": "0.3"})
    assert query.classes == ["circle", "star"] and query.formats == ["rle"]
    form = query.with_form({"classes": ["square", "star"], "max_detections": ["3"]})
    assert (form.classes, form.max_detections, form.score_threshold, form.formats) == (["square", "star"], 3, 0.3,
                                                                                          ["rle"])
    resolved = resolve(form, 0.5, info)
    assert resolved.labels.tolist() == [2, 4] and (resolved.rle, resolved.polygons) == (True, False)
    assert resolve(SegmentOptions(), 0.5, info).score_threshold == 0.5
    for bad in ({"score_threshold": "2"}, {"formats": ["jpeg"]}, {"max_detections": "0"}):
        with pytest.raises(InvalidOption) as err:
            SegmentOptions.validated(bad)
        assert next(iter(bad)) in err.value.message
    with pytest.raises(InvalidOption, match="unknown"):
        resolve(SegmentOptions(classes=["dog"]), 0.5, info)
    with pytest.raises(InvalidOption, match="at most"):
        resolve(SegmentOptions(max_detections=info.detections_per_image + 1), 0.5, info)


def test_select_encode_serialize(pipeline: Pipeline) -> None:
    pred = pipeline.execute([_request(pipeline, 5)])[0]
    info = pipeline.model.metadata
    first = info.class_names[int(pred.labels[0])]
    resolved = resolve(SegmentOptions(classes=[first], max_detections=2, formats=["rle"]), 0.05, info)
    kept = select_detections(pred, resolved)
    assert 1 <= len(kept.scores) <= 2 and (kept.labels == pred.labels[0]).all()
    encoded = encode_detections(kept, resolved)
    assert encoded.polygons is None and len(encoded.rles) == len(kept.scores)
    body = json.loads(response_body(kept, encoded, info, 3, {"decode_ms": 1.0}, started=0.0))
    assert body["batch_size"] == 3 and body["model"] == {"name": info.model_name, "version": info.model_version}
    assert [d["label"] for d in body["detections"]] == [first] * len(kept.scores)
    assert all("polygons" not in d and d["mask"]["size"] == [120, 160] for d in body["detections"])
    assert body["timings"]["decode_ms"] == 1.0 and body["timings"]["total_ms"] > 0


def test_segment_takes_a_file_or_pixels_and_encodes_only_what_is_asked(pipeline: Pipeline) -> None:
    """Both front doors' inputs (an encoded file, RGB pixels) give the same detections; the pixel limit
    applies to pixels too; no mask encoding is computed that the request did not ask for."""
    info = pipeline.model.metadata
    img = scene(6, (80, 100)).image
    rle_only = resolve(SegmentOptions(formats=["rle"]), 0.05, info)
    fresh = Pipeline(pipeline.settings.model_copy(update={"max_image_pixels": 80 * 100}), pipeline.model)

    async def main() -> tuple:
        await fresh.start()
        try:
            async with fresh.admitted("v2", time.perf_counter()) as slot:
                from_file = await fresh.segment(slot, encode(img), rle_only)
            async with fresh.admitted("v2", time.perf_counter()) as slot:
                from_pixels = await fresh.segment(slot, img, replace(rle_only, rle=False))
            with pytest.raises(TooLarge) as too_large:
                async with fresh.admitted("v2", time.perf_counter()) as slot:
                    await fresh.segment(slot, np.zeros((81, 100, 3), np.uint8), rle_only)
        finally:
            await fresh.stop()
        return from_file, from_pixels, too_large.value

    from_file, from_pixels, too_large = asyncio.run(main())
    assert len(from_file.prediction.scores) > 0
    np.testing.assert_array_equal(from_file.prediction.scores, from_pixels.prediction.scores)
    assert from_file.masks.polygons is None and len(from_file.masks.rles) == len(from_file.prediction.scores)
    assert from_pixels.masks is None
    assert too_large.code == "image_too_large"
