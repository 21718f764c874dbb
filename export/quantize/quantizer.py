"""An exported float graph to a verified int8 file: read it, rewrite it by the recipe, quantize it with ONNX
Runtime's ``quantize_static`` (QDQ, int8 weights per output channel, uint8 activations), give it the input's
metadata with the quantization entry, verify it against the float32 graph, and write it only if it reaches
the bar."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from contract import GraphMetadata, MetadataError
from export.exporter import load_weights_fp32, store_weights_fp16
from export.quantize import QuantizeError
from export.quantize.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_VERIFICATION_IMAGES,
    ImageFeeds,
    split_images,
)
from export.quantize.checking import Agreement, VerificationBar, check_scales, compare_graphs, confident, predict_each
from export.quantize.recipes import CALIBRATE_METHOD, FEATURE_OPS, Recipe, int8_nodes
from export.quantize.rewrites import masks_as_multiplies, upsampling_as_conv
from model.files import atomic_path
from service.core.runtime import OnnxModel


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
    bar: VerificationBar = VerificationBar(),  # noqa: B008 (frozen)
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
