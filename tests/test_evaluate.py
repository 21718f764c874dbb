"""COCO evaluation: ground truth scores AP 1, nothing scores 0, and the ONNX/PyTorch plumbing maps back."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from evaluation.evaluate import evaluate_predictions, format_table, predict_dataset
from model.data.coco import CocoDataset
from model.data.shapes import write_coco


@pytest.fixture(scope="module")
def shapes_gt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_eval")
    write_coco(root, num=6, seed=21)
    return root


def _gt(root: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "instances.json"))


def _gt_as_results(coco: COCO) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
            "segmentation": a["segmentation"],
        }
        for a in coco.dataset["annotations"]
    ]


def test_ground_truth_scores_one(shapes_gt: Path) -> None:
    metrics = evaluate_predictions(_gt(shapes_gt), _gt_as_results(_gt(shapes_gt)))
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[iou_type][name] == pytest.approx(1.0)
    header, bbox, segm = format_table(metrics).splitlines()
    assert header.split()[:2] == ["(0-1)", "AP"]  # the table says its unit, the JSON's
    assert bbox.split()[:2] == ["bbox", "1.0000"] and segm.startswith("segm")


def test_no_predictions_score_zero(shapes_gt: Path) -> None:
    metrics = evaluate_predictions(_gt(shapes_gt), [])
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[iou_type][name] == 0.0


def test_wrong_class_scores_zero_and_shifted_masks_lower(shapes_gt: Path) -> None:
    gt = _gt(shapes_gt)
    wrong = [{**r, "category_id": r["category_id"] % 4 + 1} for r in _gt_as_results(gt)]
    assert evaluate_predictions(gt, wrong)["segm"]["AP"] == 0.0
    shifted = [{**r, "bbox": [r["bbox"][0] + 0.3 * r["bbox"][2], *r["bbox"][1:]]} for r in _gt_as_results(gt)]
    bbox = evaluate_predictions(gt, shifted, iou_types=("bbox",))["bbox"]
    assert bbox["AP50"] > 0.9 and bbox["AP75"] < 0.5  # IoU 0.7/1.3 ~ 0.54: matches at 0.5, fails at 0.75


class _OraclePredictor:
    """Answers with the ground truth in CONTRACT.md's output layout, at the resized size: checks the
    resize-back, mask pasting and label mapping of the evaluation path, without a trained model."""

    min_size, max_size = 200, 333
    class_names = ["__background__", "circle", "square", "triangle", "star"]

    def __init__(self, dataset: CocoDataset) -> None:
        self.dataset = dataset
        self.calls = 0

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        import cv2

        from contract import resized_size

        d, m = 10, 28
        b = len(images)
        out = {
            "boxes": np.zeros((b, d, 4), np.float32),
            "scores": np.zeros((b, d), np.float32),
            "labels": np.zeros((b, d), np.int64),
            "masks": np.zeros((b, d, m, m), np.float32),
            "num_detections": np.zeros(b, np.int64),
        }
        for i in range(b):
            s = self.dataset.load(self.calls + i)
            masks = s.masks.full()  # box-local crops (BoxMasks) at the image size
            nh, nw = resized_size(s.height, s.width, self.min_size, self.max_size)
            assert (nh, nw) == tuple(image_sizes[i])
            scale = np.array([nw / s.width, nh / s.height] * 2, np.float32)
            n = len(s.labels)
            out["num_detections"][i] = n
            out["boxes"][i, :n] = s.boxes * scale
            out["scores"][i, :n] = 0.9
            out["labels"][i, :n] = s.labels
            for k in range(n):
                x1, y1, x2, y2 = s.boxes[k].astype(int)
                crop = masks[k, y1:y2, x1:x2].astype(np.float32)
                out["masks"][i, k] = cv2.resize(crop, (m, m), interpolation=cv2.INTER_LINEAR)
        self.calls += b
        return out


def test_predict_dataset_maps_results_back(shapes_gt: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = CocoDataset(shapes_gt)
    predictor = _OraclePredictor(dataset)
    results = predict_dataset(predictor, dataset, batch_size=2, progress=False)
    assert len(results) == len(dataset.coco.dataset["annotations"])
    metrics = evaluate_predictions(dataset.coco, results)
    assert metrics["bbox"]["AP"] > 0.95  # boxes survive the resize round trip
    assert metrics["segm"]["AP50"] > 0.95 and metrics["segm"]["AP"] > 0.6  # 28x28 masks lose detail
    assert not math.isnan(metrics["segm"]["AP75"])


class _InterruptedPredictor(_OraclePredictor):
    """The oracle, until Ctrl-C arrives during its third batch of two."""

    score_threshold = 0.05

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        if self.calls == 4:
            raise KeyboardInterrupt
        return super().__call__(images, image_sizes)


def test_ctrl_c_scores_and_writes_the_images_done(shapes_gt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C after 4 of 6 images: the command still scores those 4 (against their own ground truth), prints
    and writes them marked partial, and exits 130 with one line saying where they are."""
    from evaluation import evaluate

    monkeypatch.setattr(evaluate, "load_predictor", lambda *_: _InterruptedPredictor(evaluate.open_dataset(shapes_gt)))
    checkpoint, out = tmp_path / "model.onnx", tmp_path / "eval.json"
    checkpoint.touch()
    argv = ["--checkpoint", str(checkpoint), "--data", str(shapes_gt), "--out", str(out), "--batch-size", "2"]
    assert evaluate.main(argv) == 130
    captured = capsys.readouterr()
    assert captured.out.startswith(f"PARTIAL (interrupted): COCO AP of {checkpoint} on 4 of 6 images")
    assert captured.err.splitlines()[-1] == f"error: interrupted after 4 of 6 images; partial results in {out}"
    report = json.loads(out.read_text())
    assert report["partial"] is True and report["num_images"] == 4
    assert report["metrics"]["bbox"]["AP"] > 0.95


