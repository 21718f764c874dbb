"""The bundled demo model (models/demo/model.onnx) through ONNX Runtime on fresh shapes images."""

from pathlib import Path

from evaluation.evaluate import evaluate_checkpoint
from model.data.shapes import write_coco

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo" / "model.onnx"
VALIDATION_SEED = 1000  # never used in training (the demo model trains on seed 1)


def test_demo_model_segments_fresh_images(tmp_path):
    """Mask AP50 >= 0.9 on 50 held-out images, evaluated with pycocotools' COCOeval."""
    data = write_coco(tmp_path / "shapes_val", num=50, seed=VALIDATION_SEED).parent
    report = evaluate_checkpoint(DEMO_MODEL, data, batch_size=4)
    assert report["num_images"] == 50
    assert report["metrics"]["segm"]["AP50"] >= 0.9, report["metrics"]
