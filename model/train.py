"""Train Mask R-CNN on a COCO-format folder or on streamed synthetic shapes.

``python -m model.train --config configs/shapes_r18.json [--flag value ...]``; flags override the file.
SGD with momentum and weight decay, linear warmup then step decay (Detectron2's schedule), a tqdm bar
with the current losses, a JSONL log of every loss term and TensorBoard curves beside it, checkpoints
every K steps and at the end, COCO AP on a validation folder every E steps with the best checkpoint kept
(``best.pt``). Before step 1 the data are checked (model.data.checks) and the initial weights accounted
for (model.fine_tune). SIGINT and SIGTERM finish the current step, write a checkpoint and exit 130 / 143.

Checkpoints are dicts with `model`, `optimizer`, `scheduler`, `scaler`, `step`, `config` (incl. arch,
num_classes, min_size, max_size), `class_names` (index 0 "__background__") and `run` (the best evaluation so
far). They are written to a temporary file and renamed into place, so a crash or a failed step never leaves
a half-written checkpoint, and ``--resume`` continues with the same step count, optimizer state, learning
rate, data order and sampling (seeded per step). Under torchrun (model.distributed) every rank runs this
module; rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from commandline import CommandError, UsageError, run_command
from model.checkpoint import CheckpointError
from model.data.checks import DataError, check_dataset, load_annotation_json
from model.data.coco import (
    Batch,
    CocoDataset,
    DetectionDataset,
    Source,
    collate,
    find_annotation_file,
    images_folder,
    open_training_data,
)
from model.data.sampler import ResumableSampler, aspect_ratio_groups
from model.data.shapes import ShapesDataset
from model.distributed import (
    RankBatches,
    World,
    any_rank,
    barrier,
    close_world,
    gathered,
    init_world,
    mean_over_ranks,
)
from model.files import atomic_path
from model.fine_tune import (
    BODY_STAGES,
    FINE_TUNING_TRAINABLE_STAGES,
    InitReport,
    freeze_backbone_stages,
    frozen_norms_left_fresh,
    load_initial_weights,
    resolve_initial_weights,
)
from model.precision import AMP_DTYPES

# Settings that fix which images each step reads: a resumed run must keep them (its position is step x batch).
DATA_ORDER_KEYS = ("batch_size", "seed", "aspect_ratio_group_factor", "synthetic", "synthetic_seed", "data")
OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay")  # applied on resume, over the optimizer's saved values
# Files a run writes into its folder; a new run refuses a folder that holds them (or replaces them if asked).
RUN_FILES = ("config.json", "log.jsonl", "last.pt", "best.pt", "checkpoint_*.pt", "events.out.tfevents.*")


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
    # Fine-tuning: a file or a torchvision weights name (MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, ...).
    init_weights: str | None = None
    allow_fresh_weights: bool = False  # let init_weights leave more than the class-specific layers fresh
    trainable_backbone_layers: int | None = None  # of the body's 5 stages; None: 3 with init_weights, else 5
    data_errors: str = "stop"  # a data set with problems: "stop" before step 1, or "skip" what is bad
    empty_images: str = "keep"  # images without annotations: "keep" (negatives) or "drop"
    aspect_ratio_group_factor: int = 3  # batches from one aspect-ratio bin (torchvision's); 0: mixed
    val_data: str | None = None  # COCO folder evaluated every eval_every steps (and at the end)
    eval_every: int = 0  # 0: only at the end (with val_data)
    eval_metric: str = "segm/AP"  # IoU type / metric that picks best.pt
    early_stop_evals: int = 0  # stop after this many evaluations without a better metric; 0: never
    amp: str = "none"  # mixed precision: "bf16", "fp16" (with a GradScaler) or "none"
    accumulate_steps: int = 1  # micro-batches per optimizer step; batch_size stays the global batch
    channels_last: bool = True  # NHWC activations (oneDNN's and cuDNN's layout): a CPU step ~1.2x faster
    model: dict = field(default_factory=dict)  # extra keyword arguments of build_model

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict, rejecting unknown keys so a typo in a config file is not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UsageError(f"unknown config keys {sorted(unknown)}; the keys are TrainConfig's fields "
                             "(configs/README.md, python -m model.train --help)")
        return cls(**values)

    def check(self) -> None:
        """Settings that contradict each other or name nothing: one UsageError line."""
        if self.synthetic and self.data:
            raise UsageError(f"both synthetic ({self.synthetic}) and data ({self.data}) are set: train on one")
        if not self.synthetic and not self.data:
            raise UsageError("set data (a COCO folder: images/ and an instances JSON) or synthetic (a number)")
        for key, allowed in (("data_errors", ("stop", "skip")), ("empty_images", ("keep", "drop"))):
            if getattr(self, key) not in allowed:
                raise UsageError(f"{key} is {getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if self.amp not in AMP_DTYPES:
            raise UsageError(f"amp is {self.amp!r}; expected one of {', '.join(AMP_DTYPES)}")
        if self.accumulate_steps < 1:
            raise UsageError(f"accumulate_steps is {self.accumulate_steps}; expected 1 or more")
        iou_type, _, metric = self.eval_metric.partition("/")
        if iou_type not in ("bbox", "segm") or metric not in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            raise UsageError(f"eval_metric {self.eval_metric!r}: expected IOU_TYPE/METRIC such as segm/AP or bbox/AP50")
        norm = self.model.get("norm", "frozen_bn")
        if norm == "frozen_bn" and not self.init_weights:
            raise UsageError(
                "random initial weights with frozen batch norm (norm: frozen_bn, the default) normalize nothing: "
                'set "model": {"norm": "bn"} to train from scratch, or init_weights to fine-tune'
            )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at a step: linear warmup from warmup_factor, gamma per passed lr step."""
    factor = cfg.gamma ** bisect.bisect_right(sorted(cfg.lr_steps), step)
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_source(cfg: TrainConfig, verbose: bool = True) -> Source:
    """The training images: a COCO folder checked before use (its report printed), or the shapes stream."""
    if cfg.synthetic:
        return ShapesDataset(cfg.synthetic, cfg.synthetic_seed)
    with reported_data_errors("data", cfg.data):
        source, report = open_training_data(str(cfg.data), cfg.data_errors, cfg.empty_images)
    if verbose:
        print(report.summary(), file=sys.stderr)
    return source


