"""Collapse per-channel affine chains on the denoiser's main path into one Mul and one Add.

A residual block normalises its input and then applies two affine maps in a row: GroupNorm's own
`x * gamma + beta` and the conditioning modulation `x * (1 + s) + t` (s, t computed from sigma and the class
label). That is four full-tensor passes over the activations; written as `x * scale + shift` with

    scale = gamma * (1 + s),   shift = beta * (1 + s) + t

it is two, and scale/shift depend on sigma, labels and weights only: they join the conditioning cone, so
the compiler can evaluate them once per (step, label) into tables instead of at every call.

`side` names the values computed from constants and conditioning only (initializers, Constant outputs,
sigma/class_labels and everything computed from them). A chain is a run of elementwise Mul/Add nodes
(Sub by a side value `x - d`, Div by one `x / c` in floating point) each taking one main-path input and one
side input, where every intermediate main-path value has exactly one consumer and is not a graph output.
Walking the chain keeps (scale, shift) as side expressions: Mul c -> (scale*c, shift*c); Add d -> shift+d;
Sub d -> shift-d; Div c -> (scale/c, shift/c).

Shapes: the rewrite is the elementwise identity ((x*c1 + d1)*c2 ... ) = x*(c1*c2...) + (d1*c2 ...) on the
multidirectional broadcast of all operands. Every side operand of the chain ends in scale or in shift, and
broadcasting is associative and commutative, so the output shape (and every value) is the chain's own:
no shape information is needed. Float results change by re-association only (a few ulp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
DEFAULT_DOMAINS = ("", "ai.onnx")
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # a model over this size cannot be serialised in one message
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclass(frozen=True)
class Link:
    """One elementwise node of a chain: `output = op(main, side)` (main is input 0 for Sub/Div)."""
    index: int  # position in graph.node
    op: str
    main: str
    side: str
    output: str


def element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Known TensorProto element types by value name (graph inputs/outputs, value_info, initializers)."""
    types = {t.name: t.data_type for t in graph.initializer}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names read inside a node's subgraph attributes (Loop/If/Scan bodies may read outer values implicitly)."""
    names = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names.update(n.input)
                names |= subgraph_inputs(n)
    return names


def consumer_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many times each value is read: node inputs, graph outputs, and any read inside a subgraph (counted
    twice, so such a value is never an intermediate)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
        for name in subgraph_inputs(node):
            counts[name] = counts.get(name, 0) + 2
    for o in graph.output:
        counts[o.name] = counts.get(o.name, 0) + 2
    return counts


def affine_link(index: int, node: onnx.NodeProto, side: set[str], types: dict[str, int]) -> Link | None:
    """The node as a chain link, or None when it is not a plain elementwise op of one main and one side value."""
    if (node.op_type not in AFFINE_OPS or node.domain not in DEFAULT_DOMAINS or node.attribute
            or len(node.input) != 2 or len(node.output) != 1):
        return None
    a, b = node.input
    if not a or not b or (a in side) == (b in side):
        return None
    main, other = (b, a) if a in side else (a, b)
    if node.op_type in ("Sub", "Div") and main != a:  # d - x and c / x are not affine in the same form
        return None
    if node.op_type == "Div" and types.get(node.output[0], types.get(other)) not in FLOAT_TYPES:
        return None  # x / c == x * (1/c) only in floating point
    return Link(index, node.op_type, main, other, node.output[0])


def find_chains(graph: onnx.GraphProto, side: set[str]) -> list[list[Link]]:
    """Maximal chains of links joined through single-consumer, non-output main-path values (length >= 2)."""
    types = element_types(graph)
    counts = consumer_counts(graph)
    links = {k: link for k, n in enumerate(graph.node) if (link := affine_link(k, n, side, types))}
    by_main = {link.main: link for link in links.values() if counts.get(link.main, 0) == 1}
    continued = {by_main[link.output].index for link in links.values() if link.output in by_main}
    chains = []
    for k in sorted(links):
        if k in continued:
            continue
        chain = [links[k]]
        while chain[-1].output in by_main:
            chain.append(by_main[chain[-1].output])
        if len(chain) >= 2:
            chains.append(chain)
    return chains


