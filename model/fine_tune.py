"""Fine-tuning's start: initial weights loaded right or refused, and the backbone stages that stay frozen.

A fine-tuning run that silently leaves the FPN or the mask head at random initialization trains for hours
before anyone notices. So initial weights go through the exporter's name mapping (torchvision's legacy
names included), every tensor is accounted for (loaded, left fresh, unused in the file) in a table by
module, and anything left fresh beyond what the change of task explains is an error naming the tensors:
the class-specific predictor layers when the class count changes (a detection file), everything but the
ResNet body (an ImageNet classifier, as the paper initializes its backbones, section 3.1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.checkpoint import (
    CheckpointError,
    architecture_of,
    current_names,
    download_weights,
    fetch_torchvision_weights,
    read_checkpoint,
    torchvision_weights,
)

# The class-specific layers: their shapes follow the class count, so a new task starts them fresh.
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
# Where an ImageNet classifier's tensors go (model.train's classifier_names): the ResNet body, and res5 of C4.
BODY_PREFIXES = ("backbone.body.", "roi_heads.res5.")
# torchvision's trainable_backbone_layers / Detectron2's FREEZE_AT, counted from the top: 5 trains the whole
# body, 3 (both libraries' default when fine-tuning) freezes the stem and res2, 0 freezes the body.
BODY_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
FINE_TUNING_TRAINABLE_STAGES = 3


@dataclass
class InitialWeights:
    """A state dict to start from, in today's names, and what it is."""

    state_dict: dict[str, Tensor]
    kind: str  # "detection" (ours or torchvision's), or "classifier" (a torchvision ImageNet ResNet)
    origin: str  # what the user named
    arch: str | None = None  # the architecture the file is for, when it says or its keys show


def resolve_initial_weights(spec: str | os.PathLike) -> InitialWeights:
    """A file (a model.train checkpoint, a torchvision detection state dict under any torchvision version's
    names, a torchvision ImageNet classifier) or a torchvision weights name such as
    ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1`` or ``ResNet50_Weights.IMAGENET1K_V2`` (through its weights API:
    cache, download, hash check)."""
    spec = str(spec)
    if Path(spec).exists() or not spec.count("_Weights."):
        ckpt = read_checkpoint(spec)
        state = ckpt.state_dict
        if "fc.weight" in state:
            return InitialWeights(state, "classifier", spec)
        state = current_names(state)
        return InitialWeights(state, "detection", spec, ckpt.config.get("arch") or architecture_of(state))
    from torchvision.models import detection, get_model_weights, list_models

    weights = torchvision_weights(spec)
    if type(weights) in {get_model_weights(b) for b in list_models(module=detection)}:
        loaded = fetch_torchvision_weights(spec)
        return InitialWeights(current_names(loaded.state_dict), "detection", spec, loaded.config["arch"])
    state = download_weights(spec)
    if "fc.weight" not in state:
        raise CheckpointError(f"{spec}: neither Mask R-CNN weights nor an ImageNet ResNet classifier")
    return InitialWeights(state, "classifier", spec)


@dataclass
class InitReport:
    """Every tensor of the model and of the file, accounted for."""

    loaded: list[str] = field(default_factory=list)  # model tensors set from the file
    fresh: list[str] = field(default_factory=list)  # model tensors left at their initialization
    unused: list[str] = field(default_factory=list)  # file tensors the model did not take
    expected_fresh: set[str] = field(default_factory=set)  # what the change of task explains
    expected_unused: set[str] = field(default_factory=set)

    @property
    def unexplained(self) -> list[str]:
        """Model tensors left fresh, and file tensors unused, that the change of task does not explain."""
        return sorted(set(self.fresh) - self.expected_fresh) + sorted(set(self.unused) - self.expected_unused)

    def table(self) -> str:
        """loaded / left fresh / unused per module (the first two parts of a name)."""
        modules: dict[str, list[int]] = {}
        for column, names in enumerate((self.loaded, self.fresh, self.unused)):
            for name in names:
                modules.setdefault(".".join(name.split(".")[:2]), [0, 0, 0])[column] += 1
        width = max([len("module"), *map(len, modules)])
        lines = [f"  {'module':{width}}  loaded  fresh  unused"]
        for module, (loaded, fresh, unused) in sorted(modules.items()):
            lines.append(f"  {module:{width}}  {loaded:6d}  {fresh:5d}  {unused:6d}")
        lines.append(f"  {'total':{width}}  {len(self.loaded):6d}  {len(self.fresh):5d}  {len(self.unused):6d}")
        return "\n".join(lines)


