"""Train Mask R-CNN on a COCO-format folder or on streamed synthetic shapes.

``python -m model.train --config configs/shapes_r18.json [--flag value ...]``; flags override the file.
SGD with momentum and weight decay, linear warmup then step decay (Detectron2's schedule), a tqdm bar
with the current losses, a JSONL log of every loss term, and checkpoints every K steps and at the end.

Checkpoints are dicts with `model`, `optimizer`, `scheduler`, `step`, `config` (incl. arch, num_classes,
min_size, max_size) and `class_names` (index 0 "__background__"). They are written to a temporary file
and renamed into place, so a crash or a failed step never leaves a half-written checkpoint, and
``--resume`` continues with the same step count, optimizer state, learning rate and data order.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import io
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from model.data.coco import Batch, CocoDataset, DetectionDataset, Source, collate
from model.data.shapes import ShapesDataset
from model.files import atomic_path


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint so a run can be reproduced or resumed."""

    arch: str = "r18_fpn"
    num_classes: int | None = None  # classes incl. background; None: taken from the data
    data: str | None = None  # COCO folder (images/ + instances.json)
    synthetic: int | None = None  # or: stream this many generated shapes images
    synthetic_seed: int = 0
    min_size: int = 512  # inference/export size policy (CONTRACT.md)
    max_size: int = 853
    train_min_sizes: list[int] = field(default_factory=list)  # multi-scale training; empty: [min_size]
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_steps: int = 1000
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [700, 900])
    gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    flip_prob: float = 0.5
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # numbered checkpoints kept besides last.pt; 0 keeps all
    log_every: int = 10
    out_dir: str = "runs/train"
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    init_weights: str | None = None  # fine-tune from a checkpoint or state dict (e.g. torchvision's COCO one)
    model: dict = field(default_factory=dict)  # extra keyword arguments of build_model

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict, rejecting unknown keys so a typo in a config file is not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**values)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at a step: linear warmup from warmup_factor, gamma per passed lr step."""
    factor = cfg.gamma ** bisect.bisect_right(sorted(cfg.lr_steps), step)
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_source(cfg: TrainConfig) -> Source:
    """The training images: a COCO folder, or the synthetic shapes stream."""
    if cfg.synthetic:
        return ShapesDataset(cfg.synthetic, cfg.synthetic_seed)
    if not cfg.data:
        raise ValueError("set `data` (a COCO folder) or `synthetic` (number of generated images)")
    with contextlib.redirect_stdout(io.StringIO()):
        return CocoDataset(cfg.data)


class ResumableSampler(Sampler[list[int]]):
    """Endless batches of dataset indices, reshuffled every epoch, starting at any global position.

    Index `epoch * n + j` stands for item j in that epoch, so the dataset (which wraps indices) draws a
    fresh flip/scale per epoch, and a run resumed at step s gets exactly the batches it would have had.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_step * self.batch_size
        epoch, order = -1, np.empty(0, np.int64)
        while True:
            batch = []
            for i in range(position, position + self.batch_size):
                if i // self.n != epoch:
                    epoch = i // self.n
                    order = self._order(epoch)
                batch.append(epoch * self.n + int(order[i % self.n]))
            position += self.batch_size
            yield batch


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build(cfg: TrainConfig, num_classes: int, device: torch.device):
    """Model, optimizer and scheduler of a run; weight decay skips norm layers and biases, as usual."""
    from model import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(arch=cfg.arch, num_classes=num_classes, **cfg.model).to(device)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return model, optimizer, scheduler


def load_initial_weights(model: torch.nn.Module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Start from pretrained weights, the usual way to fine-tune: a model.train checkpoint, a plain state dict
    with torchvision's detection names (its COCO maskrcnn_resnet50_fpn loads into r50_fpn), or torchvision's
    ImageNet classifier of the model's body (resnet50, resnext101_32x8d, ...: the paper initializes its
    backbones from ImageNet, section 3.1), mapped by ``classifier_names``. Tensors whose shape differs, i.e.
    the class-specific predictor layers when num_classes changes, are left at their fresh initialization.
    Returns (skipped keys of the file, model keys left untouched)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    own = model.state_dict()
    names = classifier_names(state, own) if "fc.weight" in state else {k: k for k in state}
    usable = {names[k]: v for k, v in state.items() if names.get(k) in own and own[names[k]].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    used = {k for k, name in names.items() if name in usable}
    return sorted(set(state) - used), sorted(set(own) - set(usable))


def classifier_names(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, str]:
    """Our names for the tensors of a torchvision ImageNet ResNet state dict: its body's under
    ``backbone.body.``, and where the model has the C4 heads, its ``layer4`` (res5) under ``roi_heads.res5.``.
    Its classifier (``fc``) has none."""
    names = {}
    for key in state:
        res5 = f"roi_heads.res5.{key.removeprefix('layer4.')}" if key.startswith("layer4.") else None
        name = f"backbone.body.{key}" if f"backbone.body.{key}" in own else res5
        if name in own:
            names[key] = name
    return names


def atomic_save(obj: object, path: Path) -> None:
    """torch.save through ``atomic_path``: readers see the old checkpoint or the new one, never half."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point dst at src's content atomically (hard link, or a copy where links are not allowed)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """Write checkpoint_<step>.pt, point last.pt at it, and prune old numbered checkpoints."""
    path = out_dir / f"checkpoint_{state['step']:07d}.pt"
    atomic_save(state, path)
    _link_or_copy(path, out_dir / "last.pt")
    if keep > 0:
        for old in sorted(out_dir.glob("checkpoint_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint with weights_only loading: it holds tensors and plain data only."""
    return torch.load(path, map_location=device, weights_only=True)


def get_rng_state() -> dict[str, object]:
    """Torch RNG states: the model samples anchors and RoIs with the global generator, so an exact
    resume needs them back."""
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch.targets]
    return batch.images.to(device, non_blocking=True), batch.image_sizes.to(device), targets