def _coefficients(chain: list[Link], fresh) -> tuple[list[onnx.NodeProto], str | None, str | None]:
    """Side nodes computing the chain's combined (scale, shift); None stands for 1 (scale) or 0 (shift)."""
    nodes: list[onnx.NodeProto] = []

    def emit(op: str, inputs: list[str], role: str) -> str:
        out = fresh(role)
        nodes.append(helper.make_node(op, inputs, [out], name=fresh(role + "_node")))
        return out

    scale = shift = None
    for link in chain:
        if link.op == "Mul":
            scale = link.side if scale is None else emit("Mul", [scale, link.side], "scale")
            shift = None if shift is None else emit("Mul", [shift, link.side], "shift")
        elif link.op == "Div":
            scale = (emit("Reciprocal", [link.side], "scale") if scale is None
                     else emit("Div", [scale, link.side], "scale"))
            shift = None if shift is None else emit("Div", [shift, link.side], "shift")
        elif link.op == "Add":
            shift = link.side if shift is None else emit("Add", [shift, link.side], "shift")
        else:  # Sub
            shift = emit("Neg", [link.side], "shift") if shift is None else emit("Sub", [shift, link.side], "shift")
    return nodes, scale, shift


def _attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values (strings as bytes)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _name_factory(graph: onnx.GraphProto, base: str, prefix: str = "affine_"):
    """fresh(role) -> a value/node name unused anywhere in the graph, `base/prefix+role` (+ a counter)."""
    taken = {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    for n in graph.node:
        taken.update(n.input)
        taken.update(n.output)
        taken.add(n.name)

    def fresh(role: str) -> str:
        k, name = 0, f"{base}/{prefix}{role}"
        while name in taken:
            k += 1
            name = f"{base}/{prefix}{role}_{k}"
        taken.add(name)
        return name

    return fresh


def collapse_affine_chains(graph: onnx.GraphProto, side: set[str]) -> int:
    """Rewrite every affine chain that gets shorter as `Add(Mul(x, scale), shift)`, in place.

    graph: the denoiser graph (default-domain Mul/Add/Sub/Div are considered; nodes with attributes or in
    other domains are left alone). side: names of constant/conditioning-only values; the new scale/shift
    values (and their intermediates) are added to it. The chain's final output keeps its name, so consumers
    are untouched; the new nodes replace the chain's last node in the node list (every operand is defined
    by then, so the list stays topologically sorted); value_info entries of removed intermediates are
    dropped. Returns the net number of main-path nodes removed (chain nodes minus the Mul/Add put in their
    place); the side nodes added are not counted (they are per-(step, label) constants to the compiler).
    """
    chains = find_chains(graph, side)
    replace: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    dropped_values: set[str] = set()
    saved = 0
    for chain in chains:
        fresh = _name_factory(graph, chain[-1].output)
        side_nodes, scale, shift = _coefficients(chain, fresh)
        main_ops = (scale is not None) + (shift is not None)
        if main_ops >= len(chain):
            continue
        x, out = chain[0].main, chain[-1].output
        main_nodes = []
        if scale is not None:
            scaled = fresh("scaled") if shift is not None else out
            main_nodes.append(helper.make_node("Mul", [x, scale], [scaled], name=fresh("mul")))
            x = scaled
        if shift is not None:
            main_nodes.append(helper.make_node("Add", [x, shift], [out], name=fresh("add")))
        replace[chain[-1].index] = side_nodes + main_nodes
        removed.update(link.index for link in chain)
        dropped_values.update(link.output for link in chain[:-1])
        side.update(o for n in side_nodes for o in n.output)
        saved += len(chain) - main_ops
    if not replace:
        return 0
    nodes = []
    for k, node in enumerate(graph.node):
        if k in replace:
            nodes.extend(replace[k])
        elif k not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.name not in dropped_values]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return saved


