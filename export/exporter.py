"""PyTorch Mask R-CNN -> one self-describing, batched ONNX graph, verified against PyTorch.

The graph is the model's own inference path (``MaskRCNN.forward`` in eval mode) traced by
``torch.export``; the custom RoIAlign and NMS ops become ONNX ``RoiAlign`` and ``NonMaxSuppression``.
Before tracing, batch norms are folded into the convolutions they follow. The file is written to a
temporary name and only moved into place once ONNX Runtime reproduces PyTorch's detections to within
float32's own noise, measured for this model (export/verification.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from contract import INPUT_NAMES, OUTPUT_NAMES, SIZE_DIVISIBILITY, GraphMetadata, padded_size
from export.onnx_ops import translation_table
from export.verification import DEFAULT_FACTOR, Rule, SampleVerification, compare
from model.files import atomic_path
from model.mask_rcnn import MaskRCNN

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """An export that must not produce a file; the message is one readable line."""


@dataclass
class ExportConfig:
    """What the file will say about itself, and how to write it."""

    metadata: GraphMetadata
    opset: int = DEFAULT_OPSET
    tolerance: float | None = None  # the user's factor over float32's noise, instead of DEFAULT_FACTOR
    skip_verify: bool = False  # the user's choice: no comparison with PyTorch at all

    @property
    def fp16_weights(self) -> bool:
        return self.metadata.weights == "float16"

    @property
    def verification(self) -> str:
        """How the file was verified, as its metadata records it (CONTRACT.md)."""
        if self.skip_verify:
            return "skipped (--skip-verify)"
        if self.tolerance is not None:
            return f"float32 noise x{self.tolerance:g} (--tolerance)"
        return f"float32 noise x{DEFAULT_FACTOR:g}"


class InferenceGraph(nn.Module):
    """The exported signature: named tensors in, the fixed-size tuple of outputs out."""

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor, score_threshold: Tensor) -> tuple[Tensor, ...]:
        # One threshold per image, or one for all: the file's default is a single value.
        last = score_threshold.shape[0] - 1
        per_image = score_threshold[torch.arange(images.shape[0]).clamp(max=last)]
        result = self.model(images, image_sizes, None, per_image)
        return tuple(result[name] for name in OUTPUT_NAMES)


def fold_batch_norms(module: ModuleT) -> ModuleT:
    """Fold every (frozen) batch norm that directly follows a convolution into that convolution.

    Inference-time batch norm is a per-channel affine map, so conv -> BN is one conv with rescaled
    weights and a bias; this removes a full pass over every backbone activation.
    """
    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d | FrozenBatchNorm2d):
                setattr(parent, conv_name, _folded(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return module


def _folded(conv: nn.Conv2d, bn: Any) -> nn.Conv2d:
    """``conv`` then ``bn`` (nn.BatchNorm2d or torchvision's FrozenBatchNorm2d, which share the attributes
    read here but no type) as one convolution."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels,
        conv.kernel_size, conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]  # stored as tuple[int, ...]
        conv.groups, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
    )
    assert fused.bias is not None  # bias=True, Conv2d's default
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bias)
    return fused