def _start_step(cfg: TrainConfig, model, optimizer, scheduler, resume, device: torch.device) -> int:
    """Restore a run (weights, optimizer, schedule, RNG; returns its step) or load initial weights (0)."""
    if resume:
        ckpt = load_checkpoint(resume, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        return int(ckpt["step"])
    if cfg.init_weights:
        skipped, fresh = load_initial_weights(model, cfg.init_weights)
        print(
            f"init weights {cfg.init_weights}: {len(fresh)} model tensors not loaded {fresh[:6]}, "
            f"{len(skipped)} file tensors unused {skipped[:6]}",
            file=sys.stderr,
        )
    return 0


def _loader(cfg: TrainConfig, source: Source, step: int, device: torch.device) -> DataLoader:
    """Endless batches from `step` on; a private generator keeps the global RNG (restored on resume) intact."""
    dataset = DetectionDataset(
        source, cfg.train_min_sizes or cfg.min_size, cfg.max_size, train=True, flip_prob=cfg.flip_prob, seed=cfg.seed
    )
    return DataLoader(
        dataset,
        batch_sampler=ResumableSampler(len(dataset), cfg.batch_size, cfg.seed, step),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def train_step(model, optimizer, scheduler, batch: Batch, device: torch.device, grad_clip: float) -> dict[str, float]:
    """One SGD step; raises before touching the weights if the loss is not finite. Returns the loss terms."""
    images, sizes, targets = _to_device(batch, device)
    losses = model(images, sizes, targets)
    loss = sum(losses.values())
    values = {k: v.detach().item() for k, v in losses.items()}
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss: {values}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return {"loss": sum(values.values()), **values}


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Run (or continue) training to cfg.max_steps; returns the path of the last checkpoint."""
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = build_source(cfg)
    class_names = list(source.class_names)
    cfg.num_classes = cfg.num_classes or len(class_names)
    if cfg.num_classes != len(class_names):
        raise ValueError(
            f"num_classes {cfg.num_classes} != {len(class_names)} classes in the data (background included)"
        )
    model, optimizer, scheduler = build(cfg, cfg.num_classes, device)
    step = _start_step(cfg, model, optimizer, scheduler, resume, device)
    loader = _loader(cfg, source, step, device)
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def state() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "config": dataclasses.asdict(cfg),
            "class_names": class_names,
            "rng": get_rng_state(),
        }

    last = out_dir / "last.pt"
    model.train()
    bar = _progress(cfg.max_steps, step, progress)
    tic = time.perf_counter()
    with open(out_dir / "log.jsonl", "a") as log:
        for batch in itertools.islice(loader, max(cfg.max_steps - step, 0)):
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            try:
                values = train_step(model, optimizer, scheduler, batch, device, cfg.grad_clip)
            except FloatingPointError as exc:
                raise FloatingPointError(f"step {step + 1}: {exc}") from None
            step += 1
            bar.update(1)
            bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in values.items()})
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                log.write(json.dumps({"step": step, "lr": lr, **values, "seconds": round(elapsed, 3)}) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                last = save_checkpoint(out_dir, state(), cfg.keep_checkpoints)
    bar.close()
    if step >= cfg.max_steps and not (out_dir / "last.pt").exists():
        last = save_checkpoint(out_dir, state(), cfg.keep_checkpoints)
    return last


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """Config = checkpoint's config (on resume) < config file < explicit flags."""
    parser = argparse.ArgumentParser(description="Train Mask R-CNN (COCO folder or synthetic shapes).")
    parser.add_argument("--config", help="JSON file with TrainConfig fields")
    parser.add_argument(
        "--resume", nargs="?", const="auto", help="continue from a checkpoint (default: OUT_DIR/last.pt)"
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if f.name == "model":
            parser.add_argument(flag, type=json.loads, default=None, help="build_model kwargs as JSON")
        elif isinstance(value, list):
            parser.add_argument(flag, type=int, nargs="*", default=None)
        else:
            kind = {"num_classes": int, "data": str, "synthetic": int, "init_weights": str}.get(f.name, type(value))
            parser.add_argument(flag, type=kind, default=None, help=f"default: {value}")
    args = parser.parse_args(argv)
    values: dict = {}
    resume = args.resume
    file_values = json.loads(Path(args.config).read_text()) if args.config else {}
    flag_values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    if resume == "auto":
        out_dir = flag_values.get("out_dir", file_values.get("out_dir", defaults.out_dir))
        resume = str(Path(out_dir) / "last.pt")
    if resume:
        values.update(load_checkpoint(resume)["config"])
    values.update(file_values)
    values.update(flag_values)
    return TrainConfig.from_dict(values), resume


def main(argv: list[str] | None = None) -> None:
    cfg, resume = parse_args(argv)
    path = train(cfg, resume)
    print(f"checkpoint: {path}")


if __name__ == "__main__":
    main()
