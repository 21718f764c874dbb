"""model/architectures.py: every entry built (parameter counts, the README's table), the bodies' layouts,
ImageNet weights into the full-size bodies, and the paper's other instantiations (slim R-50-C4 and
X-101-FPN) through the whole pipeline: model.train -> python -m export -> ONNX Runtime on a second input
size -> the service's mask pasting -> python -m evaluation."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from export.__main__ import main as export_main
from export.exporter import run_onnx, run_torch, sample_batch
from export.verification import compare
from model import build_model
from model.architectures import ARCHITECTURES
from model.backbone import RESNET_LAYOUTS, _slim_resnet
from model.checkpoint import load_model
from model.data.shapes import write_coco
from model.fine_tune import load_initial_weights, resolve_initial_weights
from model.train import train
from service.core.postprocess import encode_masks
from service.core.runtime import OnnxModel
from tests.conftest import SHAPE_CLASSES, SLIM_MODELS
from tests.helpers import iou, scene
from tests.test_train import _tiny

README = Path(__file__).resolve().parents[1] / "README.md"
PIPELINE_ARCHS = ["r50_c4", "x101_fpn"]
MASK_SIZES = {"r50_c4": 14, "x101_fpn": 28}


def _parameters(arch: str) -> int:
    """Parameters of ``build_model(arch)`` with its defaults (91 classes, frozen batch norms), counted on the
    meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(arch).parameters())


def test_readme_lists_every_architecture_with_its_parameter_count():
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| ([\d.]+)M \|", README.read_text(), flags=re.M))
    assert set(rows) == set(ARCHITECTURES)
    for arch, millions in rows.items():
        assert float(millions) == round(_parameters(arch) / 1e6, 1), arch


