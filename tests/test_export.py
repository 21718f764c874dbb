"""The exported ONNX graph: parity with PyTorch, padding invariance, torchvision checkpoints,
metadata, the score_threshold input, and refusal of bad checkpoints (with no file left behind)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from contract import OUTPUT_NAMES
from export.__main__ import main as export_main
from export.exporter import box_error, compare, mask_iou, run_onnx, run_torch, sample_batch
from model.checkpoint import load_model
from tests.conftest import SHAPE_CLASSES


@pytest.fixture(scope="module")
def session(tiny_onnx_model):
    return ort.InferenceSession(str(tiny_onnx_model), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint):
    return load_model(tiny_checkpoint).model


@pytest.mark.parametrize(
    "sizes",
    [[(256, 352)], [(256, 320), (200, 288), (320, 224), (96, 130)]],
    ids=["batch1", "batch4-mixed-sizes"],
)
def test_onnx_runtime_matches_pytorch(session, torch_model, sizes):
    images, image_sizes = sample_batch(sizes, seed=7)
    ref = run_torch(torch_model, images, image_sizes)
    out = run_onnx(session, images, image_sizes)
    result = compare(ref, out)
    assert result.detections > 0
    assert result.labels_equal
    np.testing.assert_array_equal(ref["num_detections"], out["num_detections"])
    assert np.abs(ref["boxes"] - out["boxes"]).max() <= 1e-3  # absolute, in pixels
    assert result.max_score_error <= 1e-4
    assert result.mask_iou >= 0.99


def test_padding_invariance(session):
    images, sizes = sample_batch([(190, 250)], seed=3)
    alone = run_onnx(session, images, sizes)
    padded = torch.zeros(3, 3, 384, 448, dtype=torch.uint8)
    padded[1:, :, :300, :400] = torch.randint(0, 256, (2, 3, 300, 400), dtype=torch.uint8)
    padded[0, :, :190, :250] = images[0, :, :190, :250]
    together = run_onnx(session, padded, torch.tensor([[190, 250], [300, 400], [300, 400]]))
    first = {k: v[:1] for k, v in together.items()}
    result = compare(alone, first)
    assert result.detections > 0 and result.ok(), str(result)


def test_outputs_follow_the_contract(session):
    images, sizes = sample_batch([(224, 288), (160, 192)], seed=5)
    out = run_onnx(session, images, sizes)
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    assert out["boxes"].shape == (2, 100, 4) and out["boxes"].dtype == np.float32
    assert out["labels"].dtype == np.int64 and out["num_detections"].dtype == np.int64
    assert out["masks"].shape == (2, 100, 28, 28)
    for i, (h, w) in enumerate(sizes.tolist()):
        n = out["num_detections"][i]
        boxes = out["boxes"][i, :n]
        assert (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all() and (boxes >= 0).all()
        assert not out["scores"][i, n:].any() and not out["masks"][i, n:].any()
        assert ((out["labels"][i, :n] >= 1) & (out["labels"][i, :n] < len(SHAPE_CLASSES))).all()


def test_score_threshold_input(session):
    images, sizes = sample_batch([(224, 288), (224, 288)], seed=6)
    default = run_onnx(session, images, sizes)
    feeds = {"images": images.numpy(), "image_sizes": sizes.numpy()}
    raised = dict(
        zip(
            OUTPUT_NAMES,
            session.run(None, {**feeds, "score_threshold": np.array([0.05, 0.3], np.float32)}),
            strict=True,
        )
    )
    np.testing.assert_array_equal(raised["num_detections"][0], default["num_detections"][0])
    n = raised["num_detections"][1]
    assert n == (default["scores"][1] > 0.3).sum() and n < default["num_detections"][1]
    np.testing.assert_allclose(raised["boxes"][1, :n], default["boxes"][1, :n], atol=1e-4)


def test_metadata_describes_the_model(tiny_onnx_model):
    meta = {p.key: p.value for p in onnx.load(str(tiny_onnx_model), load_external_data=False).metadata_props}
    assert json.loads(meta["class_names"]) == SHAPE_CLASSES
    assert meta["architecture"] == "r18_fpn" and meta["mask_size"] == "28"
    assert (meta["min_size"], meta["max_size"]) == ("320", "512")
    assert meta["format_version"] == "1" and meta["detections_per_image"] == "100"
    assert float(meta["score_threshold"]) == 0.05 and float(meta["nms_threshold"]) == 0.5
    assert meta["model_name"] == "tiny"
    ops = {n.op_type for n in onnx.load(str(tiny_onnx_model)).graph.node}
    assert {"RoiAlign", "NonMaxSuppression"} <= ops
    assert not [n for n in onnx.load(str(tiny_onnx_model)).graph.node if n.domain not in ("", "ai.onnx")]


def test_wrong_class_count_is_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bad.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--num-classes", "91"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint does not match r18_fpn with 91 classes")
    assert "roi_heads.box_predictor" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_wrong_architecture_is_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bad.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--arch", "r50_fpn"]) == 1
    assert "does not match r50_fpn" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x80\x02 definitely not a checkpoint")
    assert export_main(["--checkpoint", str(bad), "--out", str(tmp_path / "x.onnx")]) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt"]


def test_torchvision_checkpoint_gives_torchvision_detections(tmp_path):
    """A torchvision state dict (random weights, seed 0) exported with score threshold 0, run in ONNX
    Runtime on an image torchvision's transform leaves as it is, gives torchvision's detections."""
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=256, max_size=384, box_score_thresh=0.0)
    tv.eval()
    ckpt = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(tv.state_dict(), ckpt)
    out = tmp_path / "tv.onnx"
    assert (
        export_main(["--checkpoint", str(ckpt), "--out", str(out), "--score-threshold", "0", "--min-size", "256"]) == 0
    )
    images, sizes = sample_batch([(256, 384)], seed=11)
    onnx_out = run_onnx(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]), images, sizes)
    with torch.no_grad():
        ref = tv([images[0].float() / 255])[0]
    n = int(onnx_out["num_detections"][0])
    assert n == len(ref["boxes"]) == 100
    # Within 1e-3 px, or 0.1% of the box's size for larger boxes: see export.exporter.BOX_TOLERANCE.
    assert box_error(ref["boxes"].numpy(), onnx_out["boxes"][0, :n]) <= 1e-3
    assert np.abs(onnx_out["scores"][0, :n] - ref["scores"].numpy()).max() <= 1e-4
    assert np.array_equal(onnx_out["labels"][0, :n], ref["labels"].numpy())
    pasted = paste_masks_in_image(torch.from_numpy(onnx_out["masks"][0, :n, None]), ref["boxes"], (256, 384))
    assert mask_iou(pasted[:, 0].numpy() > 0.5, ref["masks"][:, 0].numpy() > 0.5) >= 0.99
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(meta["class_names"])[1] == "person"
