"""Residual scales absorbed by their readers.

UNet blocks end in `(x + F(x)) * c` (EDM's skip_scale, c = sqrt(1/2)), one more
full-tensor pass that also keeps ONNX Runtime from fusing the next block's residual Add into its convolution.
A positive scalar factor c on a value commutes with what reads it:
  GroupNorm (Reshape -> InstanceNormalization):  GN_eps(c u) = GN_(eps / c^2)(u)  (exact: scale invariance)
  a scalar Mul:                                  (c u) * d = u * (c d)
  a residual Add with a convolution:             c u + Conv_(W, b)(h) = c (u + Conv_(W / c, b / c)(h)),
                                                 the factor c moving on to the Add's readers.
So `y = u * c` is removed when every reader of y absorbs c that way (recursively through residual Adds);
the last factor of a chain of blocks ends in a reader's constant, typically the output head's GroupNorm.
Where a block output also feeds anything else (a decoder's skip Concat, a graph output), nothing changes.
Between the removed Mul and the reader that takes the factor, activations are 1/c times the exported
ones; along a chain the factors multiply (c^k), so a factor is absorbed only while every constant it
creates, and the accumulated factor of every residual sum it passes (chains are absorbed piecewise), stay
within [1/MAX_ABSORBED_SCALE, MAX_ABSORBED_SCALE]: activations at most 4x the exported ones (fp16 engines
keep their range), epsilons within 16x (unbounded, a chain of 140 blocks overflowed float32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import DEFAULT_DOMAINS, Index, attributes, name_factory

MAX_ABSORBED_SCALE = 4.0


def _scalar(t: onnx.TensorProto) -> float | None:
    """The value of a positive finite float32 scalar tensor (rank 0 or [1]: multiplying by one never changes
    the shape of a tensor of rank >= 1); None for any other tensor."""
    if t.data_type == TensorProto.FLOAT and len(t.dims) <= 1 and int(np.prod(t.dims, dtype=np.int64)) == 1:
        v = float(numpy_helper.to_array(t).reshape(-1)[0])
        if np.isfinite(v) and v > 0:
            return v
    return None


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, float]:
    """Positive finite float32 scalars stored as initializers or Constant nodes, by value name."""
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], n.attribute[0].t) for n in graph.node
                if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"]
    return {name: v for name, t in tensors if (v := _scalar(t)) is not None}


def _in_range(c: float) -> bool:
    return 1 / MAX_ABSORBED_SCALE <= c <= MAX_ABSORBED_SCALE


def _absorb_plan(index: Index, value: str, c: float, scalars: dict[str, float]) -> list | None:
    """How the readers of `value` take over the positive factor `c` on it (see above), as [(kind, node
    position)], or None when one cannot."""
    graph, readers, counts, inits, producer = (index.graph, index.readers, index.counts, index.initializers,
                                               index.producer)
    if counts.get(value, 0) != len(readers.get(value, ())):  # also read by a graph output or a subgraph
        return None
    actions = []
    for r in readers.get(value, ()):
        node = graph.node[r]
        if node.domain not in DEFAULT_DOMAINS or list(node.input).count(value) != 1:
            return None
        if node.op_type == "Reshape" and node.input[0] == value and len(readers.get(node.output[0], ())) == 1 \
                and counts.get(node.output[0]) == 1:
            norm = readers[node.output[0]][0]
            if graph.node[norm].op_type != "InstanceNormalization" or graph.node[norm].input[0] != node.output[0]:
                return None
            actions.append(("epsilon", norm))
        elif node.op_type == "InstanceNormalization" and node.input[0] == value:
            actions.append(("epsilon", r))
        elif node.op_type == "Shape":  # a dynamic Reshape's target: u has y's shape
            continue
        elif node.op_type == "Mul" and not node.attribute and len(node.input) == 2 \
                and any(i in scalars and _in_range(scalars[i] * c) for i in node.input if i != value):
            actions.append(("constant", r))
        elif node.op_type == "Add" and not node.attribute and len(node.input) == 2:
            other = node.input[1] if node.input[0] == value else node.input[0]
            conv = producer.get(other)
            if conv is None or counts.get(other) != 1 or graph.node[conv].op_type != "Conv" \
                    or graph.node[conv].domain not in DEFAULT_DOMAINS:
                return None
            params = list(graph.node[conv].input[1:])
            if not all(p in inits and inits[p].data_type == TensorProto.FLOAT and counts.get(p) == 1 for p in params):
                return None
            further = _absorb_plan(index, node.output[0], c, scalars)
            if further is None:
                return None
            actions += [("convolution", conv), ("sum", r), *further]
        else:
            return None
    return actions




def _candidate(node: onnx.NodeProto, scalars: dict[str, float], ranks: dict[str, int]) -> tuple[str, float] | None:
    """(u, c) when `node` is `Mul(u, c)` with c a positive scalar constant in range and u of known rank >= 1."""
    if node.op_type != "Mul" or node.domain not in DEFAULT_DOMAINS or node.attribute or len(node.input) != 2:
        return None
    c_name = next((i for i in node.input[::-1] if i in scalars), None)
    if c_name is None or node.input[0] == node.input[1] or not _in_range(scalars[c_name]):
        return None
    u = node.input[0] if node.input[1] == c_name else node.input[1]
    if ranks.get(u, 0) < 1:  # u * c[1] would be rank 1 for a scalar u: keep the shape
        return None
    return u, scalars[c_name]


def absorb_residual_scales(graph: onnx.GraphProto) -> int:
    """Remove every `Mul(u, c)` (c a positive scalar constant within [1/MAX_ABSORBED_SCALE,
    MAX_ABSORBED_SCALE], u of known rank >= 1 in the graph's value_info) whose readers absorb c (see above),
    in place. After each removal the search starts again from the first node (a removal can let an earlier
    Mul's factor through). Returns the number of Mul nodes removed. Values change by float32 rounding of
    W / c and eps / c^2 only."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    deviation: dict[str, float] = {}  # residual sum -> its value now / its exported value (1 when absent)
    index, scalars = Index(graph), _scalar_constants(graph)
    removed = 0
    for _ in range(len(graph.node)):
        for k, node in index.nodes():
            found = _candidate(node, scalars, ranks)
            if found is None:
                continue
            u, c = found
            plan = _absorb_plan(index, node.output[0], c, scalars)
            sums = [graph.node[r].output[0] for kind, r in plan or () if kind == "sum"]
            # a chain absorbed piecewise: factors on the same sums multiply, keep them within range too
            if plan is not None and all(_in_range(deviation.get(v, 1.0) / c) for v in sums):
                _apply_absorb(index, k, u, c, plan, scalars)
                deviation.update({v: deviation.get(v, 1.0) / c for v in sums})
                removed += 1
                break
        else:
            break
    index.commit()
    return removed


def _apply_absorb(index: Index, k: int, u: str, c: float, plan: list, scalars: dict[str, float]) -> None:
    """Remove Mul k (`y = u * c`) and let the plan's readers take c. Names are chosen against the graph as it
    is before this edit; the edits follow."""
    graph = index.graph
    fresh = name_factory(index.in_use, "iia/scale")
    y = graph.node[k].output[0]
    inputs, replaced, new_inits = [], set(), []  # inputs: (node, input position, new name)
    for kind, r in plan:
        node = graph.node[r]
        if kind == "epsilon":
            at = attributes(node)
            kept = [a for a in node.attribute if a.name != "epsilon"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("epsilon", float(at.get("epsilon", 1e-5)) / c**2)])
        elif kind == "constant":
            i = next(j for j, name in enumerate(node.input)
                     if name in scalars and name != y and _in_range(scalars[name] * c))
            name = fresh("factor")
            new_inits.append(numpy_helper.from_array(np.array(scalars[node.input[i]] * c, np.float32), name))
            inputs.append((r, i, name))
        elif kind == "sum":  # the residual Add itself is unchanged: its value is now 1/c of the exported one
            continue
        else:  # convolution: weights and bias divided by c
            for j in range(1, len(node.input)):
                name = fresh(node.input[j].rsplit("/", 1)[-1])
                new_inits.append(numpy_helper.from_array(
                    (numpy_helper.to_array(index.initializers[node.input[j]]).astype(np.float64) / c).astype(np.float32),
                    name))
                replaced.add(node.input[j])
                inputs.append((r, j, name))
    for r, j, name in inputs:
        index.set_input(r, j, name)
    for r in list(index.readers.get(y, ())):
        for j, name in enumerate(graph.node[r].input):
            if name == y:
                index.set_input(r, j, u)
    index.remove_node(k)
    index.drop_initializers(replaced)
    index.add_initializers(new_inits)
    for name in replaced:
        scalars.pop(name, None)
    scalars.update((t.name, v) for t in new_inits if (v := _scalar(t)) is not None)
