"""Which nodes of the graph become int8: the graph's nodes sorted into families (geometry, and the weighted
layers by the module they come from), and the recipes that name the families they quantize. The recipes'
figures (speed on R-50-FPN, AP on the demo model) are in benchmarks/RESULTS.md; they chose DEFAULT_RECIPE."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnxruntime.quantization import CalibrationMethod

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
