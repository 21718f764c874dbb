"""Training past one device on the CPU: two gloo ranks spawned by the test, torchrun on the real command,
gradient accumulation and bf16 autocast, all on tiny models.

The model's own random sampling is made deterministic by taking every candidate (sample sizes larger than
any image's anchors and proposals). DDP averages the ranks' gradients, as torchvision's and Detectron2's
training do: that is exactly a one-process step that accumulates the ranks' batches, and a one-process
step over the union of the batches when the ranks' loss normalizers agree (here: the same image on both).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.data.coco import DetectionDataset, collate
from model.data.shapes import ShapesDataset
from model.distributed import World
from model.train import TrainConfig, build, train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = {"norm": "bn", "width": 16, "fpn_channels": 32, "representation_size": 32, "mask_channels": 16,
        "rpn_pre_nms_top_n_train": 60, "rpn_post_nms_top_n_train": 30, "box_batch_size_per_image": 10**6}
CFG = TrainConfig(arch="r18_fpn", synthetic=4, synthetic_seed=1, min_size=64, max_size=64, batch_size=2, lr=0.01,
                  warmup_steps=0, lr_steps=[100], device="cpu", model=TINY, flip_prob=0.0)


def _batch(indices: list[int]):
    return collate([DetectionDataset(ShapesDataset(4, 1), 64, 64, train=False)[i] for i in indices])


def _model_and_optimizer(cfg: TrainConfig = CFG):
    torch.manual_seed(0)
    model, optimizer, scheduler = build(cfg, 5, torch.device("cpu"), verbose=False)
    model.rpn.batch_size_per_image = 10**6  # every anchor: no random subsampling
    return model, optimizer, scheduler


def _one_process(batches: list[list[int]], steps: int = 1) -> dict[str, torch.Tensor]:
    """One thread, as each rank has (``_rank``): oneDNN's channels-last weight gradients sum their partial
    results in an order that follows the thread count (1.6e-5 apart between 1 and 2 threads here)."""
    cfg = dataclasses.replace(CFG, accumulate_steps=len(batches))
    model, optimizer, scheduler = _model_and_optimizer(cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            train_step(model.train(), optimizer, scheduler, [_batch(b) for b in batches], torch.device("cpu"), cfg,
                       scaler, World())
    finally:
        torch.set_num_threads(threads)
    return weights(model)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters: what DDP keeps equal (each rank's batch-norm statistics follow its own images)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _rank(rank: int, port: int, images: list[int], out: str) -> None:
    """One of two gloo ranks: DDP over the tiny model, two steps on its own image, weights saved per step."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, optimizer, scheduler = _model_and_optimizer()
    network = DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(2):
        train_step(network.train(), optimizer, scheduler, [_batch([images[rank]])], torch.device("cpu"), CFG,
                   scaler, World(rank, rank, 2, grouped=True))
        torch.save(weights(model), f"{out}/rank{rank}_step{step}.pt")
    dist.destroy_process_group()


