"""The bundled demo models (models/demo/model.onnx and its int8 version) through ONNX Runtime on fresh
shapes images, and the int8 one served by the app as it is."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.evaluate import evaluate_checkpoint
from model.data.shapes import VALIDATION_SEED, generate, write_coco
from service.app import create_app
from service.core.runtime import OnnxModel
from service.core.settings import DEFAULT_MODEL_PATH, Settings

DEMO_MODEL = DEFAULT_MODEL_PATH  # models/demo/model.onnx
DEMO_INT8 = DEMO_MODEL.with_name("model.int8.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("path", [DEMO_MODEL, DEMO_INT8], ids=["float32", "int8"])
def test_demo_model_segments_fresh_images(path: Path, tmp_path: Path) -> None:
    """Mask AP50 >= 0.9 on 50 held-out images, evaluated with pycocotools' COCOeval."""
    data = write_coco(tmp_path / "shapes_val", num=50, seed=VALIDATION_SEED).parent
    report = evaluate_checkpoint(path, data, batch_size=4)
    assert report["num_images"] == 50
    assert report["metrics"]["segm"]["AP50"] >= 0.9, report["metrics"]


def test_the_app_serves_the_int8_file_unchanged() -> None:
    """The service loads the int8 graph like any exported file (same inputs, outputs and metadata) and
    answers /segment with the detections the runtime gives for the same image."""
    from fastapi.testclient import TestClient

    sample = generate(VALIDATION_SEED, 0)
    image = np.ascontiguousarray(sample.image)
    body = io.BytesIO()
    Image.fromarray(image).save(body, format="PNG")
    model = OnnxModel(DEMO_INT8)
    assert json.loads(model.metadata.quantization)["recipe"]
    expected = model.predict([image], score_threshold=0.5)[0]
    assert len(expected.labels) > 0
    with TestClient(create_app(Settings(model_path=DEMO_INT8, score_threshold=0.5))) as client:
        response = client.post("/segment", files={"image": ("shapes.png", body.getvalue(), "image/png")})
        assert response.status_code == 200, response.text
        detections = response.json()["detections"]
    assert [d["label"] for d in detections] == [model.class_names[i] for i in expected.labels]
    np.testing.assert_allclose([d["score"] for d in detections], expected.scores, atol=1e-4)
