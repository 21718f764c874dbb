"""ONNX translations of the project's custom ops: standard ONNX nodes only (no custom domain), so
ONNX Runtime (CPU and CUDA) and TensorRT run the exported file as it is."""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript import opset18 as op

# RoIAlign's coordinate modes: aligned=True is half-pixel (Detectron2's ROIAlignV2); aligned=False is
# torchvision's legacy mode, which ONNX calls output_half_pixel.
_COORDINATE_MODE = {True: "half_pixel", False: "output_half_pixel"}


def roi_align(
    features, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool
):
    """``maskrcnn::roi_align`` -> ONNX ``RoiAlign`` (opset 16 semantics); rois [K, 5] split into index and box.
    ONNX's ``sampling_ratio=0`` is the op's adaptive sampling (any ``sampling_ratio <= 0``)."""
    batch_index = op.Cast(op.Reshape(op.Slice(rois, [0], [1], [1]), [-1]), to=ir.DataType.INT64)
    boxes = op.Slice(rois, [1], [5], [1])
    return op.RoiAlign(
        features,
        boxes,
        batch_index,
        coordinate_transformation_mode=_COORDINATE_MODE[bool(aligned)],
        mode="avg",
        output_height=pooled_height,
        output_width=pooled_width,
        sampling_ratio=max(sampling_ratio, 0),
        spatial_scale=spatial_scale,
    )


def multiclass_nms(boxes, scores, max_output_per_class: int, iou_threshold: float, score_threshold: float):
    """``maskrcnn::multiclass_nms`` -> ONNX ``NonMaxSuppression``, always with a bounded output count."""
    return op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_ints=[max_output_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
        center_point_box=0,
    )


def translation_table() -> dict:
    import model.nms  # noqa: F401  (registers the ops)
    import model.roi_align  # noqa: F401

    return {
        torch.ops.maskrcnn.roi_align.default: roi_align,
        torch.ops.maskrcnn.multiclass_nms.default: multiclass_nms,
    }