def _two_ranks(tmp_path: Path, images: list[int]) -> list[list[dict[str, torch.Tensor]]]:
    from tests.helpers import free_port

    tmp_path.mkdir()
    mp.spawn(_rank, args=(free_port(), images, str(tmp_path)), nprocs=2, join=True)
    return [[torch.load(tmp_path / f"rank{r}_step{s}.pt") for s in range(2)] for r in range(2)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_two_ranks_hold_identical_weights_and_equal_one_process(tmp_path: Path) -> None:
    """Different images on the two ranks: identical weights after every step, equal to one process that
    accumulates the two images' gradients; the same image on both: equal to one process's batch of two."""
    ranks = _two_ranks(tmp_path / "ab", [0, 1])
    for step in range(2):
        assert max_difference(ranks[0][step], ranks[1][step]) == 0.0
    one = _one_process([[0], [1]], steps=2)
    assert max_difference(ranks[0][1], one) < 1e-5
    same = _two_ranks(tmp_path / "aa", [2, 2])
    assert max_difference(same[0][1], _one_process([[2, 2]], steps=2)) < 1e-4  # batch-norm sums in another order


def test_accumulating_equals_one_larger_batch() -> None:
    """k = 2 steps of batch 1 == one step of batch 2 (the same image twice: equal loss normalizers)."""
    assert max_difference(_one_process([[3], [3]], steps=2), _one_process([[3, 3]], steps=2)) < 1e-4


def test_bf16_autocast_trains_and_stays_close_in_inference() -> None:
    """bf16 on the CPU: finite, decreasing losses over a few steps on one batch; under autocast the box head's
    scores and decoded boxes, for the float32 model's own 10 best detections as fixed boxes, stay within 0.01
    (probability) and 0.1 px (64x64 images) of float32's (RoIAlign, box decoding in fp32). Fixed boxes, not
    the detections themselves: NMS and the top-k turn a small change in near-tied scores into another box."""
    cfg = dataclasses.replace(CFG, amp="bf16", lr=0.02)
    model, optimizer, scheduler = _model_and_optimizer(cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [train_step(model.train(), optimizer, scheduler, [_batch([0, 1])], torch.device("cpu"), cfg, scaler,
                         World())["loss"] for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()
    batch = _batch([0, 1])
    with torch.no_grad():
        detections = model(batch.images, batch.image_sizes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(batch.images, batch.image_sizes)
        assert mixed["boxes"].dtype == torch.float32 and (mixed["num_detections"] > 0).all()
        counts = detections["num_detections"].clamp(max=10)
        assert (counts > 0).all()
        boxes = torch.cat([detections["boxes"][i, :n] for i, n in enumerate(counts.tolist())])
        batch_index = torch.repeat_interleave(torch.arange(2), counts)
        scores, decoded = _box_head(model, batch, boxes, batch_index)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed_scores, mixed_decoded = _box_head(model, batch, boxes, batch_index)
    assert (mixed_scores - scores).abs().max() <= 0.01  # measured 0.0016
    assert (mixed_decoded - decoded).abs().max() <= 0.1  # measured 0.0009 px


def _box_head(model, batch, boxes: torch.Tensor, batch_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities [R, K] and decoded boxes [R, K, 4] of the box head for fixed ``boxes``."""
    from model import box_coder
    from model.backbone import replicate_edges
    from model.precision import float32_under_autocast
    from model.roi_heads import BOX_WEIGHTS

    features = model.backbone(model.normalize(batch.images, batch.image_sizes), batch.image_sizes)
    heads = model.roi_heads
    features = [replicate_edges(f, batch.image_sizes, s) for f, s in zip(features, heads.pooled_strides, strict=False)]
    logits, deltas = map(float32_under_autocast, heads.box_predictor(heads.box_features(features, boxes, batch_index)))
    return logits.softmax(-1), box_coder.decode(deltas, boxes, BOX_WEIGHTS)


def _torchrun(tmp_path: Path, config: TrainConfig, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    path = tmp_path / f"cfg{nproc}.json"
    path.write_text(json.dumps(dataclasses.asdict(config)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
               "model.train", "--config", str(path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_two_ranks_same_batches_as_one_process_and_resume(tmp_path: Path) -> None:
    """The real command under torchrun: rank 0 alone writes; the global batches are those of a one-process
    run of the same config; stopped after step 1 and resumed, the run reads step 2's batch."""
    cfg = dataclasses.replace(CFG, max_steps=2, log_every=1, checkpoint_every=1, out_dir=str(tmp_path / "two"))
    done = _torchrun(tmp_path, cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2]  # one writer
    one_cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "one"))
    from model.train import train

    train(one_cfg, progress=False)
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [sorted(r["image_ids"]) for r in two] == [sorted(r["image_ids"]) for r in one]
    resumed_cfg = dataclasses.replace(cfg, max_steps=1, out_dir=str(tmp_path / "resumed"))
    assert _torchrun(tmp_path, resumed_cfg).returncode == 0
    done = _torchrun(tmp_path, resumed_cfg, "--resume", "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2] and sorted(resumed[1]["image_ids"]) == sorted(two[1]["image_ids"])
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["step"] == 2