# ------------------------------------------------------------------------------------------------------
# Constant per-channel affines as BatchNormalization: GroupNorm's `x * gamma + beta` with stored gamma/beta
# (no conditioning to merge it with) is two full-tensor passes as Mul + Add; an inference-mode
# BatchNormalization with mean 0, variance 1, epsilon 0 computes exactly x * gamma + beta in ONE pass.

def probe_shapes(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the named values in one ONNX Runtime run of `model` on `feeds` (exported graphs often leave
    the shapes around Reshape unknown to static inference)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in have)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if probe.ByteSize() < PROTOBUF_LIMIT:
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outs = sess.run(list(dict.fromkeys(names)), feeds)
    else:  # over protobuf's 2 GB: through a file with external weights
        import tempfile

        with tempfile.TemporaryDirectory(prefix="iia-probe-") as tmp:
            onnx.save_model(probe, f"{tmp}/probe.onnx", save_as_external_data=True, location="weights.bin")
            sess = ort.InferenceSession(f"{tmp}/probe.onnx", options, providers=["CPUExecutionProvider"])
            outs = sess.run(list(dict.fromkeys(names)), feeds)
    return {n: tuple(a.shape) for n, a in zip(dict.fromkeys(names), outs)}


def _per_channel(value, shape: tuple[int, ...]):
    """`value` (numpy) as a [C] vector when broadcasting it against `shape` ([N, C, ...]) scales channels only."""
    rank = len(shape)
    if value.ndim > rank or rank < 2:
        return None
    padded = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if padded.shape[0] != 1 or any(d != 1 for d in padded.shape[2:]) or padded.shape[1] not in (1, shape[1]):
        return None
    return np.ascontiguousarray(np.broadcast_to(padded.reshape(-1), (shape[1],)), dtype=np.float32)