def round_weights_to_fp16(model: nn.Module) -> None:
    """Round every float parameter to the nearest float16 value (kept as float32), so that the PyTorch
    model verified against the file is exactly the one whose weights the file stores in float16."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.half().float())


def store_weights_fp16(
    graph_model: onnx.ModelProto, min_elements: int = 1024, names: Container[str] | None = None
) -> None:
    """Store large float32 initializers (only those in ``names``, when given) as float16 behind a Cast to
    float32: half the file size, while the computation stays float32 (ONNX Runtime folds the Casts when
    it loads the file)."""
    graph = graph_model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            continue
        if names is not None and init.name not in names:
            continue
        array = onnx.numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        init.CopyFrom(onnx.numpy_helper.from_array(array, f"{name}__fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}__fp16"], [name], to=onnx.TensorProto.FLOAT))
    for node in reversed(casts):
        graph.node.insert(0, node)


def load_weights_fp32(graph_model: onnx.ModelProto) -> list[str]:
    """Undo ``store_weights_fp16``: every float16 initializer read through a Cast to float32 becomes a
    float32 initializer under the Cast's output name, and the Cast goes. Returns those names.

    Tools that find weights by looking for initializers (ONNX Runtime's quantizer among them) see the
    weights again; the values are exactly the ones the Casts produced.
    """
    graph = graph_model.graph
    halves = {init.name: init for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT16}
    casts = [
        node for node in graph.node
        if node.op_type == "Cast" and node.input[0] in halves
        and onnx.helper.get_attribute_value(node.attribute[0]) == onnx.TensorProto.FLOAT
    ]
    for node in casts:
        half = halves[node.input[0]]
        array = onnx.numpy_helper.to_array(half).astype(np.float32)
        graph.initializer.remove(half)
        graph.initializer.append(onnx.numpy_helper.from_array(array, node.output[0]))
        graph.node.remove(node)
    return [node.output[0] for node in casts]


def sample_batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[Tensor, Tensor]:
    """A zero-padded uint8 batch of random images with the given real sizes (padded to multiples of 32)."""
    g = torch.Generator().manual_seed(seed)
    height, width = padded_size(max(h for h, _ in sizes), max(w for _, w in sizes))
    images = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return images, torch.tensor(sizes, dtype=torch.int64)


class _DropMessage(logging.Filter):
    """A log filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def expected_tracing_warnings() -> Iterator[None]:
    """Silence the two things torch.onnx.export says on every export of our graphs, both expected; any
    other warning still shows.

    - onnxscript translates ``aten.index_put`` with ``Constant(value_ints=none_indices)``, an empty list when
      no index is None (ours); onnx_ir logs that an empty list's type is ambiguous and takes INTS, which is
      what ``value_ints`` says. (Were it ever wrong for another op, onnx.checker in ``_finalize`` refuses it.)
    - "batch" is one Dim shared by ``images`` and ``image_sizes`` on purpose (one size per image); torch's
      axis renaming warns on the second input that the name will not be used, though both names are "batch".
    """
    ambiguous = _DropMessage("Attribute type is ambiguous because it is an empty sequence")
    onnx_ir_log = logging.getLogger("onnx_ir._convenience")
    onnx_ir_log.addFilter(ambiguous)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"# The axis name: batch will not be used, since it shares the same shape constraints "
                r"with another axis: batch\.",
                category=UserWarning,
            )
            yield
    finally:
        onnx_ir_log.removeFilter(ambiguous)


def _trace(model: MaskRCNN, path: Path, opset: int, sample: tuple[Tensor, Tensor]) -> None:
    images, image_sizes = sample
    batch = torch.export.Dim("batch", min=1, max=256)
    # Height and width are multiples of 32 by contract; expressing that lets the tracer prove it.
    h32 = torch.export.Dim("h32", min=1, max=512)
    w32 = torch.export.Dim("w32", min=1, max=512)
    with expected_tracing_warnings():
        program = torch.onnx.export(
            InferenceGraph(model).eval(),
            (images, image_sizes, torch.zeros(images.shape[0] + 1)),
            dynamic_shapes={
                "images": {0: batch, 2: SIZE_DIVISIBILITY * h32, 3: SIZE_DIVISIBILITY * w32},
                "image_sizes": {0: batch},
                "score_threshold": {0: torch.export.Dim("thresholds", min=1, max=256)},
            },
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            custom_translation_table=translation_table(),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    if program is None:  # torch.onnx.export returns None only when asked to write the file itself
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    program.save(str(path))


def _finalize(path: Path, config: ExportConfig) -> None:
    """Readable dimension names, a default for ``score_threshold``, metadata, and onnx.checker."""
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    dim_names = {"boxes": "detections", "scores": "detections", "labels": "detections", "masks": "detections"}
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name in dim_names:
            dims[1].dim_param = dim_names[output.name]
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and value.name != "score_threshold":
            dims[0].dim_param = "batch"
    # An initializer with an input's name is that input's default: callers may omit it.
    default = np.array([config.metadata.score_threshold], dtype=np.float32)
    graph.initializer.append(onnx.numpy_helper.from_array(default, "score_threshold"))
    del graph_model.metadata_props[:]
    metadata = dataclasses.replace(config.metadata, verification=config.verification)
    for key, value in metadata.to_props().items():
        graph_model.metadata_props.add(key=key, value=value)
    if config.fp16_weights:
        store_weights_fp16(graph_model)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))