def load_initial_weights(model: nn.Module, weights: InitialWeights, allow_fresh: bool = False) -> InitReport:
    """Load ``weights`` into ``model`` where names and shapes agree; CheckpointError naming the tensors when
    anything beyond what the task change explains is left fresh or unused, unless ``allow_fresh``.
    Batch-norm bookkeeping (num_batches_tracked) is not counted."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in weights.state_dict.items() if not k.endswith("num_batches_tracked")}
    names = classifier_names(state, own) if weights.kind == "classifier" else {k: k for k in state if k in own}
    usable = {names[k]: v for k, v in state.items() if k in names and own[names[k]].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    used = {k for k in state if names.get(k) in usable}
    report = InitReport(sorted(usable), sorted(set(own) - set(usable)), sorted(set(state) - used))
    if weights.kind == "classifier":
        report.expected_fresh = {k for k in own if not k.startswith(BODY_PREFIXES)}
        report.expected_unused = {k for k in state if k.startswith("fc.")}
    else:
        report.expected_fresh = {k for k in own if k.startswith(PREDICTOR_PREFIXES)}
        report.expected_unused = {k for k in state if k.startswith(PREDICTOR_PREFIXES)}
    if report.unexplained and not allow_fresh:
        names_list = report.unexplained
        shown = ", ".join(names_list[:8]) + (f", ... ({len(names_list)} in all)" if len(names_list) > 8 else "")
        raise CheckpointError(
            f"{weights.origin}: {len(names_list)} tensors left fresh or unused beyond the class-specific layers: "
            f"{shown}; check the architecture (the file's: {weights.arch or 'unknown'}), or pass "
            "--allow-fresh-weights to train them from scratch"
        )
    return report


def classifier_names(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, str]:
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


def frozen_norms_left_fresh(model: nn.Module, report: InitReport | None) -> list[str]:
    """Frozen batch norms that no weights set: they stay the identity, no normalization at all."""
    fresh = set(report.fresh) if report else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, FrozenBatchNorm2d) and (fresh is None or f"{name}.running_var" in fresh)
    ]


def freeze_backbone_stages(model: nn.Module, trainable: int) -> list[str]:
    """Freeze all but the top ``trainable`` of the body's five stages (stem, res2..res5): their parameters
    take no gradient and their batch norms keep their statistics (converted to FrozenBatchNorm2d, as
    Detectron2 does). Returns the frozen stages' module names."""
    if not 0 <= trainable <= len(BODY_STAGES):
        raise ValueError(f"trainable_backbone_layers must be in 0..{len(BODY_STAGES)}, got {trainable}")
    body = model.get_submodule("backbone.body")
    frozen = []
    for stage in BODY_STAGES[: len(BODY_STAGES) - trainable]:
        for name in stage:
            owner, attr = (model.roi_heads, "res5") if name == "layer4" and not hasattr(body, name) else (body, name)
            module = getattr(owner, attr)
            setattr(owner, attr, _frozen(module))
            frozen.append(name)
    return frozen


def _frozen(module: nn.Module) -> nn.Module:
    """``module`` without gradients, its BatchNorm2d layers replaced by FrozenBatchNorm2d with their values."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps).to(module.weight.device)
        with torch.no_grad():
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(module, key))
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _frozen(child))
    for p in module.parameters(recurse=False):
        p.requires_grad_(False)
    return module
