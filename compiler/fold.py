"""Fold the denoiser's sigma-only subgraph (c_skip/c_out/c_in, the noise embedding and its MLP) per call site.

At each call site sigma is a baked constant, so every value that depends on sigma and on constants only is a
constant too. We evaluate those values once per distinct sigma with ONNX Runtime (at batch 1 and 2, to tell
batch-shaped values from batch-free ones) and substitute them: batch-free values as constants, batch-shaped
values as a [1, ...] constant broadcast to the batch with Expand. Values over `size_limit` bytes are left
to be computed (a weight scaled by a sigma-dependent factor would otherwise be duplicated per call site).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from iia.runtime.contract import DENOISER_SIGMA

SIZE_LIMIT = 64 * 1024
BATCH_OPS = ("Shape", "Size")


@dataclass
class FoldPlan:
    foldable_nodes: set[int] = field(default_factory=set)  # indices into graph.node, removed at call sites
    values: dict[float, dict[str, tuple[np.ndarray, bool]]] = field(default_factory=dict)  # sigma -> name -> (row, batched)


def sigma_only_nodes(graph: onnx.GraphProto, sigma: str = DENOISER_SIGMA) -> tuple[set[int], list[str]]:
    """Nodes computing sigma-dependent values from sigma and constants only; and the boundary values."""
    constant = {t.name for t in graph.initializer} | {""}
    depends, foldable_values, nodes = {sigma}, {sigma}, set()
    for k, node in enumerate(graph.node):
        inputs = list(node.input)
        if node.op_type in BATCH_OPS:  # Shape/Size of a sigma value is the batch size: not a constant
            continue
        if all(i in foldable_values or i in constant for i in inputs):
            if any(i in depends for i in inputs):
                nodes.add(k)
                depends.update(node.output)
                foldable_values.update(node.output)
            else:  # Constant nodes and weight-only arithmetic: constants, left to the graph (not folded)
                constant.update(node.output)
    consumed_outside = set()
    for k, node in enumerate(graph.node):
        if k not in nodes:
            consumed_outside.update(i for i in node.input if i in depends and i != sigma)
    consumed_outside.update(o.name for o in graph.output if o.name in depends)
    return nodes, sorted(consumed_outside)


def _subgraph_model(model: onnx.ModelProto, nodes: set[int], outputs: list[str]) -> onnx.ModelProto:
    g = model.graph
    keep_consts = [n for k, n in enumerate(g.node) if k not in nodes and n.op_type == "Constant"]
    sub_nodes = keep_consts + [g.node[k] for k in sorted(nodes)]
    sigma = next(i for i in g.input if i.name == DENOISER_SIGMA)
    outs = [helper.make_empty_tensor_value_info(name) for name in outputs]
    used = {i for n in sub_nodes for i in n.input}
    graph = helper.make_graph(sub_nodes, "sigma_only", [sigma], outs,
                              initializer=[t for t in g.initializer if t.name in used])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def plan_folding(denoiser_model: onnx.ModelProto, sigmas: list[float], size_limit: int = SIZE_LIMIT) -> FoldPlan:
    """Evaluate the sigma-only values at each sigma; an empty plan when nothing can be folded."""
    import onnxruntime as ort

    nodes, boundary = sigma_only_nodes(denoiser_model.graph)
    if not nodes or not boundary:
        return FoldPlan()
    sub = _subgraph_model(denoiser_model, nodes, boundary)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the constant subgraph leaves the denoiser's Constant nodes unused
    sess = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    plan = FoldPlan(nodes)
    for s in sorted(set(sigmas)):
        one = sess.run(boundary, {DENOISER_SIGMA: np.array([s], np.float32)})
        two = sess.run(boundary, {DENOISER_SIGMA: np.array([s, s], np.float32)})
        values = {}
        for name, a, b in zip(boundary, one, two):
            batched = a.ndim > 0 and b.ndim == a.ndim and a.shape[0] == 1 and b.shape[0] == 2 and b.shape[1:] == a.shape[1:]
            same = np.array_equal(np.broadcast_to(a, b.shape), b) if batched else (a.shape == b.shape and np.array_equal(a, b))
            if not same:
                return FoldPlan()  # a value that changes with the batch size: fold nothing
            if a.nbytes > size_limit:
                return FoldPlan()
            values[name] = (a, batched)
        plan.values[s] = values
    return plan


# ------------------------------------------------------------------------------------------------------
# Weight preprocessing: values computed from the stored weights alone (magnitude-preserving / weight
# normalisation, gains multiplied into weights, filters tiled to the channel count) are the same on every
# call, so they are computed ONCE here and stored in place of the raw weights.

NONDETERMINISTIC_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                        "Bernoulli")


def weight_only_nodes(graph: onnx.GraphProto) -> set[int]:
    """Nodes whose inputs are all stored weights or outputs of such nodes (Constant nodes themselves excluded)."""
    constant = {t.name for t in graph.initializer} | {""}
    nodes = set()
    for k, node in enumerate(graph.node):
        if node.op_type == "Constant":
            constant.update(node.output)
        elif (node.input and node.op_type not in NONDETERMINISTIC_OPS and node.domain in ("", "ai.onnx")
              and all(i in constant for i in node.input)):
            nodes.add(k)
            constant.update(node.output)
    return nodes


def _boundary(graph: onnx.GraphProto, nodes: set[int]) -> list[str]:
    produced = {o for k in nodes for o in graph.node[k].output}
    used = {i for k, node in enumerate(graph.node) if k not in nodes for i in node.input}
    used.update(o.name for o in graph.output)
    return sorted(produced & used)


def _sources(graph: onnx.GraphProto, nodes: set[int]) -> dict[str, tuple[set[str], set[int]]]:
    """For each value produced by `nodes`: (initializers it is computed from, the nodes computing it)."""
    init = {t.name for t in graph.initializer}
    origin: dict[str, tuple[set[str], set[int]]] = {}
    for k in sorted(nodes):
        node = graph.node[k]
        inits, deps = set(), {k}
        for i in node.input:
            if i in init:
                inits.add(i)
            elif i in origin:
                inits |= origin[i][0]
                deps |= origin[i][1]
        for o in node.output:
            origin[o] = (inits, deps)
    return origin


def fold_weight_preprocessing(model: onnx.ModelProto, size_limit: int = SIZE_LIMIT) -> dict:
    """Replace every weight-only subgraph by its values (computed once with ONNX Runtime), in place.

    A value is folded when it is no larger than the weights it is computed from (or than `size_limit`
    bytes): folding then never stores more than the raw weights did. Raw weights nothing reads any more are
    dropped. Returns {"folded_nodes", "folded_values", "bytes_before", "bytes_after"}.
    """
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = model.graph
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in graph.initializer}
    before = sum(sizes.values())
    nodes = weight_only_nodes(graph)
    values: dict[str, np.ndarray] = {}
    for _ in range(8):  # shrink the set until every boundary value passes the size rule
        boundary = _boundary(graph, nodes)
        if not nodes or not boundary:
            return {"folded_nodes": 0, "folded_values": 0, "bytes_before": before, "bytes_after": before}
        keep_consts = [n for n in graph.node if n.op_type == "Constant"]
        sub_nodes = keep_consts + [graph.node[k] for k in sorted(nodes)]
        used = {i for n in sub_nodes for i in n.input}
        sub = helper.make_model(
            helper.make_graph(sub_nodes, "weights_only", [], [helper.make_empty_tensor_value_info(b) for b in boundary],
                              initializer=[t for t in graph.initializer if t.name in used]),
            opset_imports=list(model.opset_import))
        sub.ir_version = model.ir_version
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = dict(zip(boundary, sess.run(boundary, {})))
        origin = _sources(graph, nodes)
        rejected = [b for b in boundary
                    if values[b].nbytes > max(size_limit, sum(sizes[i] for i in origin[b][0]))]
        if not rejected:
            break
        for b in rejected:
            nodes -= origin[b][1]
    else:
        return {"folded_nodes": 0, "folded_values": 0, "bytes_before": before, "bytes_after": before}
    kept = [n for k, n in enumerate(graph.node) if k not in nodes]
    del graph.node[:]
    graph.node.extend(kept)
    new = [numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in values.items()]
    still_read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    survivors = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(survivors + new)
    after = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
    return {"folded_nodes": len(nodes), "folded_values": len(new), "bytes_before": before, "bytes_after": after}