@pytest.mark.parametrize("body", sorted(RESNET_LAYOUTS))
def test_slim_layouts_are_torchvisions_at_width_64(body):
    """The layouts the slim bodies follow are torchvision's: at width 64 the same names and shapes."""
    with torch.device("meta"):
        ours = _slim_resnet(*RESNET_LAYOUTS[body], 64, torch.nn.BatchNorm2d).state_dict()
        reference = getattr(torchvision.models, body)(weights=None).state_dict()
    shapes = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.items()} == shapes


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "classifier"), [("x101_fpn", "resnext101_32x8d"), ("r50_c4", "resnet50")])
def test_imagenet_classifier_loads_into_the_body(tmp_path, arch, classifier):
    """torchvision's ImageNet state dict of the body (random weights, seed 0: no download) initializes the
    full-size model through the training's init-weights path: every tensor but the classifier (fc) loads,
    the body's stages into ``backbone.body`` and, for C4, ``layer4`` into res5 (``roi_heads.res5``). The model
    then runs."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, classifier)(weights=None).state_dict()
    torch.save(reference, tmp_path / "imagenet.pth")
    model = build_model(arch, 3, norm="bn", rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    report = load_initial_weights(model, resolve_initial_weights(tmp_path / "imagenet.pth"))
    assert report.unused == ["fc.bias", "fc.weight"]
    own = model.state_dict()
    expected = {_our_name(arch, key): value for key, value in reference.items() if not key.startswith("fc.")}
    assert sorted(expected) == sorted(k for k in own if k.startswith(("backbone.body.", "roi_heads.res5.")))
    for name, value in expected.items():
        assert torch.equal(own[name], value), name
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 64, 96, dtype=torch.uint8), torch.tensor([[64, 96]]))
    assert out["masks"].shape[-1] == MASK_SIZES[arch]


def _our_name(arch: str, key: str) -> str:
    if arch.endswith("_c4") and key.startswith("layer4."):
        return "roi_heads.res5." + key.removeprefix("layer4.")
    return "backbone.body." + key


def test_c4_refuses_fpn_options():
    with pytest.raises(ValueError, match="no FPN"):
        build_model("r50_c4", fpn_channels=64)


# ---- the pipeline, once per architecture ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_coco(root, num=2, seed=5)
    return root


@pytest.fixture(scope="module", params=PIPELINE_ARCHS)
def pipeline(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """One training step of the slim ``arch`` with model.train on generated shapes (test_train's tiny run), its
    checkpoint, and that checkpoint exported by ``python -m export`` (and so verified against PyTorch). The
    mask logits are scaled up before the export: at the init's std of 0.001 every mask probability is ~0.5,
    with nothing to paste."""
    arch = request.param
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(arch)
    model_options = {**SLIM_MODELS[arch], "norm": "bn", "box_batch_size_per_image": 64}
    model_options.update(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100)
    cfg = dataclasses.replace(_tiny(out / "run", 1), arch=arch, min_size=128, max_size=192, model=model_options)
    checkpoint = train(cfg, progress=False)
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["roi_heads.mask_predictor.mask_fcn_logits.weight"] *= 1000
    torch.save(state, checkpoint)
    graph = out / f"{arch}.onnx"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(graph)]) == 0
    return arch, checkpoint, graph


@pytest.mark.slow
def test_onnx_runtime_matches_pytorch_on_a_second_input_size(pipeline):
    """Sizes neither the trace (256x320, 192x256) nor the verification (128) used, one image padded."""
    arch, checkpoint, graph = pipeline
    model = load_model(checkpoint).model
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    images, sizes = sample_batch([(224, 288), (150, 203)], seed=7)
    reference, outputs = run_torch(model, images, sizes), run_onnx(session, images, sizes)
    assert outputs["masks"].shape[-2:] == (MASK_SIZES[arch],) * 2
    result = compare(reference, outputs, nms_threshold=0.5)
    assert result.paired == int(reference["num_detections"].sum()) == int(outputs["num_detections"].sum()) > 0
    assert result.figures.box <= 1e-4 and result.figures.score <= 1e-4 and result.mask_iou >= 0.99


@pytest.mark.slow
def test_metadata_carries_the_architecture_and_mask_size(pipeline):
    arch, _, graph = pipeline
    meta = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    assert meta["architecture"] == arch and meta["mask_size"] == str(MASK_SIZES[arch])
    assert json.loads(meta["class_names"]) == SHAPE_CLASSES


@pytest.mark.slow
def test_service_pastes_the_masks(pipeline):
    """The service reads the mask size from the file and pastes m x m masks into their boxes as torchvision's
    paste_masks_in_image does, at the original image size."""
    arch, _, graph = pipeline
    model = OnnxModel(graph, intra_op_threads=1)
    assert model.metadata.mask_size == MASK_SIZES[arch]
    image = scene(3, (150, 200)).image
    (pred,) = model.predict([image])
    assert len(pred.scores) > 0 and pred.masks.shape[1:] == (MASK_SIZES[arch],) * 2
    rles = encode_masks(pred.masks, pred.boxes, pred.image_size, rle=True, polygons=False).rles
    pasted = paste_masks_in_image(torch.from_numpy(pred.masks)[:, None], torch.from_numpy(pred.boxes), (150, 200))
    reference = pasted[:, 0].numpy() > 0.5
    assert reference.any(axis=(1, 2)).mean() > 0.5  # the masks have something to paste
    ious = [iou(mask_utils.decode(rle), ref) for rle, ref in zip(rles, reference, strict=True)]
    assert min(ious) >= 0.9 and np.mean(ious) >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnx", "checkpoint"])
def test_evaluation_runs(pipeline, shapes_data, tmp_path, kind):
    """``python -m evaluation`` on the exported file (ONNX Runtime) and on the checkpoint (PyTorch)."""
    from evaluation.evaluate import main

    _, checkpoint, graph = pipeline
    out = tmp_path / "report.json"
    main(["--checkpoint", str(graph if kind == "onnx" else checkpoint), "--data", str(shapes_data), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["num_images"] == 2 and report["num_detections"] > 0
    assert (report["min_size"], report["max_size"]) == (128, 192)
    assert set(report["metrics"]) == {"bbox", "segm"}