@contextlib.contextmanager
def reported_data_errors(key: str, root: object) -> Iterator[None]:
    """A data folder's problems as the command reports them: one line each, then one error line."""
    try:
        yield
    except FileNotFoundError as exc:
        raise UsageError(f"{key}: {exc}") from None
    except DataError as exc:
        for problem in exc.problems:
            print(problem.line(), file=sys.stderr)
        raise CommandError(f"{key} {root}: {exc}") from None


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_network(
    cfg: TrainConfig, num_classes: int, initialize: bool = True, verbose: bool = True
) -> tuple[torch.nn.Module, InitReport | None]:
    """The model of a run, its initial weights loaded (when ``initialize``, i.e. not resuming) and its
    frozen backbone stages frozen."""
    from model import build_model

    torch.manual_seed(cfg.seed)
    try:
        model = build_model(arch=cfg.arch, num_classes=num_classes, **cfg.model)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model options {cfg.model}: {exc}") from None
    report = None
    if cfg.init_weights and initialize:
        try:
            weights = resolve_initial_weights(cfg.init_weights)
            if weights.arch and weights.arch != cfg.arch:
                raise CheckpointError(f"{cfg.init_weights} holds {weights.arch} weights, the arch is {cfg.arch}")
            report = load_initial_weights(model, weights, cfg.allow_fresh_weights)
        except CheckpointError as exc:
            raise UsageError(f"init_weights {exc}") from None
        if verbose:
            print(f"init weights {cfg.init_weights} ({weights.kind}):\n{report.table()}", file=sys.stderr)
    fresh_norms = frozen_norms_left_fresh(model, report) if initialize else []
    if fresh_norms:
        raise UsageError(
            f"{len(fresh_norms)} frozen batch norms were not set by init_weights ({fresh_norms[0]}, ...): they "
            'would normalize nothing; set "model": {"norm": "bn"}'
        )
    trainable = cfg.trainable_backbone_layers
    if trainable is None:
        trainable = FINE_TUNING_TRAINABLE_STAGES if cfg.init_weights else len(BODY_STAGES)
    freeze_backbone_stages(model, trainable)
    return model, report


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """SGD over the trainable parameters, weight decay skipping norm layers and biases, as usual; the
    warmup + step schedule."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The layout a run's model is built in (``build``)."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def build(cfg: TrainConfig, num_classes: int, device: torch.device, initialize: bool = True, verbose: bool = True):
    """Model (on ``device``, in the run's memory layout), optimizer and scheduler of a run.

    With ``channels_last`` the convolutions' weights, and so every activation after the first convolution,
    are NHWC: oneDNN (and cuDNN under autocast) run their convolutions in that layout without reordering
    each input and gradient, and RoIAlign reads each pixel's channels as one row."""
    model, _ = build_network(cfg, num_classes, initialize, verbose)
    model.to(device)
    model.to(memory_format=memory_format(cfg))
    return (model, *build_optimizer(cfg, model))


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


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's global generator (the RPN's and RoI heads' sampling) from (seed, step, rank): a step's
    draws depend on nothing before it, so a resumed run samples as the uninterrupted one, and each rank
    draws its own."""
    torch.manual_seed(hash((seed, step, rank)) % 2**63)


def _to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch.targets]
    return batch.images.to(device, non_blocking=True), batch.image_sizes.to(device), targets


def check_resumable(cfg: TrainConfig, saved: dict) -> None:
    """A resumed run must read the images the stopped one would have read next."""
    changed = [k for k in DATA_ORDER_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        what = ", ".join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise UsageError(
            f"cannot resume with changed data order ({what}): the checkpoint's position is step x batch; "
            "keep them, or start a new run in another --out-dir"
        )


def apply_optimizer_settings(cfg: TrainConfig, saved: dict, optimizer, scheduler, step: int) -> list[str]:
    """Set lr, momentum and weight decay of a resumed run to the config's (the optimizer's saved state
    would otherwise win silently); returns what changed, for the log."""
    changed = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in OPTIMIZER_KEYS if saved.get(k, getattr(cfg, k)) !=
               getattr(cfg, k)]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, decays in zip(optimizer.param_groups, (True, False), strict=True):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * lr_factor(step, cfg), momentum=cfg.momentum)
        group["weight_decay"] = cfg.weight_decay if decays else 0.0
    return changed


@dataclass
class RunState:
    """Where a run stands besides its weights: the step, and the best evaluation so far."""

    step: int = 0
    best: float = -math.inf
    best_step: int = 0
    evals_since_best: int = 0


def _restore(
    cfg: TrainConfig, model, optimizer, scheduler, scaler, resume: str | os.PathLike, device, world: World
) -> RunState:
    """Restore a stopped run: weights, optimizer (with the config's lr/momentum/decay), schedule, RNG, and
    the best evaluation so far."""
    ckpt = load_checkpoint(resume, device)
    check_resumable(cfg, ckpt.get("config", {}))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    run = RunState(int(ckpt["step"]), **ckpt.get("run", {}))
    changed = apply_optimizer_settings(cfg, ckpt.get("config", {}), optimizer, scheduler, run.step)
    if world.is_main:
        print(f"resume {resume} at step {run.step}" + (f"; applied {', '.join(changed)}" if changed else ""),
              file=sys.stderr)
    return run


def _loader(cfg: TrainConfig, source: Source, step: int, device: torch.device, world: World) -> DataLoader:
    """This rank's endless micro-batches from `step` on (model.distributed.RankBatches of the global order)."""
    dataset = DetectionDataset(
        source, cfg.train_min_sizes or cfg.min_size, cfg.max_size, train=True, flip_prob=cfg.flip_prob, seed=cfg.seed
    )
    groups = aspect_ratio_groups([source.image_size(i) for i in range(len(source))], cfg.aspect_ratio_group_factor)
    return DataLoader(
        dataset,
        batch_sampler=RankBatches(ResumableSampler(groups, cfg.batch_size, cfg.seed, step), cfg.batch_size, world,
                                  cfg.accumulate_steps),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=_leave_stop_signals_to_the_trainer,
    )


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and a worker
    that died of it would fail the step the trainer is finishing; the trainer stops them when it exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_step(
    model, optimizer, scheduler, batches: list[Batch], device: torch.device, cfg: TrainConfig, scaler, world: World
) -> dict[str, float]:
    """One optimizer step over ``batches`` (this rank's micro-batches of the global batch): forward under
    autocast when ``cfg.amp`` asks, each micro-batch's loss scaled by 1 / accumulate_steps, gradients
    averaged over the ranks by DDP on the last backward only. Raises on every rank, before touching the
    weights, when a loss is not finite on any. Returns the loss terms, averaged over micro-batches."""
    dtype = AMP_DTYPES[cfg.amp]
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for k, batch in enumerate(batches):
        images, sizes, targets = _to_device(batch, device)
        sync = k == len(batches) - 1 or not world.distributed
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                losses = model(images, sizes, targets)
            loss = sum(losses.values())
            values = {name: v.detach().item() for name, v in losses.items()}
            if any_rank(not torch.isfinite(loss), world, device):
                raise FloatingPointError(f"non-finite loss: {values}")
            scaler.scale(loss / len(batches)).backward()
        for name, v in values.items():
            totals[name] = totals.get(name, 0.0) + v / len(batches)
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {"loss": sum(totals.values()), **totals}


class Validation:
    """COCO box and mask AP on a validation folder through ``python -m evaluation``'s path (the service's
    resize, padding, pasting and RLE), so the figure that picks best.pt is the served model's."""

    def __init__(self, cfg: TrainConfig, class_names: list[str], device: torch.device) -> None:
        root = Path(str(cfg.val_data))
        with reported_data_errors("val_data", root):
            ann_file = find_annotation_file(root)
            report = check_dataset(load_annotation_json(ann_file), images_folder(root), errors="stop")
        self.dataset = CocoDataset(root, ann_file, data=report.clean)
        self.cfg, self.class_names, self.device = cfg, class_names, device

    def __call__(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        from evaluation.evaluate import TorchPredictor, evaluate_predictions, predict_dataset

        model.eval()
        try:
            predictor = TorchPredictor(model, self.class_names, self.cfg.min_size, self.cfg.max_size, self.device)
            results = predict_dataset(predictor, self.dataset, self.cfg.batch_size, progress=False)
        finally:
            model.train()
        return evaluate_predictions(self.dataset.coco, results)


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (it then writes a checkpoint); a
    second one stops at once. Only the main thread can take signals: elsewhere this does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, signal._HANDLER] = {}

    def __enter__(self) -> StopSignals:
        if threading_is_main():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class TrainingStopped(CommandError):
    """The run stopped on a signal after writing its checkpoint; exit 128 + the signal's number."""

    def __init__(self, signum: int, step: int, path: Path, out_dir: Path) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path}; continue with "
            f"python -m model.train --resume --out-dir {out_dir}"
        )
        self.exit_status = 128 + signum
        self.step = step


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """A new run refuses a folder that holds one (or clears it when asked), so nothing is mixed up."""
    found = sorted({p.name for pattern in RUN_FILES for p in out_dir.glob(pattern)})
    if resume or not found:
        return
    if not overwrite:
        raise UsageError(
            f"{out_dir} already holds a run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): continue it "
            "with --resume, pick another --out-dir, or pass --overwrite to start over"
        )
    for name in found:
        (out_dir / name).unlink()