def affine_to_batchnorm(model: onnx.ModelProto, feeds: dict) -> int:
    """Replace `Add(Mul(x, gamma), beta)` (gamma, beta float32 initializers that scale/shift channels only, the
    intermediate read once) by BatchNormalization(x, gamma, beta, 0, 1, epsilon=0), in place. `feeds`: one
    valid input of the model, to learn the shapes (x must already have the output's shape: no broadcast
    of x). Returns the number of nodes removed."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    counts = consumer_counts(graph)
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
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
    if not pairs:
        return 0
    shapes = probe_shapes(model, [n for m, k, x, *_ in pairs for n in (x, graph.node[k].output[0])], feeds)
    fresh = _name_factory(graph, "iia/bn")
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
        replace[k] = helper.make_node("BatchNormalization", [x, *names, *moments[len(scale)]], [out],
                                      name=fresh("node"), epsilon=0.0)
        removed.add(m)
    if not replace:
        return 0
    nodes = [replace.get(k, n) for k, n in enumerate(graph.node) if k not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for n in graph.node for i in n.input} | _subgraph_reads(graph) | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in read or t.name not in {p[3] for p in pairs} | {p[4] for p in pairs}]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return len(removed)


# ------------------------------------------------------------------------------------------------------
# Residual scales absorbed: UNet blocks end in `(x + F(x)) * c` (EDM's skip_scale, c = sqrt(1/2)), one more
# full-tensor pass that also keeps ONNX Runtime from fusing the next block's residual Add into its convolution.
# A positive scalar factor c on a value commutes with what reads it:
#   GroupNorm (Reshape -> InstanceNormalization):  GN_eps(c u) = GN_(eps / c^2)(u)  (exact: scale invariance)
#   a scalar Mul:                                  (c u) * d = u * (c d)
#   a residual Add with a convolution:             c u + Conv_(W, b)(h) = c (u + Conv_(W / c, b / c)(h)),
#                                                  the factor c moving on to the Add's readers.
# So `y = u * c` is removed when every reader of y absorbs c that way (recursively through residual Adds);
# the last factor of a chain of blocks ends in a reader's constant, typically the output head's GroupNorm.
# Where a block output also feeds anything else (a decoder's skip Concat, a graph output), nothing changes.
# Between the removed Mul and the reader that takes the factor, activations are 1/c times the exported
# ones; along a chain the factors multiply (c^k), so a factor is absorbed only while every constant it
# creates, and the accumulated factor of every residual sum it passes (chains are absorbed piecewise), stay
# within [1/MAX_ABSORBED_SCALE, MAX_ABSORBED_SCALE]: activations at most 4x the exported ones (fp16 engines
# keep their range), epsilons within 16x (unbounded, a chain of 140 blocks overflowed float32).

MAX_ABSORBED_SCALE = 4.0


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, float]:
    """Positive finite float32 scalars (rank 0 or [1]: multiplying by one never changes a tensor's shape of
    rank >= 1) stored as initializers or Constant nodes, by value name."""
    found = {}
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], n.attribute[0].t) for n in graph.node
                if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"]
    for name, t in tensors:
        if t.data_type == TensorProto.FLOAT and len(t.dims) <= 1 and int(np.prod(t.dims, dtype=np.int64)) == 1:
            v = float(numpy_helper.to_array(t).reshape(-1)[0])
            if np.isfinite(v) and v > 0:
                found[name] = v
    return found


def _in_range(c: float) -> bool:
    return 1 / MAX_ABSORBED_SCALE <= c <= MAX_ABSORBED_SCALE


def _absorb_plan(graph, value: str, c: float, readers, counts, scalars, inits, producer) -> list | None:
    """How the readers of `value` take over the positive factor `c` on it (see above), or None when one
    cannot."""
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
            further = _absorb_plan(graph, node.output[0], c, readers, counts, scalars, inits, producer)
            if further is None:
                return None
            actions += [("convolution", conv), ("sum", r), *further]
        else:
            return None
    return actions


def absorb_residual_scales(graph: onnx.GraphProto) -> int:
    """Remove every `Mul(u, c)` (c a positive scalar constant within [1/MAX_ABSORBED_SCALE,
    MAX_ABSORBED_SCALE], u of known rank >= 1 in the graph's value_info) whose readers absorb c (see above),
    in place. Returns the number of Mul nodes removed. Values change by float32 rounding of W / c and
    eps / c^2 only."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    deviation: dict[str, float] = {}  # residual sum -> its value now / its exported value (1 when absent)
    removed = 0
    for _ in range(len(graph.node)):
        counts = consumer_counts(graph)
        readers: dict[str, list[int]] = {}
        for k, n in enumerate(graph.node):
            for i in dict.fromkeys(n.input):
                readers.setdefault(i, []).append(k)
        producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
        inits = {t.name: t for t in graph.initializer}
        scalars = _scalar_constants(graph)
        for k, node in enumerate(graph.node):
            if node.op_type != "Mul" or node.domain not in DEFAULT_DOMAINS or node.attribute or len(node.input) != 2:
                continue
            c_name = next((i for i in node.input[::-1] if i in scalars), None)
            if c_name is None or node.input[0] == node.input[1] or not _in_range(scalars[c_name]):
                continue
            u = node.input[0] if node.input[1] == c_name else node.input[1]
            if ranks.get(u, 0) < 1:  # u * c[1] would be rank 1 for a scalar u: keep the shape
                continue
            c = scalars[c_name]
            plan = _absorb_plan(graph, node.output[0], c, readers, counts, scalars, inits, producer)
            sums = [graph.node[r].output[0] for kind, r in plan or () if kind == "sum"]
            # a chain absorbed piecewise: factors on the same sums multiply, keep them within range too
            if plan is not None and all(_in_range(deviation.get(v, 1.0) / c) for v in sums):
                _apply_absorb(graph, k, u, c, plan, scalars, inits)
                deviation.update({v: deviation.get(v, 1.0) / c for v in sums})
                removed += 1
                break
        else:
            return removed
    return removed


def _apply_absorb(graph, k: int, u: str, c: float, plan: list, scalars, inits) -> None:
    fresh = _name_factory(graph, "iia/scale", prefix="")
    y = graph.node[k].output[0]
    replaced, new_inits = set(), []
    for kind, r in plan:
        node = graph.node[r]
        if kind == "epsilon":
            at = _attributes(node)
            kept = [a for a in node.attribute if a.name != "epsilon"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("epsilon", float(at.get("epsilon", 1e-5)) / c**2)])
        elif kind == "constant":
            i = next(j for j, name in enumerate(node.input)
                     if name in scalars and name != y and _in_range(scalars[name] * c))
            name = fresh("factor")
            new_inits.append(numpy_helper.from_array(np.array(scalars[node.input[i]] * c, np.float32), name))
            node.input[i] = name
        elif kind == "sum":  # the residual Add itself is unchanged: its value is now 1/c of the exported one
            continue
        else:  # convolution: weights and bias divided by c
            for j in range(1, len(node.input)):
                name = fresh(node.input[j].rsplit("/", 1)[-1])
                new_inits.append(numpy_helper.from_array(
                    (numpy_helper.to_array(inits[node.input[j]]).astype(np.float64) / c).astype(np.float32), name))
                replaced.add(node.input[j])
                node.input[j] = name
    for n in graph.node:
        for j, name in enumerate(n.input):
            if name == y:
                n.input[j] = u
    del graph.node[k]
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)