def run_torch(model: MaskRCNN, images: Tensor, image_sizes: Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        result = model(images, image_sizes)
    return {name: result[name].numpy() for name in OUTPUT_NAMES}


def run_onnx(session: ort.InferenceSession, images: Tensor, image_sizes: Tensor) -> dict[str, np.ndarray]:
    outputs = session.run(list(OUTPUT_NAMES), {"images": images.numpy(), "image_sizes": image_sizes.numpy()})
    return dict(zip(OUTPUT_NAMES, outputs, strict=True))


def verification_samples(min_size: int) -> list[tuple[Tensor, Tensor]]:
    """One image, and a batch of images with different real sizes (around the model's input size)."""
    side = max(64, min(min_size, 320))
    return [
        sample_batch([(side, side + side // 2)], seed=1),
        sample_batch([(side, side), (side - 40, side + 24), (side + 32, side - 8)], seed=2),
    ]


def run_torch_per_image(model: MaskRCNN, images: Tensor, image_sizes: Tensor) -> dict[str, np.ndarray]:
    """``run_torch`` one image of the batch at a time (in the batch's padded tensor), outputs stacked.

    For the float64 reference: PyTorch's float64 convolutions unfold their input (im2col) into buffers
    that for a batch of three R-50 images take gigabytes, and the model is padding-invariant, so each
    image's answer alone is its answer in the batch.
    """
    outputs = [run_torch(model, images[i : i + 1], image_sizes[i : i + 1]) for i in range(images.shape[0])]
    return {name: np.concatenate([o[name] for o in outputs]) for name in OUTPUT_NAMES}


def verify(model: MaskRCNN, path: Path, samples: list[tuple[Tensor, Tensor]], rule: Rule) -> list[SampleVerification]:
    """PyTorch float32 and ONNX Runtime, each against PyTorch float64 (the same weights), on each sample."""
    options = ort.SessionOptions()
    # ONNX Runtime warns that the score_threshold initializer is also a graph input: it is that input's
    # default, by design (CONTRACT.md), which the service's sessions also know. Its errors still show.
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model64 = copy.deepcopy(model).double()
    results = []
    for sample in samples:
        exact = run_torch_per_image(model64, *sample)
        float32 = compare(exact, run_torch(model, *sample), rule.nms_threshold)
        onnx_runtime = compare(exact, run_onnx(session, *sample), rule.nms_threshold)
        results.append(rule.judge(float32, onnx_runtime))
    return results


def export_model(model: MaskRCNN, out: Path, config: ExportConfig, log=print) -> list[SampleVerification]:
    """Export, finalize and verify ``model`` into ``out``; on any failure no file is left at ``out``."""
    model = fold_batch_norms(model.eval())
    if config.fp16_weights:
        round_weights_to_fp16(model)
    with atomic_path(out) as tmp:
        log("export: tracing with torch.export and converting to ONNX")
        _trace(model, tmp, config.opset, sample_batch([(256, 320), (192, 256)], seed=0))
        log("optimize: metadata, named dimensions, onnx.checker")
        _finalize(tmp, config)
        return check_graph(model, tmp, config, log)


def check_graph(model: MaskRCNN, path: Path, config: ExportConfig, log=print) -> list[SampleVerification]:
    """Verify the graph at ``path`` against ``model`` (folded as the graph is) by ``config``'s rule, printing
    the rule and every figure; raise ExportError if it fails. The user's --skip-verify and --tolerance
    are obeyed with a warning."""
    if config.skip_verify:
        log("warning: --skip-verify: the graph was NOT compared with PyTorch; its metadata says so")
        return []
    factor = DEFAULT_FACTOR if config.tolerance is None else config.tolerance
    rule = Rule(config.metadata.score_threshold, config.metadata.nms_threshold, factor)
    if config.tolerance is not None:
        log(
            f"warning: --tolerance {config.tolerance:g}: ONNX Runtime may be {config.tolerance:g} x float32's "
            f"noise away from PyTorch (default {DEFAULT_FACTOR:g}); its metadata says so"
        )
    log("verify: ONNX Runtime and PyTorch float32, each against PyTorch float64, on the same samples")
    log(f"  rule: {rule}")
    results = verify(model, path, verification_samples(config.metadata.min_size), rule)
    for result in results:
        log(f"  {result}")
    failed = [r for r in results if not r.ok()]
    if failed:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch beyond float32's noise: batch {failed[0].onnx.batch_size}: "
            f"{failed[0].problem()}"
        )
    if not any(r.onnx.paired for r in results):
        log(
            "  note: the random sample images gave no detections above the threshold; "
            "only the empty outputs were compared"
        )
    return results