def train(
    cfg: TrainConfig, resume: str | os.PathLike | None = None, progress: bool = True, overwrite: bool = False
) -> Path:
    """Run (or continue) training to cfg.max_steps; returns the path of the last checkpoint. Under torchrun,
    every rank runs this; rank 0 alone writes files and evaluates."""
    cfg.check()
    if resume and not Path(resume).is_file():
        raise UsageError(f"--resume: no checkpoint at {resume}; start the run without --resume")
    world, device = init_world(resolve_device(cfg.device))
    try:
        return _train(cfg, resume, progress and world.is_main, overwrite, world, device)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, resume, progress: bool, overwrite: bool, world: World, device: torch.device) -> Path:
    out_dir = Path(cfg.out_dir)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        prepare_run_folder(out_dir, bool(resume), overwrite)
    source = build_source(cfg, verbose=world.is_main)
    class_names = list(source.class_names)
    cfg.num_classes = cfg.num_classes or len(class_names)
    if cfg.num_classes != len(class_names):
        raise UsageError(
            f"num_classes {cfg.num_classes} != {len(class_names)} classes in the data (background included)"
        )
    validation = Validation(cfg, class_names, device) if cfg.val_data and world.is_main else None
    model, optimizer, scheduler = build(cfg, cfg.num_classes, device, initialize=not resume, verbose=world.is_main)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    run = _restore(cfg, model, optimizer, scheduler, scaler, resume, device, world) if resume else RunState()
    network = distributed_model(model, cfg, world, device)
    loader = iter(_loader(cfg, source, run.step, device, world))
    if world.is_main:
        with atomic_path(out_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def state() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": run.step,
            "config": dataclasses.asdict(cfg),
            "class_names": class_names,
            "run": {k: v for k, v in dataclasses.asdict(run).items() if k != "step"},
        }

    network.train()
    bar = _progress(cfg.max_steps, run.step, progress)
    tic = time.perf_counter()
    last: Path | None = None
    with _run_log(out_dir, run.step, world) as (log, board), StopSignals() as stop:
        while run.step < cfg.max_steps:
            batches = [next(loader) for _ in range(cfg.accumulate_steps)]
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            seed_step(cfg.seed, run.step, world.rank)
            try:
                values = train_step(network, optimizer, scheduler, batches, device, cfg, scaler, world)
            except FloatingPointError as exc:
                raise CommandError(f"step {run.step + 1}: {exc}") from None
            values = mean_over_ranks(values, world, device)
            run.step += 1
            bar.update(1)
            bar.set_postfix({k.removeprefix("loss_"): f"{v:.3f}" for k, v in values.items()})
            done = run.step == cfg.max_steps
            stopping = any_rank(stop.received is not None, world, device)
            evaluate = cfg.val_data and ((cfg.eval_every and run.step % cfg.eval_every == 0) or done)
            if run.step % cfg.log_every == 0 or done:
                image_ids = gathered([i for b in batches for i in b.image_ids], world)
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                if world.is_main:
                    record = {"lr": lr, **values, "seconds": round(elapsed, 3), "image_ids": image_ids}
                    _log(log, board, run.step, record)
            if run.step % cfg.checkpoint_every == 0 or done or evaluate or stopping:
                if world.is_main:
                    improved = _evaluate(validation, model, cfg, run, log, board) if validation and evaluate else False
                    last = save_checkpoint(out_dir, state(), cfg.keep_checkpoints)
                    if improved:
                        _link_or_copy(last, out_dir / "best.pt")
                barrier(world)
            if stopping:
                bar.close()
                raise TrainingStopped(stop.received or signal.SIGTERM, run.step, last or out_dir / "last.pt", out_dir)
            if cfg.early_stop_evals and any_rank(run.evals_since_best >= cfg.early_stop_evals, world, device):
                if world.is_main:
                    print(f"early stop at step {run.step}: no better {cfg.eval_metric} in {run.evals_since_best} "
                          f"evaluations (best {run.best:.4f} at step {run.best_step})", file=sys.stderr)
                break
    bar.close()
    return last or out_dir / "last.pt"