def test_cli_on_an_untrained_checkpoint(shapes_gt: Path, tmp_path: Path, capsys) -> None:
    """The PyTorch path end to end (checkpoint -> build_model -> predictions -> COCOeval -> JSON); an
    untrained model must score near zero on the shapes."""
    torch = pytest.importorskip("torch")
    import dataclasses

    from evaluation.evaluate import main
    from model.train import TrainConfig, atomic_save, build

    torch.set_num_threads(1)
    cfg = TrainConfig(
        arch="r18_fpn",
        num_classes=5,
        min_size=96,
        max_size=128,
        model={"norm": "bn", "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50},
    )
    model, optimizer, scheduler = build(cfg, 5, torch.device("cpu"))
    ckpt = tmp_path / "untrained.pt"
    atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": 0,
            "config": dataclasses.asdict(cfg),
            "class_names": ["__background__", "circle", "square", "triangle", "star"],
        },
        ckpt,
    )
    out = tmp_path / "eval" / "results.json"
    argv = ["--checkpoint", str(ckpt), "--data", str(shapes_gt), "--out", str(out), "--limit", "2", "--batch-size", "2"]
    assert main(argv) == 0
    assert "bbox" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["num_images"] == 2 and report["partial"] is False
    assert (report["min_size"], report["max_size"]) == (96, 128)
    for iou_type in ("bbox", "segm"):
        assert set(report["metrics"][iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert report["metrics"][iou_type]["AP"] < 0.1


def _constant_onnx(path: Path) -> None:
    """A graph with the exported model's signature and metadata that always answers one detection: a
    32 x 32 'circle' box at the top-left with a full mask. Exercises the ONNX Runtime path without an
    exporter."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    d, m = 4, 28
    consts = {
        "boxes": np.zeros((1, d, 4), np.float32),
        "scores": np.zeros((1, d), np.float32),
        "labels": np.zeros((1, d), np.int64),
        "masks": np.zeros((1, d, m, m), np.float32),
        "num_detections": np.ones(1, np.int64),
    }
    consts["boxes"][0, 0] = (0, 0, 32, 32)
    consts["scores"][0, 0], consts["labels"][0, 0], consts["masks"][0, 0] = 0.9, 1, 1.0
    nodes = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name + "_value"))
        for name, v in consts.items()
    ]
    inputs = [
        helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 3, "H", "W"]),
        helper.make_tensor_value_info("image_sizes", TensorProto.INT64, ["B", 2]),
        helper.make_tensor_value_info("score_threshold", TensorProto.FLOAT, ["T"]),
    ]
    outputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for name, v in consts.items()
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "constant", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    meta = {
        "format_version": "1",
        "class_names": json.dumps(["__background__", "circle", "square", "triangle", "star"]),
        "mask_size": str(m),
        "min_size": "64",
        "max_size": "96",
    }
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))


def test_cli_on_an_onnx_file(shapes_gt: Path, tmp_path: Path) -> None:
    from evaluation.evaluate import main

    path = tmp_path / "constant.onnx"
    _constant_onnx(path)
    out = tmp_path / "results.json"
    assert main(["--checkpoint", str(path), "--data", str(shapes_gt), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_images"] == 6 and report["num_detections"] == 6
    assert (report["min_size"], report["max_size"]) == (64, 96)
    assert 0.0 <= report["metrics"]["segm"]["AP"] < 0.2


def test_label_mapping(shapes_gt: Path) -> None:
    from evaluation.evaluate import label_to_category

    gt = _gt(shapes_gt)  # circle 1, square 2, triangle 3, star 4
    assert label_to_category(["__background__", "star", "circle", "square", "triangle"], gt) == {
        1: 4,
        2: 1,
        3: 2,
        4: 3,
    }
    # A superset with gaps, like torchvision's COCO list: unknown names are dropped.
    assert label_to_category(["__background__", "N/A", "square", "dog", "circle", "star", "triangle"], gt) == {
        2: 2,
        4: 1,
        5: 4,
        6: 3,
    }
    assert label_to_category(["__background__", "a", "b", "c", "d"], gt) == {1: 1, 2: 2, 3: 3, 4: 4}
    with pytest.raises(ValueError, match="match neither"):
        label_to_category(["__background__", "a", "b"], gt)


def test_onnx_and_pytorch_paths_agree(shapes_gt: Path, tiny_checkpoint: Path, tiny_onnx_model: Path) -> None:
    """The exported graph through ONNX Runtime and its checkpoint through PyTorch give the same COCO results:
    evaluating either measures the same model."""
    from evaluation.evaluate import load_predictor

    with contextlib.redirect_stdout(io.StringIO()):
        dataset = CocoDataset(shapes_gt)
    by_path = {}
    for path in (tiny_checkpoint, tiny_onnx_model):
        predictor = load_predictor(path)
        assert (predictor.min_size, predictor.max_size) == (320, 512)
        by_path[path.suffix] = predict_dataset(predictor, dataset, limit=1, progress=False)
    torch_results, onnx_results = by_path[".pt"], by_path[".onnx"]
    assert torch_results and len(torch_results) == len(onnx_results)
    top = slice(0, 20)
    for a, b in zip(torch_results[top], onnx_results[top], strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.5)
