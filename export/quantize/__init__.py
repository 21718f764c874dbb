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

The package: recipes.py (node families and recipes), rewrites.py (the two rewrites), calibration.py (the
images), checking.py (the verification and its bar), quantizer.py (the whole conversion), __main__.py (the
CLI: ``python -m export.quantize --model IN.onnx --calibration DIR --out OUT.onnx [--num-images N]``).
"""

from commandline import CommandError


class QuantizeError(CommandError):
    """A quantization that must not produce a file; the message is one readable line (exit status 1)."""