@contextlib.contextmanager
def _run_log(out_dir: Path, step: int, world: World):
    """log.jsonl (appended) and TensorBoard's writer (events past ``step`` dropped) on rank 0; None elsewhere."""
    if not world.is_main:
        yield None, None
        return
    from torch.utils.tensorboard import SummaryWriter

    with open(out_dir / "log.jsonl", "a") as log, SummaryWriter(str(out_dir), purge_step=step + 1) as board:
        yield log, board


def distributed_model(model: torch.nn.Module, cfg: TrainConfig, world: World, device: torch.device):
    """``model`` itself in a world of one; under torchrun DistributedDataParallel over it, its batch norms
    synchronized first when ``norm: syncbn`` (torchvision's --sync-bn; PyTorch's SyncBatchNorm runs on CUDA)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if cfg.model.get("norm") == "syncbn":
        if device.type != "cuda":
            raise UsageError("norm: syncbn needs CUDA devices (PyTorch's SyncBatchNorm); on the CPU use norm: bn")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _log(log, board, step: int, record: dict) -> None:
    """One line of log.jsonl and the same scalars in TensorBoard."""
    log.write(json.dumps({"step": step, **record}) + "\n")
    log.flush()
    for key, value in record.items():
        if isinstance(value, float | int) and key != "seconds":
            board.add_scalar(f"train/{key}", value, step)


def _evaluate(validation: Validation, model, cfg: TrainConfig, run: RunState, log, board) -> bool:
    """Evaluate, log the AP figures (0-1, COCOeval's), and say whether the watched metric improved."""
    tic = time.perf_counter()
    metrics = validation(model)
    iou_type, _, name = cfg.eval_metric.partition("/")
    value = metrics[iou_type][name]
    improved = not math.isnan(value) and value > run.best
    if improved:
        run.best, run.best_step, run.evals_since_best = value, run.step, 0
    else:
        run.evals_since_best += 1
    safe = {t: {k: (None if math.isnan(v) else v) for k, v in row.items()} for t, row in metrics.items()}
    log.write(json.dumps({"step": run.step, "eval": safe, "seconds": round(time.perf_counter() - tic, 3)}) + "\n")
    log.flush()
    for t, row in metrics.items():
        for k, v in row.items():
            if not math.isnan(v):
                board.add_scalar(f"val/{t}/{k}", v, run.step)
    print(f"step {run.step}: {cfg.eval_metric} {value:.4f} (best {run.best:.4f} at step {run.best_step})",
          file=sys.stderr)
    return improved


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


def read_config_file(path: str) -> dict:
    """A JSON config file's fields, or one UsageError line."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file (configs/ has the examples)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {path}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a JSON object of TrainConfig fields")
    try:
        TrainConfig.from_dict(values)
    except UsageError as exc:
        raise UsageError(f"--config {path}: {exc}") from None
    return values


def build_parser(file_values: dict, config: str | None) -> argparse.ArgumentParser:
    """The flags, one per TrainConfig field; each help shows the value the run will take from --config,
    or the built-in default."""
    parser = argparse.ArgumentParser(
        prog="python -m model.train", description="Train Mask R-CNN (COCO folder or synthetic shapes)."
    )
    parser.add_argument("--config", help="JSON file with TrainConfig fields")
    parser.add_argument(
        "--resume", nargs="?", const="auto", help="continue from a checkpoint (default: OUT_DIR/last.pt)"
    )
    parser.add_argument("--overwrite", action="store_true", help="start over in an OUT_DIR that holds a run")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        shown = f"{file_values[f.name]} (from {config})" if f.name in file_values else f"default: {value}"
        if f.name == "model":
            parser.add_argument(flag, type=json.loads, default=None, help=f"build_model kwargs as JSON; {shown}")
        elif isinstance(value, list):
            parser.add_argument(flag, type=int, nargs="*", default=None, help=shown)
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        else:
            kind = {"num_classes": int, "data": str, "synthetic": int, "init_weights": str, "val_data": str,
                    "trainable_backbone_layers": int}.get(f.name, type(value))
            parser.add_argument(flag, type=kind, default=None, help=shown)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None, bool]:
    """Config = checkpoint's config (on resume) < config file < explicit flags. Returns (config, the
    checkpoint to resume or None, whether to overwrite a run folder)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    file_values = read_config_file(config) if config else {}
    args = build_parser(file_values, config).parse_args(argv)
    flag_values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    resume = args.resume
    if resume == "auto":
        out_dir = flag_values.get("out_dir", file_values.get("out_dir", TrainConfig.out_dir))
        resume = str(Path(out_dir) / "last.pt")
    values: dict = {}
    if resume:
        if not Path(resume).is_file():
            raise UsageError(f"--resume: no checkpoint at {resume}; start the run without --resume")
        values.update(load_checkpoint(resume)["config"])
    values.update(file_values)
    values.update(flag_values)
    return TrainConfig.from_dict(values), resume, args.overwrite


def main(argv: Sequence[str] | None = None) -> int:
    cfg, resume, overwrite = parse_args(None if argv is None else list(argv))
    path = train(cfg, resume, overwrite=overwrite)
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank 0 speaks for the run
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
