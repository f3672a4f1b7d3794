"""Weight preprocessing folded into the stored weights (at export: `denoiser.onnx` itself changes).

Weight preprocessing: values computed from the stored weights alone (magnitude-preserving / weight
normalisation, gains multiplied into weights, filters tiled to the channel count) are the same on every
call, so they are computed ONCE here and stored in place of the raw weights.

The identity is evaluation itself: a node whose inputs are all stored weights (or outputs of such nodes) has
the same output at every call, so replacing its output by the computed tensor changes nothing. Preconditions:
deterministic default-domain ops only (random generators are never evaluated); a value is stored only when it
is no larger than the weights it is computed from (or SIZE_LIMIT bytes), so folding never stores more than the
raw weights did.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import DEFAULT_DOMAINS, prune_initializers, quiet_session, replace_nodes, submodel

SIZE_LIMIT = 64 * 1024  # bytes a folded value may take beyond the weights it replaces
# weights evaluated per ONNX Runtime session: a full-size model's weights are GBs, and a session of all of them
# holds them three times over (the submodel, its serialised bytes, the session's own copy)
CHUNK_BYTES = 128 * 1024**2

NONDETERMINISTIC_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                        "Bernoulli")


def weight_only_nodes(graph: onnx.GraphProto) -> set[int]:
    """Nodes whose inputs are all stored weights or outputs of such nodes (Constant nodes themselves excluded)."""
    constant = {t.name for t in graph.initializer} | {""}
    nodes = set()
    for k, node in enumerate(graph.node):
        if node.op_type == "Constant":
            constant.update(node.output)
        elif (node.input and node.op_type not in NONDETERMINISTIC_OPS and node.domain in DEFAULT_DOMAINS
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
    graph = model.graph
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in graph.initializer}
    before = sum(sizes.values())
    nodes = weight_only_nodes(graph)
    values: dict[str, np.ndarray] = {}
    for _ in range(8):  # shrink the set until every boundary value passes the size rule
        boundary = _boundary(graph, nodes)
        if not nodes or not boundary:
            return {"folded_nodes": 0, "folded_values": 0, "bytes_before": before, "bytes_after": before}
        origin = _sources(graph, nodes)
        values = _evaluate(model, boundary, origin, sizes)
        rejected = [b for b in boundary
                    if values[b].nbytes > max(size_limit, sum(sizes[i] for i in origin[b][0]))]
        if not rejected:
            break
        for b in rejected:
            nodes -= origin[b][1]
    else:
        return {"folded_nodes": 0, "folded_values": 0, "bytes_before": before, "bytes_after": before}
    replace_nodes(graph, {}, nodes)
    prune_initializers(graph)
    folded = len(values)
    for name in list(values):  # one at a time: the values and their stored copies never all exist twice
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values.pop(name)), name))
    after = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
    return {"folded_nodes": len(nodes), "folded_values": folded, "bytes_before": before, "bytes_after": after}


def _evaluate(model: onnx.ModelProto, boundary: list[str], origin: dict, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """The boundary values, computed with ONNX Runtime in groups reading at most CHUNK_BYTES of weights each
    (a value reading more is a group of its own): each group's session holds only the weights it reads."""
    graph = model.graph
    keep_consts = [n for n in graph.node if n.op_type == "Constant"]
    values: dict[str, np.ndarray] = {}
    group: list[str] = []
    weight_bytes = 0

    def run(names: list[str]) -> None:
        deps = set().union(*(origin[b][1] for b in names))
        sub = submodel(model, keep_consts + [graph.node[k] for k in sorted(deps)], [], names, "weights_only")
        with quiet_session(sub) as session:
            values.update(zip(names, session.run(names, {})))

    for name in boundary:
        reads = sum(sizes[i] for i in origin[name][0])
        if group and weight_bytes + reads > CHUNK_BYTES:
            run(group)
            group, weight_bytes = [], 0
        group.append(name)
        weight_bytes += reads
    if group:
        run(group)
    return values
