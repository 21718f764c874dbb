"""An exported graph -> an int8 one: ONNX Runtime's static quantization, with a recipe for this graph, verified.

ONNX Runtime's ``quantize_static`` rewrites the chosen nodes in QDQ form (QuantizeLinear / DequantizeLinear
pairs around them, int8 weights per output channel, uint8 activations with ranges calibrated on images);
its CPU kernels then run those convolutions and matrix products in 8-bit integers (VNNI where the CPU has it).

Which nodes is the recipe, and this graph needs one. "Every Conv" gives no detections at all: the graph
zeroes activations outside each image of a padded batch with a bias of float32's most negative value,
spread over the channels by a 1x1 convolution of ones (model/backbone.py ``PaddingMasks``). That convolution is
a Conv too; quantized, its range is [-3.4e38, 0], a step of ~1e36, and every feature is lost. So nodes are
sorted into families (:func:`node_families`): what is computed from ``image_sizes`` and shapes alone
(the padding masks, anchors) is geometry and stays float; weighted layers are grouped by the module they
come from (backbone, FPN, RPN head, box head, mask head, and the predictors that turn features into
scores and box deltas). A recipe names the families it makes int8 (:data:`RECIPES`).

Speed needs the activations to stay int8 from one weighted layer to the next: every float operation in
between costs a dequantize, the operation, a quantize, and often a layout change (ONNX Runtime runs int8
convolutions channels-last). So the ReLUs, sums, max-pools and upsamplings of a chosen family are int8
too (FEATURE_OPS), and two rewrites, exact in float, remove the rest: the padding masks become multiplies
by 0/1 masks (:func:`masks_as_multiplies`), and the mask predictor's ConvTranspose, which ONNX Runtime's CPU
provider cannot run in int8, becomes a 1x1 convolution and a DepthToSpace (:func:`upsampling_as_conv`).
The recipes' figures (speed on R-50-FPN, AP on the demo model) are in benchmarks/RESULTS.md; they chose
:data:`DEFAULT_RECIPE`.

The result is verified against the float32 graph on held-out images (never the calibration ones): each
confident float32 detection must have an int8 one of the same class whose box overlaps it with IoU >= 0.9
(:func:`match_detections`); the share of those matched and their mean mask IoU must reach a documented
bar (:data:`MIN_MATCHED`, :data:`MIN_MASK_IOU`), or no file is written.

CLI: ``python -m export.quantize --model IN.onnx --calibration DIR --out OUT.onnx [--num-images N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from PIL import Image
from pycocotools import mask as mask_utils

from contract import INPUT_NAMES, GraphMetadata, MetadataError, pad_batch
from export.exporter import load_weights_fp32, store_weights_fp16
from export.verification import box_iou
from model.files import atomic_path
from service.core.postprocess import encode_masks
from service.core.runtime import OnnxModel, Prediction, resize_by_policy

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_CALIBRATION_IMAGES = 32
DEFAULT_VERIFICATION_IMAGES = 32
# The verification bar (the quantization contract). Detections of the float32 graph scoring at least
# VERIFY_SCORE_THRESHOLD are compared; an int8 detection matches one when it has the same label and its
# box has IoU >= MATCH_IOU with it. At least MIN_MATCHED of them must be matched, with a mean mask IoU
# (masks pasted into the image, as served) of at least MIN_MASK_IOU.
VERIFY_SCORE_THRESHOLD = 0.5
MATCH_IOU = 0.9
MIN_MATCHED = 0.9
MIN_MASK_IOU = 0.9
# Activation ranges: the minimum and maximum over the calibration images. ONNX Runtime's histogram
# calibrators (Percentile, Entropy) stack each tensor's values across runs and fail on this graph, whose
# tensor shapes change with every image's size and detection count.
CALIBRATE_METHOD = CalibrationMethod.MinMax

# Node families (see node_families). Geometry is never quantized.
GEOMETRY = "geometry"
# Weighted layers by the module their weights belong to: (initializer name fragment, family), first match.
WEIGHT_FAMILIES = (
    ("backbone.body.", "backbone"),
    ("backbone.fpn.", "fpn"),
    ("rpn.head.conv", "rpn_head"),
    ("rpn.head.", "rpn_predictor"),
    ("roi_heads.box_head.", "box_head"),
    ("roi_heads.box_predictor.", "box_predictor"),
    ("roi_heads.mask_head.", "mask_head"),
    ("roi_heads.mask_predictor.", "mask_predictor"),
)
FAMILIES = (GEOMETRY, *(family for _, family in WEIGHT_FAMILIES), "other")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm")
SHAPE_OPS = ("Shape", "Size")  # their outputs are sizes, not pixels
# What runs on feature maps between weighted layers: activations, residual and lateral sums, padding masks
# (once rewritten as multiplies), max-pools, upsamplings.
FEATURE_OPS = ("Relu", "Add", "Mul", "MaxPool", "Resize", "DepthToSpace")


class QuantizeError(RuntimeError):
    """A quantization that must not produce a file; the message is one readable line."""


@dataclass(frozen=True)
class Recipe:
    """Which nodes become int8."""

    name: str
    families: tuple[str, ...]  # node families (node_families) whose ``op_types`` nodes become int8
    op_types: tuple[str, ...] = WEIGHTED_OPS
    # Rewrite the padding masks as multiplies (masks_as_multiplies) and make them and the other FEATURE_OPS
    # of the chosen families int8 too: activations stay int8 from one weighted layer to the next.
    int8_masks: bool = True

    def describe(self, calibration_images: int) -> dict[str, object]:
        """The file's ``quantization`` metadata entry."""
        return {
            "recipe": self.name,
            "int8": list(self.families),
            "float": [f for f in FAMILIES if f not in self.families],
            "op_types": list(self.op_types + FEATURE_OPS * self.int8_masks),
            "format": "QDQ, int8 weights per output channel, uint8 activations",
            "calibrate_method": CALIBRATE_METHOD.name,
            "calibration_images": calibration_images,
        }


