"""Constant per-channel affines as one-pass BatchNormalization.

GroupNorm's `x * gamma + beta` with stored gamma/beta (no conditioning to merge it with: what the affine-chain
pass left) is two full-tensor passes as Mul + Add. An inference-mode BatchNormalization with mean 0,
variance 1, epsilon 0 computes exactly `x * gamma + beta` in ONE pass:

    BN(x)[n, c, ...] = (x - 0) / sqrt(1 + 0) * gamma[c] + beta[c]

Preconditions (each checked): gamma and beta float32 initializers that broadcast against x per channel only
([C], [C, 1, 1], [1, C, 1, 1] or one value), the product read by the Add only, and x already of the output's
shape (the Add does not broadcast x). Exported graphs leave the shapes around Reshape unknown to static
inference, so they are learned from one ONNX Runtime run on example inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import (DEFAULT_DOMAINS, name_factory, names_in_use, producers, prune_initializers, quiet_session,
                     read_counts, replace_nodes)


def probe_shapes(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the named values in one ONNX Runtime run of `model` on `feeds`. The values are added to the
    graph's outputs for the run and removed again (no copy of the weights: a full-size model's are GBs)."""
    have = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(names))
    outputs = len(model.graph.output)
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in wanted if n not in have)
    try:
        with quiet_session(model, optimized=False) as session:
            outs = session.run(wanted, feeds)
    finally:
        del model.graph.output[outputs:]
    return {n: tuple(a.shape) for n, a in zip(wanted, outs)}


def _per_channel(value, shape: tuple[int, ...]):
    """`value` (numpy) as a [C] vector when broadcasting it against `shape` ([N, C, ...]) scales channels only."""
    rank = len(shape)
    if value.ndim > rank or rank < 2:
        return None
    padded = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if padded.shape[0] != 1 or any(d != 1 for d in padded.shape[2:]) or padded.shape[1] not in (1, shape[1]):
        return None
    return np.ascontiguousarray(np.broadcast_to(padded.reshape(-1), (shape[1],)), dtype=np.float32)


def _affine_pairs(graph: onnx.GraphProto, inits: dict) -> list[tuple[int, int, str, str, str]]:
    """(Mul index, Add index, x, gamma, beta) of every `Add(Mul(x, gamma), beta)` with stored float32 gamma and
    beta and the product read once."""
    counts = read_counts(graph)
    producer = producers(graph)
    plain = lambda n: n.domain in DEFAULT_DOMAINS and not n.attribute and len(n.input) == 2
    pairs = []
    for k, add in enumerate(graph.node):
        if add.op_type != "Add" or not plain(add):
            continue
        for mul_out, beta in (add.input, add.input[::-1]):
            m = producer.get(mul_out)
            if m is None or beta not in inits or counts.get(mul_out) != 1 or graph.node[m].op_type != "Mul":
                continue
            mul = graph.node[m]
            if not plain(mul) or sum(i in inits for i in mul.input) != 1:
                continue
            x, gamma = (mul.input[1], mul.input[0]) if mul.input[0] in inits else tuple(mul.input)
            if all(inits[n].data_type == TensorProto.FLOAT for n in (gamma, beta)):
                pairs.append((m, k, x, gamma, beta))
            break
    return pairs


def affine_to_batchnorm(model: onnx.ModelProto, feeds: dict) -> int:
    """Replace each `Add(Mul(x, gamma), beta)` meeting the preconditions above by BatchNormalization(x, gamma,
    beta, 0, 1, epsilon=0), in place. `feeds`: one valid input of the model, to learn the shapes. The Add's
    output keeps its name; gamma/beta tensors nothing else reads are dropped. Returns the number of nodes
    removed."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    pairs = _affine_pairs(graph, inits)
    if not pairs:
        return 0
    shapes = probe_shapes(model, [n for m, k, x, *_ in pairs for n in (x, graph.node[k].output[0])], feeds)
    fresh = name_factory(names_in_use(graph), "iia/bn", prefix="affine_")
    replace, removed, new_inits, moments = {}, set(), [], {}
    for m, k, x, gamma, beta in pairs:
        out = graph.node[k].output[0]
        if shapes[x] != shapes[out]:
            continue
        scale = _per_channel(numpy_helper.to_array(inits[gamma]), shapes[x])
        bias = _per_channel(numpy_helper.to_array(inits[beta]), shapes[x])
        if scale is None or bias is None:
            continue
        names = [fresh("scale"), fresh("bias")]
        new_inits += [numpy_helper.from_array(scale, names[0]), numpy_helper.from_array(bias, names[1])]
        if len(scale) not in moments:  # mean 0, variance 1: one pair per channel count
            moments[len(scale)] = [fresh("mean"), fresh("var")]
            new_inits += [numpy_helper.from_array(np.zeros_like(scale), moments[len(scale)][0]),
                          numpy_helper.from_array(np.ones_like(scale), moments[len(scale)][1])]
        replace[k] = [helper.make_node("BatchNormalization", [x, *names, *moments[len(scale)]], [out],
                                       name=fresh("node"), epsilon=0.0)]
        removed.add(m)
    if not replace:
        return 0
    replace_nodes(graph, replace, removed)
    prune_initializers(graph, {p[3] for p in pairs} | {p[4] for p in pairs}, new_inits)
    return len(removed)


def example_feeds(model: onnx.ModelProto, batch: int = 2) -> dict:
    """One valid input of a denoiser graph: x standard normal, sigma ones, class labels zeros (symbolic
    dimensions set to `batch`)."""
    rng, feeds = np.random.default_rng(0), {}
    for i in model.graph.input:
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        if t.elem_type == TensorProto.FLOAT:
            feeds[i.name] = (rng.standard_normal(shape) if len(shape) > 1 else np.ones(shape)).astype(np.float32)
        else:
            feeds[i.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds
