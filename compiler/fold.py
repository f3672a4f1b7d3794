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
