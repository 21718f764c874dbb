"""What the docs claim of CUDA, checked on a GPU (skipped without one; scripts/gpu_tests.sh runs exactly this
set): the RoIAlign and NMS ops on CUDA give the CPU's answers, ONNX Runtime's CUDA provider runs the exported
graph (the standard RoiAlign and NonMaxSuppression ops of export/onnx_ops.py) to the CPU provider's
detections, a training step runs on CUDA, in float32 and with fp16 autocast, and torchrun's DDP runs on NCCL
(world size 1, SyncBN)."""

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


def test_an_fp16_training_step_on_cuda() -> None:
    """model.train's step with ``amp: fp16`` (autocast and a GradScaler) on CUDA: finite losses, RoIAlign's
    output and the losses in float32, the weights moved."""
    from model.data.coco import DetectionDataset, collate
    from model.data.shapes import ShapesDataset
    from model.distributed import World
    from model.train import TrainConfig, build, train_step

    cfg = TrainConfig(synthetic=2, min_size=128, max_size=192, batch_size=2, amp="fp16", device="cuda",
                      model={"norm": "bn", **TINY_MODEL})
    model, optimizer, scheduler = build(cfg, 5, CUDA, verbose=False)
    batch = collate([DetectionDataset(ShapesDataset(2, 1), 128, 192, train=False)[i] for i in range(2)])
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cuda")
    values = train_step(model.train(), optimizer, scheduler, [batch], CUDA, cfg, scaler, World())
    assert all(np.isfinite(v) for v in values.values()), values
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    with torch.autocast("cuda", dtype=torch.float16):
        pooled = model.roi_heads.box_roi_pool(
            [torch.randn(1, 128, 32, 32, device=CUDA).half()] * 4, torch.tensor([[0.0, 0, 50, 50]], device=CUDA),
            torch.zeros(1, dtype=torch.long, device=CUDA))
    assert pooled.dtype == torch.float32


def test_ddp_with_nccl_at_world_size_one(tmp_path: Path) -> None:
    """The real command under torchrun on one GPU: NCCL initializes, DDP wraps the model, rank 0 writes."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    config = {"arch": "r18_fpn", "synthetic": 4, "min_size": 96, "max_size": 128, "batch_size": 2, "max_steps": 2,
              "warmup_steps": 0, "lr_steps": [100], "log_every": 1, "device": "cuda", "out_dir": str(tmp_path / "run"),
              "amp": "bf16", "model": {"norm": "syncbn", **TINY_MODEL}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "model.train", "--config", str(tmp_path / "cfg.json")], capture_output=True,
                          text=True, cwd=root, env=os.environ, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [1, 2]
