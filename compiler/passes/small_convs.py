"""Convolutions with few output channels as ConvTranspose.

ONNX Runtime CPU runs 2D convolutions in a blocked channel layout (NCHWc, 8 or 16 channels a block) and pads
the output channels up to a block, so the last convolution of a UNet (C -> 3 pixel or 4 latent channels) costs
as much as one with 16 outputs. The same convolution written as a ConvTranspose (stride 1) is one GEMM of
[C_out * kh * kw, C_in] x [C_in, H * W] plus a col2im sum, whose cost follows C_out: 3.3x faster at C 32 -> 3
(batch 8, 16x16), 4.3x at 128 -> 3, 1.5-1.9x at C_out 8, even or slower at 16 (AVX-512,
scripts/conv_transpose_bench.py). With 8-channel blocks (AVX2) C_out 8 is not padded, hence the threshold 4.
The identity (stride 1, dilation 1):

    Conv(x, W, pads=p)[o, i, j] = ConvTranspose(x, Wt, pads=k - 1 - p)[o, i, j],
    Wt[c, o, u, v] = W[o, c, kh - 1 - u, kw - 1 - v]

(the transposed weights are the same bytes in another order; the sums differ by re-association only).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import DEFAULT_DOMAINS, attributes, name_factory, names_in_use, prune_initializers

TRANSPOSE_MAX_OUT_CHANNELS = 4  # at most half the smallest NCHWc block (8 channels, AVX2)


def small_convs_to_transposed(graph: onnx.GraphProto, max_out: int = TRANSPOSE_MAX_OUT_CHANNELS) -> int:
    """Replace each 2D Conv with at most `max_out` output channels by the equal ConvTranspose, in place.

    Preconditions (each checked; other convolutions are left alone): weights a float32 initializer of shape
    [C_out, C_in, kh, kw], group 1, stride 1, dilation 1, explicit symmetric or VALID padding no larger than
    kernel - 1 (ONNX Runtime CUDA runs an asymmetric ConvTranspose on the CPU). The node keeps its name and
    output; a weight read by several convolutions is transposed once; original weights nothing reads any more
    are dropped. Returns the number of nodes replaced."""
    inits = {t.name: t for t in graph.initializer}
    fresh = name_factory(names_in_use(graph), "iia/conv")
    replaced, new_inits, old, transposed = 0, [], set(), {}
    for k, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 4 or weight.dims[0] > max_out:
            continue
        at = attributes(node)
        kernel = list(weight.dims[2:])
        pads = list(at.get("pads", [0, 0, 0, 0]))
        if (at.get("group", 1) != 1 or any(s != 1 for s in at.get("strides", [1, 1]))
                or any(d != 1 for d in at.get("dilations", [1, 1]))
                or at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
                or list(at.get("kernel_shape", kernel)) != kernel or len(pads) != 4
                or any(not 0 <= p <= kernel[j % 2] - 1 for j, p in enumerate(pads))
                or pads[:2] != pads[2:]):  # asymmetric: ONNX Runtime CUDA runs such a ConvTranspose on the CPU
            continue
        name = transposed.get(weight.name)
        if name is None:  # a weight read by several convolutions is transposed once
            w = numpy_helper.to_array(weight)
            name = transposed[weight.name] = fresh("transposed_weight")
            flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # Wt[c, o, u, v]
            new_inits.append(numpy_helper.from_array(flipped, name))
        graph.node[k].CopyFrom(helper.make_node(
            "ConvTranspose", [node.input[0], name, *node.input[2:]], list(node.output), name=node.name or fresh("node"),
            kernel_shape=kernel, pads=[kernel[j % 2] - 1 - p for j, p in enumerate(pads)]))
        old.add(weight.name)
        replaced += 1
    if replaced:
        prune_initializers(graph, old, new_inits)
    return replaced