# ------------------------------------------------------------------------------------------------------
# Convolutions with few output channels as ConvTranspose: ONNX Runtime CPU runs 2D convolutions in a blocked
# channel layout (NCHWc, 8 or 16 channels a block) and pads the output channels up to a block, so the last
# convolution of a UNet (C -> 3 pixel or 4 latent channels) costs as much as one with 16 outputs. The same
# convolution written as a ConvTranspose (stride 1) is one GEMM of [C_out * kh * kw, C_in] x [C_in, H * W]
# plus a col2im sum, whose cost follows C_out: 3.3x faster at C 32 -> 3 (batch 8, 16x16), 4.3x at 128 -> 3,
# 1.5-1.9x at C_out 8, even or slower at 16 (AVX-512, scripts/conv_transpose_bench.py). With 8-channel blocks
# (AVX2) C_out 8 is not padded, hence the threshold 4. The identity (stride 1, dilation 1):
#
#     Conv(x, W, pads=p)[o, i, j] = ConvTranspose(x, Wt, pads=k - 1 - p)[o, i, j],
#     Wt[c, o, u, v] = W[o, c, kh - 1 - u, kw - 1 - v]
#
# (the transposed weights are the same bytes in another order; the sums differ by re-association only).

TRANSPOSE_MAX_OUT_CHANNELS = 4  # at most half the smallest NCHWc block (8 channels, AVX2)


def small_convs_to_transposed(graph: onnx.GraphProto, max_out: int = TRANSPOSE_MAX_OUT_CHANNELS) -> int:
    """Replace each 2D Conv with at most `max_out` output channels (weights a float32 initializer of shape
    [C_out, C_in, kh, kw], group 1, stride 1, dilation 1, explicit symmetric or VALID padding no larger than
    kernel - 1) by the equal ConvTranspose, in place. Returns the number of nodes replaced; other convolutions (and the
    graph's values, names and outputs) are unchanged."""
    inits = {t.name: t for t in graph.initializer}
    fresh = _name_factory(graph, "iia/conv", prefix="")
    replaced, new_inits, old, transposed = 0, [], set(), {}
    for k, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 4 or weight.dims[0] > max_out:
            continue
        at = _attributes(node)
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
        read = {i for n in graph.node for i in n.input} | _subgraph_reads(graph) | {o.name for o in graph.output}
        kept = [t for t in graph.initializer if t.name in read or t.name not in old]
        del graph.initializer[:]
        graph.initializer.extend(kept + new_inits)
    return replaced


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    return set().union(*(subgraph_inputs(n) for n in graph.node)) if graph.node else set()


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
