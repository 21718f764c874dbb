"""Graph rewrites, exact in float, that let ONNX Runtime keep activations int8 from one weighted layer to the
next: the padding masks as multiplies by 0/1 masks (``masks_as_multiplies``), and the mask predictor's
ConvTranspose, which ONNX Runtime's CPU provider cannot run in int8, as a 1x1 convolution and a
DepthToSpace (``upsampling_as_conv``)."""

from __future__ import annotations

import numpy as np
import onnx


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each tensor's consuming nodes, in graph order."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


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
    consumers = consumers_of(graph)
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
    consumers = consumers_of(graph)
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
    return inside is not None and outside is not None and bool((inside == 0).all() and (outside <= -1e38).all())


def _relu_after(add: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    uses = consumers.get(add.output[0], [])
    return add.op_type == "Add" and len(uses) == 1 and uses[0].op_type == "Relu"