BACKBONE = ("backbone", "fpn", "rpn_head")
HEADS = ("box_head", "mask_head", "mask_predictor")
PREDICTORS = ("rpn_predictor", "box_predictor")
RECIPES = {
    recipe.name: recipe
    for recipe in (
        # The recipe "switched on": every Conv, the padding masks' included. No detections survive.
        Recipe("every-conv", FAMILIES, ("Conv",), int8_masks=False),
        Recipe("backbone-float-masks", BACKBONE, int8_masks=False),
        Recipe("backbone", BACKBONE),
        Recipe("backbone+heads", BACKBONE + HEADS),
        Recipe("all-weighted", BACKBONE + HEADS + PREDICTORS),
    )
}
DEFAULT_RECIPE = "backbone+heads"


def node_families(graph_model: onnx.ModelProto) -> dict[str, str]:
    """Each node's family, by name.

    A node none of whose inputs depends on the pixels of ``images`` is geometry: a function of
    ``image_sizes``, tensor shapes and constants (padding masks, anchors, size arithmetic). A weighted
    layer takes the family of the module its weight initializer belongs to (the exporter keeps PyTorch's
    parameter names), "other" if none. The activations, sums, masks, pools and upsamplings between
    weighted layers (FEATURE_OPS) take the family of the feature map they work on; everything else
    (proposal and box decoding, NMS, RoIAlign, the image normalization) is "other".
    """
    graph = graph_model.graph
    initializers = {init.name for init in graph.initializer}
    from_images = {"images"}
    tensor_family: dict[str, str] = {}  # feature maps -> their family
    families = {}
    for node in graph.node:  # ONNX nodes are topologically sorted
        upstream = [tensor_family[name] for name in node.input if name in tensor_family]
        if node.op_type in SHAPE_OPS or not any(name in from_images for name in node.input):
            family = GEOMETRY
        elif node.op_type in WEIGHTED_OPS:
            weight = next((name for name in node.input[1:] if name in initializers), "")
            family = next((fam for fragment, fam in WEIGHT_FAMILIES if fragment in weight), "other")
        elif node.op_type in FEATURE_OPS and upstream:
            family = upstream[0]
        else:
            family = "other"
        families[node.name] = family
        if family != GEOMETRY:
            from_images.update(node.output)
        if family not in (GEOMETRY, "other"):
            tensor_family.update(dict.fromkeys(node.output, family))
    return families


