"""What the docs claim of CUDA, checked on a GPU (skipped without one; scripts/gpu_tests.sh runs exactly this
set): the RoIAlign and NMS ops on CUDA give the CPU's answers, ONNX Runtime's CUDA provider runs the exported
graph (the standard RoiAlign and NonMaxSuppression ops of export/onnx_ops.py) to the CPU provider's
detections, and a training step runs on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.verification import compare
from model import build_model
from model.nms import multiclass_nms
from model.roi_align import roi_align
from tests.conftest import TINY_MODEL
from tests.helpers import model_inputs, scene, training_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_tests.sh on a GPU machine)"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_on_cuda_is_the_cpus(aligned: bool, sampling_ratio: int) -> None:
    """Forward and backward of maskrcnn::roi_align on CUDA against the CPU, fixed and adaptive sampling."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 40, 56, generator=g, dtype=torch.float64)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100 - 10
    wh = torch.rand(50, 2, generator=g, dtype=torch.float64) * 60
    batch = torch.randint(0, 2, (50, 1), generator=g).to(torch.float64)
    rois = torch.cat([batch, xy, xy + wh], 1)
    outputs, grads = [], []
    for device in ("cpu", CUDA):
        f = features.to(device).requires_grad_()
        out = roi_align(f, rois.to(device), 0.5, 7, 7, sampling_ratio, aligned)
        out.sum().backward()
        assert f.grad is not None
        outputs.append(out.cpu())
        grads.append(f.grad.cpu())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("iou_threshold", [0.3, 0.7])
def test_nms_on_cuda_is_the_cpus(iou_threshold: float) -> None:
    """maskrcnn::multiclass_nms on CUDA keeps the CPU's boxes, in the CPU's order."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(3, 200, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(3, 200, 2, generator=g) * 30], -1)
    scores = torch.rand(3, 4, 200, generator=g)
    on_cpu = multiclass_nms(boxes, scores, 100, iou_threshold, 0.05)
    on_cuda = multiclass_nms(boxes.to(CUDA), scores.to(CUDA), 100, iou_threshold, 0.05)
    assert torch.equal(on_cuda.cpu(), on_cpu)


def test_onnx_runtime_cuda_provider_matches_cpu(tiny_onnx_model: Path) -> None:
    """The exported tiny graph on ONNX Runtime's CUDA provider: the CPU provider's detections, within the
    rule export verification uses for two float32 implementations."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (pip install '.[gpu]')")
    images, sizes = model_inputs([torch.from_numpy(scene(i, (240, 320)).image).permute(2, 0, 1) for i in range(2)])
    feeds = {"images": images.numpy(), "image_sizes": sizes.numpy(),
             "score_threshold": np.full(2, 0.05, np.float32)}
    outputs = {}
    # TF32 off: float32 against float32, as the CPU provider computes.
    options = {"CPUExecutionProvider": {}, "CUDAExecutionProvider": {"use_tf32": "0"}}
    for provider, provider_options in options.items():
        session = ort.InferenceSession(str(tiny_onnx_model), providers=[(provider, provider_options)])
        assert session.get_providers()[0] == provider
        names = [o.name for o in session.get_outputs()]
        outputs[provider] = dict(zip(names, session.run(names, feeds), strict=True))
    cpu, cuda = outputs["CPUExecutionProvider"], outputs["CUDAExecutionProvider"]
    assert cpu["num_detections"].sum() > 0
    result = compare(cpu, cuda, nms_threshold=0.5)
    assert result.paired >= 0.95 * cpu["num_detections"].sum()
    assert result.figures.box < 1e-2 and result.figures.score < 1e-3, result.figures


def test_a_training_step_on_cuda() -> None:
    """One SGD step of the tiny model on CUDA (mixed precision off): finite losses, every parameter with a
    finite gradient, and the step moves the weights. (The CPU's loss is not compared: RoI sampling draws
    from the device's own generator.)"""
    images, sizes, targets = training_batch([scene(0, (160, 224)), scene(1, (192, 192))])
    torch.manual_seed(0)
    model = build_model("r18_fpn", 3, norm="bn", **TINY_MODEL).train().to(CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    losses = model(images.to(CUDA), sizes.to(CUDA), [{k: v.to(CUDA) for k, v in t.items()} for t in targets])
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total = torch.stack(list(losses.values())).sum()
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()] == []
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