def int8_nodes(graph_model: onnx.ModelProto, recipe: Recipe) -> list[str]:
    """The nodes ``recipe`` makes int8: its families' nodes of its op types and, with ``int8_masks``, their
    FEATURE_OPS nodes, except any of those that reads a geometry tensor other than a 0/1 mask (a Cast): the
    additive mask of float32's most negative value must never be quantized."""
    families = node_families(graph_model)
    geometry = {
        out for node in graph_model.graph.node if families[node.name] == GEOMETRY and node.op_type != "Cast"
        for out in node.output
    }
    return [
        node.name for node in graph_model.graph.node
        if families[node.name] in recipe.families
        and (node.op_type in recipe.op_types or (recipe.int8_masks and node.op_type in FEATURE_OPS))
        and not (node.op_type in FEATURE_OPS and geometry.intersection(node.input))
    ]


def _constant(
    graph: onnx.GraphProto, name: str, producer: dict[str, onnx.NodeProto] | None = None
) -> np.ndarray | None:
    """The initializer ``name``; with ``producer``, also a constant broadcast by an ``Expand`` (the exporter's
    form of ``new_full``), as its unbroadcast value."""
    init = next((i for i in graph.initializer if i.name == name), None)
    if init is not None:
        return onnx.numpy_helper.to_array(init)
    source = (producer or {}).get(name)
    return _constant(graph, source.input[0]) if source is not None and source.op_type == "Expand" else None


def masks_as_multiplies(graph_model: onnx.ModelProto) -> list[str]:
    """Rewrite the padding masks of model/backbone.py (``PaddingMasks``) into multiplies by [B, 1, H, W] 0/1
    masks, which ONNX Runtime runs in int8; returns the names of those multiplies. The float results are
    unchanged: ``ReLU(x + bias)`` with a bias of 0 inside and float32's most negative value outside is
    ``ReLU(x) * mask``, and a multiply by the mask spread over the channels is the broadcast multiply.

    The float graph's form is the fastest for float kernels (the add and multiply fuse into the NCHWc
    convolutions), and the worst for int8 ones: the bias cannot be quantized, so every masked
    activation leaves the int8 domain and its channels-last layout for a float add (dequantize,
    transpose, add, quantize: four passes over the tensor), while a multiply by 0/1 is exact in uint8
    and stays in that layout.
    """
    graph = graph_model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced: dict[str, str] = {}  # the spread masks' outputs -> their [B, 1, H, W] inputs
    after: dict[str, list[onnx.NodeProto]] = {}  # node name -> new nodes to place right after it
    removed: set[str] = set()
    multiplies = []
    for conv in graph.node:
        ones = _constant(graph, conv.input[1]) if conv.op_type == "Conv" and len(conv.input) == 2 else None
        if ones is None or ones.shape[1:] != (1, 1, 1) or not (ones == 1).all() or conv.input[0] not in producer:
            continue  # not a mask spread over the channels by a 1x1 convolution of ones
        source = producer[conv.input[0]]
        uses = consumers.get(conv.output[0], [])
        if source.op_type == "Cast" and all(use.op_type == "Mul" for use in uses):  # a 0/1 mask: broadcast it
            replaced[conv.output[0]] = conv.input[0]
            multiplies += [use.name for use in uses]
        elif (source.op_type == "Where" and _is_bias(graph, source, producer)
              and all(_relu_after(use, consumers) for use in uses)):
            mask = f"{conv.output[0]}__mask01"
            after[conv.name] = [onnx.helper.make_node(
                "Cast", [source.input[0]], [mask], name=f"{conv.name}__mask01", to=onnx.TensorProto.FLOAT
            )]
            for add in uses:  # x + bias -> ReLU  becomes  ReLU(x) -> * mask
                relu = consumers[add.output[0]][0]
                x = add.input[0] if add.input[1] == conv.output[0] else add.input[1]
                unmasked = f"{relu.output[0]}__unmasked"
                after[relu.name] = [onnx.helper.make_node(
                    "Mul", [unmasked, mask], [relu.output[0]], name=f"{relu.name}__masked"
                )]
                multiplies.append(f"{relu.name}__masked")
                relu.input[0], relu.output[0] = x, unmasked
                removed.add(add.name)
        else:
            continue
        removed.add(conv.name)
    nodes = []
    for node in graph.node:
        node.input[:] = [replaced.get(name, name) for name in node.input]
        nodes += [node] * (node.name not in removed) + after.get(node.name, [])
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return multiplies


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)


# The attributes of the ConvTranspose that upsampling_as_conv rewrites (absent ones take these defaults).
_PLAIN_UPSAMPLING = {
    "kernel_shape": [2, 2], "strides": [2, 2], "group": 1, "dilations": [1, 1], "pads": [0, 0, 0, 0],
    "output_padding": [0, 0], "auto_pad": b"NOTSET",
}


def upsampling_as_conv(graph_model: onnx.ModelProto) -> list[str]:
    """Rewrite each 2x2, stride-2 ConvTranspose (the mask predictor's upsampling, Mask R-CNN section 3)
    as a 1x1 convolution to 4x the channels, then its ReLU, then DepthToSpace; returns the new
    convolutions' names. The strides equal the kernel, so every output pixel has one input pixel: output
    channel o at offset (i, j) of each 2x2 block is input channel 4o + 2i + j of the 1x1 convolution (CRD
    order). ONNX Runtime's CPU provider has no int8 ConvTranspose; it has an int8 Conv.
    """
    graph = graph_model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replace: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type != "ConvTranspose" or len(node.input) != 3 or not set(node.input[1:]) <= set(inits):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if any(attrs.get(key, value) != value for key, value in _PLAIN_UPSAMPLING.items()) or set(attrs) - set(
            _PLAIN_UPSAMPLING
        ):
            continue
        weight = onnx.numpy_helper.to_array(inits[node.input[1]])
        if weight.shape[2:] != (2, 2):
            continue
        bias = onnx.numpy_helper.to_array(inits[node.input[2]])
        channels = weight.shape[1]
        w_name, b_name = f"{node.input[1]}__as_conv1x1", f"{node.input[2]}__as_conv1x1"
        graph.initializer.append(onnx.numpy_helper.from_array(
            np.ascontiguousarray(weight.transpose(1, 2, 3, 0).reshape(4 * channels, -1, 1, 1)), w_name))
        graph.initializer.append(onnx.numpy_helper.from_array(np.repeat(bias, 4), b_name))
        uses = consumers.get(node.output[0], [])
        relu = uses[0] if len(uses) == 1 and uses[0].op_type == "Relu" else None
        result = relu.output[0] if relu else node.output[0]
        conv = onnx.helper.make_node("Conv", [node.input[0], w_name, b_name], [f"{result}__blocks"],
                                     name=f"{node.name}__as_conv1x1", kernel_shape=[1, 1])
        chain = [conv]
        if relu:
            chain.append(onnx.helper.make_node("Relu", [conv.output[0]], [f"{result}__blocks_relu"],
                                               name=f"{relu.name}__blocks"))
            replace[relu.name] = []
        chain.append(onnx.helper.make_node("DepthToSpace", [chain[-1].output[0]], [result],
                                           name=f"{node.name}__depth_to_space", blocksize=2, mode="CRD"))
        replace[node.name] = chain
    nodes = [new for node in graph.node for new in replace.get(node.name, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return [chain[0].name for name, chain in replace.items() if chain]


def _is_bias(graph: onnx.GraphProto, where: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """``Where(inside, 0, most negative float)``: the additive mask."""
    inside, outside = (_constant(graph, name, producer) for name in where.input[1:])
    return inside is not None and outside is not None and (inside == 0).all() and (outside <= -1e38).all()


def _relu_after(add: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    uses = consumers.get(add.output[0], [])
    return add.op_type == "Add" and len(uses) == 1 and uses[0].op_type == "Relu"


def image_files(folder: Path) -> list[Path]:
    """The JPEG and PNG files under ``folder`` (recursively), in sorted order."""
    if not folder.is_dir():
        raise QuantizeError(f"{folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise QuantizeError(f"{path}: not a readable image ({exc})") from None


class ImageFeeds(CalibrationDataReader):
    """Calibration inputs, the graph's own: one image per run, resized by the model's own policy and padded
    as the graph takes it (contract.pad_batch), with the file's default score threshold, so every
    activation of the graph, the mask head's included, sees the values it sees in service."""

    def __init__(self, files: Sequence[Path], metadata: GraphMetadata) -> None:
        self.files = iter(files)
        self.metadata = metadata

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self.files, None)
        if path is None:
            return None
        images, sizes = graph_inputs(read_rgb(path), self.metadata)
        threshold = np.array([self.metadata.score_threshold], dtype=np.float32)
        return dict(zip(INPUT_NAMES, (images, sizes, threshold), strict=True))


def graph_inputs(image: np.ndarray, metadata: GraphMetadata) -> tuple[np.ndarray, np.ndarray]:
    resized = resize_by_policy(image, metadata.min_size, metadata.max_size)
    return pad_batch([resized.chw], metadata.size_divisibility)


def quantize_graph(
    float_model: onnx.ModelProto, calibration: Sequence[Path], recipe: Recipe, out: Path, metadata: GraphMetadata
) -> None:
    """Quantize ``float_model`` (float32 weights; rewritten in place) by ``recipe`` into ``out``."""
    if recipe.int8_masks:
        masks_as_multiplies(float_model)
    if "mask_predictor" in recipe.families and "ConvTranspose" in recipe.op_types:
        upsampling_as_conv(float_model)
    nodes = int8_nodes(float_model, recipe)
    if not nodes:
        raise QuantizeError(f"recipe {recipe.name!r} selects no node of this graph")
    with tempfile.TemporaryDirectory(prefix="quantize.") as tmp:
        source = Path(tmp) / "float32.onnx"
        onnx.save(float_model, str(source))
        quantize_static(
            str(source),
            str(out),
            ImageFeeds(calibration, metadata),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.op_types + FEATURE_OPS * recipe.int8_masks),
            nodes_to_quantize=nodes,
            per_channel=True,
            activation_type=QuantType.QUInt8,  # u8 x s8 is the VNNI instruction's native form
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATE_METHOD,
        )


def finalize(out: Path, props: dict[str, str], fp16_names: Sequence[str]) -> None:
    """The input's metadata (with the quantization entry) and its float16 storage of the float weights.
    The exporter's annotations of each node (PyTorch stack traces and scopes, a fifth of a small model's
    file) are dropped: nothing reads them, and the nodes they describe are rewritten anyway."""
    graph_model = onnx.load(str(out))
    check_scales(graph_model)
    for node in graph_model.graph.node:
        del node.metadata_props[:]
    del graph_model.metadata_props[:]
    for key, value in props.items():
        graph_model.metadata_props.add(key=key, value=value)
    store_weights_fp16(graph_model, names=set(fp16_names))
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(out))


def check_scales(graph_model: onnx.ModelProto) -> None:
    """Every quantization scale finite and positive: a tensor that calibration never saw a value of (one
    that was empty on every calibration image) gets none, and must not reach a file."""
    inits = {init.name: init for init in graph_model.graph.initializer}
    for node in graph_model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise QuantizeError(f"no calibrated range for {node.input[0]} (empty on every calibration image)")


@dataclass
class Agreement:
    """How the int8 graph's detections agree with the float32 graph's on held-out images."""

    images: int
    reference: int  # float32 detections scoring >= the verification threshold
    matched: int
    mask_iou: float  # mean over matched pairs
    mean_score_error: float
    max_score_error: float

    @property
    def matched_fraction(self) -> float:
        return self.matched / self.reference if self.reference else 0.0

    def ok(self, min_matched: float = MIN_MATCHED, min_mask_iou: float = MIN_MASK_IOU) -> bool:
        return self.reference > 0 and self.matched_fraction >= min_matched and self.mask_iou >= min_mask_iou

    def __str__(self) -> str:
        return (
            f"{self.images} held-out images: {self.matched}/{self.reference} float32 detections matched "
            f"({100 * self.matched_fraction:.1f}%, same label, box IoU >= {MATCH_IOU}), mean mask IoU "
            f"{self.mask_iou:.4f}, score error mean {self.mean_score_error:.4f} max {self.max_score_error:.4f}"
        )


def match_detections(reference: Prediction, candidate: Prediction, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (reference rows, candidate rows): each reference detection scoring >= ``threshold``, best
    first, takes the unmatched candidate of its label with the highest box IoU, if that is >= MATCH_IOU.
    Candidates of any score may match, so a detection whose score crossed the threshold still counts."""
    rows = np.flatnonzero(reference.scores >= threshold)
    iou = box_iou(reference.boxes[rows], candidate.boxes)
    iou[reference.labels[rows][:, None] != candidate.labels[None, :]] = 0.0
    pairs = []
    for r in range(len(rows)):  # rows are sorted by score; greedy, as COCO's matching is
        c = int(np.argmax(iou[r])) if iou.shape[1] else 0
        if iou.shape[1] and iou[r, c] >= MATCH_IOU:
            pairs.append((rows[r], c))
            iou[:, c] = 0.0
    matched = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return matched[:, 0], matched[:, 1]


def pasted_mask_iou(
    reference: Prediction, ref_rows: np.ndarray, candidate: Prediction, cand_rows: np.ndarray
) -> np.ndarray:
    """Mask IoU of each pair, the masks pasted into the image and binarized by the service's post-processing."""
    def rles(pred: Prediction, rows: np.ndarray) -> list:
        return encode_masks(pred.masks[rows], pred.boxes[rows], pred.image_size, polygons=False).rles

    if not len(ref_rows):
        return np.zeros(0)
    return np.diag(mask_utils.iou(rles(reference, ref_rows), rles(candidate, cand_rows), [0] * len(cand_rows)))


def predict_each(model: OnnxModel, files: Sequence[Path]) -> list[Prediction]:
    """``model`` on each image alone, at the file's default score threshold."""
    return [model.predict([read_rgb(path)])[0] for path in files]


def compare_graphs(
    references: Sequence[Prediction], candidate: Sequence[Prediction], threshold: float = VERIFY_SCORE_THRESHOLD
) -> Agreement:
    """The float32 graph's predictions and the int8 graph's on the same images, compared."""
    ious, score_errors = [], []
    for ref, cand in zip(references, candidate, strict=True):
        ref_rows, cand_rows = match_detections(ref, cand, threshold)
        ious.append(pasted_mask_iou(ref, ref_rows, cand, cand_rows))
        score_errors.append(np.abs(ref.scores[ref_rows] - cand.scores[cand_rows]))
    ious_all, errors = np.concatenate(ious), np.concatenate(score_errors)
    return Agreement(
        images=len(references),
        reference=confident(references, threshold),
        matched=len(ious_all),
        mask_iou=float(ious_all.mean()) if len(ious_all) else 0.0,
        mean_score_error=float(errors.mean()) if len(errors) else 0.0,
        max_score_error=float(errors.max()) if len(errors) else 0.0,
    )


def confident(predictions: Sequence[Prediction], threshold: float) -> int:
    return sum(int((pred.scores >= threshold).sum()) for pred in predictions)


@dataclass(frozen=True)
class Bar:
    """What verification must reach (defaults: the documented bar)."""

    min_matched: float = MIN_MATCHED
    min_mask_iou: float = MIN_MASK_IOU
    score_threshold: float = VERIFY_SCORE_THRESHOLD


def split_images(folder: Path, num_calibration: int, num_verification: int) -> tuple[list[Path], list[Path]]:
    """The first ``num_calibration`` images of ``folder`` calibrate; the next ``num_verification`` verify."""
    files = image_files(folder)
    if num_calibration < 1 or num_verification < 1:
        raise QuantizeError("need at least 1 calibration and 1 verification image")
    if len(files) < num_calibration + num_verification:
        raise QuantizeError(
            f"{folder}: {len(files)} JPEG/PNG images, need {num_calibration} for calibration and "
            f"{num_verification} more, held out, for verification"
        )
    return files[:num_calibration], files[num_calibration : num_calibration + num_verification]


def read_graph(path: Path) -> tuple[onnx.ModelProto, dict[str, str], GraphMetadata]:
    if not path.is_file():
        raise QuantizeError(f"{path}: model file not found")
    try:
        graph_model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise QuantizeError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in graph_model.metadata_props}
    try:
        metadata = GraphMetadata.from_props(props, path.stem)
    except MetadataError as exc:
        raise QuantizeError(f"{path}: {exc}") from None
    if metadata.quantization:
        raise QuantizeError(f"{path}: already quantized ({json.loads(metadata.quantization)['recipe']})")
    return graph_model, props, metadata


def quantize_model(
    model: Path,
    calibration: Path,
    out: Path,
    recipe: Recipe,
    num_images: int = DEFAULT_CALIBRATION_IMAGES,
    num_verification: int = DEFAULT_VERIFICATION_IMAGES,
    bar: Bar = Bar(),  # noqa: B008 (frozen)
    log: Callable[[str], None] = print,
) -> Agreement:
    """Quantize ``model`` by ``recipe``, calibrated on images of ``calibration``, verify it on held-out ones,
    and write ``out`` only if it reaches ``bar``."""
    graph_model, props, metadata = read_graph(model)
    calib_files, verify_files = split_images(calibration, num_images, num_verification)
    references = predict_each(OnnxModel(model), verify_files)  # before the long part: is there anything to verify?
    if confident(references, bar.score_threshold) == 0:
        raise QuantizeError(
            f"nothing to verify: the float32 graph has no detection scoring >= {bar.score_threshold} on the "
            f"{len(verify_files)} held-out images"
        )
    fp16_names = load_weights_fp32(graph_model)
    entry = json.dumps(recipe.describe(len(calib_files)))
    out_props = props | dataclasses.replace(metadata, quantization=entry).to_props()
    with atomic_path(out) as tmp:
        log(f"quantize: recipe {recipe.name} ({', '.join(recipe.families)} int8), "
            f"{CALIBRATE_METHOD.name} calibration on {len(calib_files)} images of {calibration}")
        quantize_graph(graph_model, calib_files, recipe, tmp, metadata)
        finalize(tmp, out_props, fp16_names)
        log(f"verify: int8 vs float32 on {len(verify_files)} held-out images")
        agreement = compare_graphs(references, predict_each(OnnxModel(tmp), verify_files), bar.score_threshold)
        log(f"  {agreement}")
        if not agreement.ok(bar.min_matched, bar.min_mask_iou):
            raise QuantizeError(
                f"int8 graph below the bar (matched >= {100 * bar.min_matched:.0f}%, mask IoU >= "
                f"{bar.min_mask_iou}): {agreement}"
            )
    return agreement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="a float graph exported by python -m export")
    p.add_argument("--calibration", required=True, type=Path, help="folder of JPEG/PNG images (searched recursively)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-images", type=int, default=DEFAULT_CALIBRATION_IMAGES, help="calibration images")
    p.add_argument("--num-verify", type=int, default=DEFAULT_VERIFICATION_IMAGES,
                   help="held-out images (the ones after the calibration images) to verify on")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE)
    p.add_argument("--min-matched", type=float, default=MIN_MATCHED,
                   help="share of confident float32 detections the int8 graph must match")
    p.add_argument("--min-mask-iou", type=float, default=MIN_MASK_IOU, help="mean mask IoU of the matched ones")
    p.add_argument("--verify-threshold", type=float, default=VERIFY_SCORE_THRESHOLD,
                   help="float32 detections scoring at least this are compared")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The quantizer logs advice on every run (pre-processing, which this graph does not need) and its
    # calibration sessions warn that the optional input has a default; keep the CLI's output to its own lines.
    logging.getLogger().setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    started = time.perf_counter()
    bar = Bar(args.min_matched, args.min_mask_iou, args.verify_threshold)
    try:
        agreement = quantize_model(
            args.model, args.calibration, args.out, RECIPES[args.recipe], args.num_images, args.num_verify, bar
        )
    except (QuantizeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size_mb = args.out.stat().st_size / 2**20
    print(f"done: {args.out} ({size_mb:.1f} MiB, from {args.model.stat().st_size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - started:.0f} s; {100 * agreement.matched_fraction:.1f}% matched, "
          f"mask IoU {agreement.mask_iou:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
