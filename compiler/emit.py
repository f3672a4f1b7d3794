"""Emit the unrolled sampler as ONE ONNX graph around the once-exported denoiser.

Reads the same `Program` the PyTorch sampler runs: every `Denoise` op becomes a copy of the denoiser's
nodes (value names prefixed per call site, initializers SHARED by name, so weights are stored once), every
`Combine` a chain of Mul/Add with baked float constants. The model's decode stage, exported once, is
appended after the last step (its values and weights prefixed `decode/`). Interface:
  inputs  noise float32 [B, *shape] (standard normal; scaled by the schedule's first sigma inside),
          class_labels int64 [B] (conditional models only)
  outputs images float32 [B, *shape] (pixel models; `latents` for latent models), images_uint8 uint8
          [B, H, W, C] (when a decode stage is given: the model's own, e.g. EDM's clip(x * 127.5 + 128, 0, 255)
          NHWC, or a VAE decoder for latent models)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from iia.calibration.solvers import Combine, Denoise, Program
from iia.runtime.contract import (DECODER_SAMPLES, DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, IMAGES, IMAGES_U8,
                                  LABELS, LATENTS, NOISE)

from .fold import BATCH, LABEL, FoldPlan, plan_folding
from .rewrite import DEFAULT_DOMAINS, small_convs_to_transposed, subgraph_inputs

DENOISER_INPUTS = (DENOISER_X, DENOISER_SIGMA, DENOISER_LABELS)
DECODER_INPUT, DECODER_OUTPUT = DECODER_SAMPLES, IMAGES_U8
DECODE_PREFIX = "decode/"
CHECKED_LABELS = "iia/class_labels_checked"  # class_labels after check_labels: what every call reads


def check_labels(gb: "GraphBuilder", batch: str, label_dim: int) -> str:
    """Make the graph refuse class labels outside its contract instead of reading another label's row or
    broadcasting one label to every image: `class_labels` must have the batch's length (a Reshape to [B]
    fails otherwise) and, given label_dim, ids in [0, label_dim) (a Gather over arange(label_dim) fails on
    any other id; negatives are first mapped past the end, as Gather would wrap them). Returns
    CHECKED_LABELS."""
    labels = gb.node("Reshape", [LABELS, batch], "iia/class_labels_one_per_image" if label_dim else CHECKED_LABELS)
    if label_dim:
        negative = gb.node("Less", [labels, gb.const(np.array(0, np.int64), np.int64)])
        ids = gb.node("Where", [negative, gb.const(np.array(label_dim, np.int64), np.int64), labels])
        gb.node("Gather", [gb.const(np.arange(label_dim, dtype=np.int64), np.int64), ids], CHECKED_LABELS, axis=0)
        gb.nodes[-1].name = f"iia/class_labels_must_be_in_0_to_{label_dim - 1}"
    return CHECKED_LABELS


class EmitError(ValueError):
    pass


class GraphBuilder:
    """Collects nodes and small constant initializers with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"iia/{base}_{self._count}"

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"iia/const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _value(name: str) -> str:
    return f"v/{name}"


def emit_combine(gb: GraphBuilder, op: Combine) -> None:
    if not op.terms:
        raise EmitError(f"empty combination for {op.out}")
    products = [gb.node("Mul", [_value(name), gb.const(weight)]) for name, weight in op.terms]
    acc = products[0]
    for product in products[1:]:
        acc = gb.node("Add", [acc, product])
    gb.node("Identity", [acc], _value(op.out))


def _check_denoiser_graph(graph: onnx.GraphProto) -> None:
    inputs = [i.name for i in graph.input]
    if inputs[:2] != [DENOISER_X, DENOISER_SIGMA] or len(graph.output) != 1:
        raise EmitError(f"denoiser graph must take (x, sigma[, class_labels]) and give one output, has {inputs}")
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise EmitError(f"denoiser graph has control flow ({node.op_type}); iia inlines flat graphs only")


def emit_call(gb: GraphBuilder, denoiser: onnx.GraphProto, site: int, state: str, sigma: str, out: str,
              folded: dict | None = None, skip: set[int] = frozenset()) -> None:
    """Copy the denoiser's nodes for one call site: prefixed value names, shared initializers.

    `folded` maps conditioning values to (array, kind) (fold.py) and `skip` lists the nodes that computed them.
    """
    shared = {t.name for t in denoiser.initializer}
    mapping = {DENOISER_X: _value(state), DENOISER_SIGMA: sigma, DENOISER_LABELS: CHECKED_LABELS,
               denoiser.output[0].name: _value(out)}
    for name, (array, kind) in (folded or {}).items():
        if kind == BATCH:
            shape = gb.node("Concat", ["iia/batch", gb.const(np.array(array.shape[1:], dtype=np.int64), np.int64)], axis=0)
            mapping[name] = gb.node("Expand", [gb.const(array, array.dtype), shape])
        elif kind == LABEL:  # row class_labels[b] for image b
            mapping[name] = gb.node("Gather", [gb.const(array, array.dtype), CHECKED_LABELS], axis=0)
        else:
            mapping[name] = gb.const(array, array.dtype)
    prefix = f"call{site}/"

    def rename(name: str) -> str:
        if not name or name in shared:
            return name
        return mapping.get(name, prefix + name)

    for k, node in enumerate(denoiser.node):
        if k not in skip:
            gb.nodes.append(_copy_node(node, prefix, rename))


def _copy_node(node: onnx.NodeProto, prefix: str, rename) -> onnx.NodeProto:
    """A copy of `node` named `prefix` + its name, its value names mapped through `rename`."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = prefix + (node.name or node.op_type)
    copy.input[:] = [rename(n) for n in node.input]
    copy.output[:] = [rename(n) for n in node.output]
    return copy


def emit_decode(gb: GraphBuilder, decoder: onnx.GraphProto, source: str, out: str) -> list[onnx.TensorProto]:
    """Append the decode stage's nodes reading `source` and writing `out`; returns its initializers, renamed
    with DECODE_PREFIX (its weights are stored once, apart from the denoiser's)."""
    inputs = [i.name for i in decoder.input]
    if inputs != [DECODER_INPUT] or len(decoder.output) != 1:
        raise EmitError(f"decode graph must take ({DECODER_INPUT}) and give one output, has {inputs}")
    mapping = {DECODER_INPUT: source, decoder.output[0].name: out}

    def rename(name: str) -> str:
        return mapping.get(name, DECODE_PREFIX + name) if name else name

    for node in decoder.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise EmitError(f"decode graph has control flow ({node.op_type}); iia inlines flat graphs only")
        gb.nodes.append(_copy_node(node, DECODE_PREFIX, rename))
    renamed = []
    for t in decoder.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = DECODE_PREFIX + t.name
        renamed.append(copy)
    return renamed


def emit_sampler(program: Program, denoiser_model: onnx.ModelProto, shape: tuple[int, ...], conditional: bool,
                 name: str = "iia_sampler", fold: bool = True, decoder_model: onnx.ModelProto | None = None,
                 latent: bool = False, label_dim: int = 0, plan: FoldPlan | None = None) -> onnx.ModelProto:
    """The whole fixed-NFE sampler as one ONNX model (weights shared with `denoiser_model`).

    With `fold`, each call site's conditioning subgraph is replaced by its constant values or, for a
    conditional model given its `label_dim`, per-label tables (see fold.py); `plan` (from `fold.plan_folding`
    on this denoiser and the program's sigmas) skips recomputing it.
    `decoder_model` (the model's decode stage, see export.export_decoder) adds the `images_uint8` output;
    `latent` names the float output `latents` instead of `images`.
    """
    dgraph = denoiser_model.graph
    _check_denoiser_graph(dgraph)
    if conditional != (len(dgraph.input) == 3):
        raise EmitError("denoiser graph's inputs do not match the model's conditioning")
    gb = GraphBuilder()
    batch = gb.node("Shape", [NOISE], "iia/batch", start=0, end=1)
    if conditional:
        check_labels(gb, batch, label_dim)
    calls = [op for op in program.ops() if isinstance(op, Denoise)]
    if plan is None:
        plan = plan_folding(denoiser_model, [op.sigma for op in calls], label_dim) if fold else FoldPlan()
    dgraph = (plan.model or denoiser_model).graph
    gb.nodes.append(helper.make_node("Identity", [NOISE], [_value("noise")], name="iia/noise"))
    sigma_names: dict[float, str] = {}
    site = 0
    for op in program.ops():
        if isinstance(op, Denoise):
            if op.sigma not in sigma_names:
                sigma_names[op.sigma] = gb.node("Expand", [gb.const([op.sigma]), batch], f"iia/sigma_{len(sigma_names)}")
            emit_call(gb, dgraph, site, op.state, sigma_names[op.sigma], op.out,
                      plan.values.get(op.sigma), plan.foldable_nodes)
            site += 1
        else:
            emit_combine(gb, op)
    return _finish_model(gb, _value(program.output), shape, conditional, name, denoiser_model, decoder_model, latent,
                         weights=list(dgraph.initializer))


def _finish_model(gb: GraphBuilder, source: str, shape: tuple[int, ...], conditional: bool, name: str,
                  denoiser_model: onnx.ModelProto, decoder_model: onnx.ModelProto | None, latent: bool,
                  weights: list[onnx.TensorProto], also_read: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """The model around `gb`'s nodes: `source` as the samples output, the decode stage, inputs, and the
    initializers that are read (by gb's nodes or, `also_read`, by a subgraph), from `weights` and gb's constants."""
    samples = LATENTS if latent else IMAGES
    gb.nodes.append(helper.make_node("Identity", [source], [samples], name=f"iia/{samples}"))
    outputs = [helper.make_tensor_value_info(samples, TensorProto.FLOAT, ["batch", *shape])]
    decode_weights: list[onnx.TensorProto] = []
    if decoder_model is not None:
        decoder = onnx.GraphProto()
        decoder.CopyFrom(decoder_model.graph)
        small_convs_to_transposed(decoder)  # a VAE's last convolution (C -> 3): the denoiser's rewrite, see there
        decode_weights = emit_decode(gb, decoder, samples, IMAGES_U8)
        h, w, c = decoded_shape(decoder_model)
        outputs.append(helper.make_tensor_value_info(IMAGES_U8, TensorProto.UINT8, ["batch", h, w, c]))
    inputs = [helper.make_tensor_value_info(NOISE, TensorProto.FLOAT, ["batch", *shape])]
    if conditional:
        inputs.append(helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["batch"]))
    gb.nodes = live_nodes(gb.nodes, {o.name for o in outputs})  # e.g. a call site's sigma, when all folded
    # Folding leaves some denoiser tensors (the noise-embedding MLP, sigma-only constants) unread: drop them.
    used = {i for node in gb.nodes for i in node.input} | set(also_read)
    initializers = [t for t in weights + decode_weights + gb.initializers if t.name in used]
    graph = helper.make_graph(gb.nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=list(denoiser_model.opset_import), producer_name="iia")
    model.ir_version = denoiser_model.ir_version
    for fn in denoiser_model.functions:
        model.functions.append(fn)
    if decoder_model is not None:
        _merge_opsets(model, decoder_model)
    _strip_node_metadata(model.graph)
    return model


def _strip_node_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node metadata (stack traces, source paths; ~1.5 KB a node, copied per call site):
    it would bloat the artifact and leak the compiling machine's paths."""
    for node in graph.node:
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_node_metadata(attr.g)
            for sub in attr.graphs:
                _strip_node_metadata(sub)


def _merge_opsets(model: onnx.ModelProto, other: onnx.ModelProto) -> None:
    have = {o.domain: o for o in model.opset_import}
    for o in other.opset_import:
        if o.domain not in have:
            model.opset_import.append(o)
        elif have[o.domain].version != o.version:
            raise EmitError(f"the decode graph uses opset {o.version} of domain '{o.domain or 'ai.onnx'}', the "
                            f"denoiser {have[o.domain].version}")


def decoded_shape(decoder_model: onnx.ModelProto) -> tuple[int, int, int]:
    """(H, W, C) of the decode stage's uint8 output (static after export)."""
    dims = decoder_model.graph.output[0].type.tensor_type.shape.dim
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(values) != 4 or any(v is None for v in values[1:]):
        raise EmitError(f"the decode stage's output must be uint8 [B, H, W, C] with static H, W, C, got {values}")
    return values[1], values[2], values[3]


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all stored tensors: initializers plus tensor-valued Constant nodes, subgraphs included (what
    weight sharing bounds)."""
    return _graph_bytes(model.graph)


def _graph_bytes(graph: onnx.GraphProto) -> int:
    """Stored bytes of a graph and of its subgraphs (a Loop body holds the loop-form denoiser's weights)."""
    total = 0
    for t in graph.initializer:
        total += numpy_helper.to_array(t).nbytes if not t.external_data else _external_size(t)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                total += numpy_helper.to_array(a.t).nbytes
            elif a.type == onnx.AttributeProto.GRAPH:
                total += _graph_bytes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                total += sum(_graph_bytes(g) for g in a.graphs)
    return total


def _external_size(t: onnx.TensorProto) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return 0


GRAPH_FORMS = ("unrolled", "loop")


def linear_form(program: Program) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every value of a Program as a linear combination of [noise, D_0, ..., D_{N-1}] (float64).

    Denoise ops are numbered i = 0..N-1 in program order. Returns (state [N, N+1], sigmas [N], output [N+1],
    calls): row i of `state` is the coefficient vector of call i's input x_i (nonzero only on noise and
    D_j, j < i), `output` that of the program's output. EmitError if a value is read before it is defined.
    """
    calls = [op for op in program.ops() if isinstance(op, Denoise)]
    n = len(calls)
    values: dict[str, np.ndarray] = {"noise": np.eye(n + 1)[0]}
    state, sigmas = np.zeros((n, n + 1)), np.zeros(n)
    i = 0
    for op in program.ops():
        try:
            if isinstance(op, Denoise):
                state[i], sigmas[i] = values[op.state], op.sigma
                values[op.out] = np.eye(n + 1)[1 + i]
                i += 1
            else:
                values[op.out] = sum((w * values[name] for name, w in op.terms), np.zeros(n + 1))
        except KeyError as err:
            raise EmitError(f"program reads {err} before defining it") from None
    if program.output not in values:
        raise EmitError(f"program output {program.output} is never defined")
    return state, sigmas, values[program.output], calls


def live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` (topologically sorted) without those whose outputs nothing reads: a value every reader of
    which was folded away (sigma once all of sigma's uses are tables) would otherwise be computed at every
    iteration (ONNX Runtime does not prune a Loop body)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed |= subgraph_inputs(node)
    return kept[::-1]


def _mix(gb: GraphBuilder, coef: str, buf: str, shape_of: str) -> str:
    """coef . buf reshaped to the noise's shape: coef float32 [1, N+1], buf [N+1, B*prod(shape)] (row 0 the
    noise, row j+1 the output of denoiser call j): one MatMul per combination."""
    return gb.node("Reshape", [gb.node("MatMul", [coef, buf]), shape_of])


def _gather_label_tables(body: GraphBuilder, outer: GraphBuilder, groups: dict, it: str, batch: str) -> dict[str, str]:
    """Per-label tables [NFE, label_dim, c_k, *rest] read at (iteration, class_labels[b]) -> [B, c_k, *rest].

    Tables with the same dtype and trailing shape are concatenated along c and read with ONE GatherND, then
    Split (the per-block scale/shift vectors of a UNet are dozens of small values: one kernel instead of one
    each). The [NFE, B, 2] index tensor is built once, before the loop, from the labels `check_labels`
    admitted.
    """
    n = next(iter(groups.values()))[0][1].shape[0]
    shape = outer.node("Concat", [outer.const(np.array([n], np.int64), np.int64), batch,
                                  outer.const(np.array([1], np.int64), np.int64)], axis=0)
    steps = outer.node("Expand", [outer.const(np.arange(n, dtype=np.int64).reshape(n, 1, 1), np.int64), shape])
    labels = outer.node("Expand", [outer.node("Unsqueeze", [CHECKED_LABELS, outer.const(np.array([0, 2], np.int64), np.int64)]),
                                   shape])
    indices = outer.node("Concat", [steps, labels], "iia/step_label", axis=2)  # [NFE, B, 2], made once
    index = body.node("Gather", [indices, it], axis=0)  # [B, 2]: (i, class_labels[b])
    mapping = {}
    for (_, rest), members in groups.items():
        if rest is None or len(members) == 1:  # [NFE, label_dim] scalars per image, or a lone table
            for value, rows in members:
                mapping[value] = body.node("GatherND", [outer.const(rows, rows.dtype), index])
            continue
        table = np.concatenate([rows for _, rows in members], axis=2)
        gathered = body.node("GatherND", [outer.const(table, table.dtype), index])
        sizes = outer.const(np.array([rows.shape[2] for _, rows in members], np.int64), np.int64)
        outs = [body.fresh("label_value") for _ in members]
        body.nodes.append(helper.make_node("Split", [gathered, sizes], outs, name=outs[0], axis=1))
        mapping.update({value: out for (value, _), out in zip(members, outs)})
    return mapping


@dataclass(frozen=True)
class ScalarIO:
    """A denoiser whose input x and output D enter only as D = c_skip * x + c_out * F with net input c_in * x
    (EDM's preconditioning, Karras et al. 2022 eq. 7), c_skip/c_out/c_in folded per-call scalars: the loop can
    then carry the raw network outputs F instead of D and fold the three scalings into its coefficients."""
    nodes: frozenset[int]  # the two x products, the F product and the sum: not emitted
    net_input: str  # c_in * x
    raw_output: str  # F
    c_in: np.ndarray  # [NFE] float64
    c_skip: np.ndarray
    c_out: np.ndarray


def scalar_io(graph: onnx.GraphProto, plan: FoldPlan, sigmas: list[float]) -> ScalarIO | None:
    """Find D = Add(Mul(x, c_skip), Mul(F, c_out)) with x read only by that Mul and Mul(x, c_in), all three
    scalings folded to one number per call; None when the graph is not of that form."""
    if not plan.values:
        return None
    readers: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        for name in set(node.input):
            readers.setdefault(name, []).append(k)
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    folded = plan.values[sigmas[0]]

    def scalar_mul(k: int, operand: str) -> str | None:
        """The folded scalar that node k multiplies `operand` by, if it is such a Mul."""
        node = graph.node[k]
        if node.op_type != "Mul" or node.domain not in DEFAULT_DOMAINS or len(node.input) != 2 or operand not in node.input:
            return None
        other = node.input[1] if node.input[0] == operand else node.input[0]
        if other == operand or other not in folded:
            return None
        if any(plan.values[s][other][0].size != 1 or plan.values[s][other][1] == LABEL for s in sigmas):
            return None
        return other

    out = graph.output[0].name
    add = producer.get(out)
    x_readers = readers.get(DENOISER_X, [])
    if (add is None or graph.node[add].op_type != "Add" or len(x_readers) != 2 or len(graph.node[add].input) != 2
            or readers.get(out)):  # D read inside the graph too: it must exist
        return None
    a, b = graph.node[add].input
    for skip_out, f_out in ((a, b), (b, a)):
        skip_k, f_k = producer.get(skip_out), producer.get(f_out)
        if skip_k not in x_readers or f_k is None or readers.get(skip_out) != [add] or readers.get(f_out) != [add]:
            continue
        c_skip = scalar_mul(skip_k, DENOISER_X)
        in_k = next(k for k in x_readers if k != skip_k)
        c_in = scalar_mul(in_k, DENOISER_X)
        f_node = graph.node[f_k]
        raw = [i for i in f_node.input if i not in folded]
        if c_skip is None or c_in is None or len(raw) != 1 or (c_out := scalar_mul(f_k, raw[0])) is None:
            continue
        value = lambda name: np.array([float(plan.values[s][name][0].reshape(())) for s in sigmas])
        return ScalarIO(frozenset({skip_k, in_k, f_k, add}), graph.node[in_k].output[0], raw[0],
                        value(c_in), value(c_skip), value(c_out))
    return None


def raw_output_basis(state: np.ndarray, out_coef: np.ndarray, io: ScalarIO) -> tuple[np.ndarray, np.ndarray]:
    """`linear_form`'s rows over [noise, D_0..D_{N-1}] rewritten over [noise, F_0..F_{N-1}] with
    D_j = c_skip_j x_j + c_out_j F_j (float64): (network inputs c_in_i x_i [N, N+1], output [N+1])."""
    n = len(state)
    basis = np.zeros((n + 1, n + 1))  # row k: the k-th [noise, D_0..] vector over [noise, F_0..]
    basis[0, 0] = 1.0
    x = np.zeros((n, n + 1))
    for i in range(n):
        x[i] = state[i] @ basis  # x_i reads D_j for j < i only: rows already filled
        basis[i + 1] = io.c_skip[i] * x[i]
        basis[i + 1, i + 1] += io.c_out[i]
    return io.c_in[:, None] * x, out_coef @ basis


def emit_sampler_loop(program: Program, denoiser_model: onnx.ModelProto, shape: tuple[int, ...], conditional: bool,
                      name: str = "iia_sampler", fold: bool = True, decoder_model: onnx.ModelProto | None = None,
                      latent: bool = False, label_dim: int = 0, plan: FoldPlan | None = None) -> onnx.ModelProto:
    """The same sampler as `emit_sampler`, as ONE ONNX `Loop` of NFE iterations around ONE copy of the denoiser.

    The loop carries one flat buffer [NFE + 1, B * prod(shape)]: row 0 the noise, row j + 1 the output D_j of
    denoiser call j. Iteration i computes x_i = a_i * noise + sum_j b_ij D_j (`linear_form`) as ONE MatMul of
    the coefficient row [a_i, b_i] with the buffer, D_i = denoiser(x_i, sigma_i), and writes D_i into row
    i + 1 (ScatterND); after the loop the output is the same product with the output's row. The rows, sigma
    and the folded conditioning values (fold.py) are [NFE, ...] tables gathered by the iteration counter
    (per-label values: [NFE, label_dim, ...] tables gathered at (i, class_labels[b]) with GatherND). Same
    interface and outputs as `emit_sampler`.
    """
    dgraph = denoiser_model.graph
    _check_denoiser_graph(dgraph)
    if conditional != (len(dgraph.input) == 3):
        raise EmitError("denoiser graph's inputs do not match the model's conditioning")
    state, sigmas, out_coef, calls = linear_form(program)
    n = len(calls)
    if n == 0:
        raise EmitError("program has no denoiser calls")
    if plan is None:
        plan = plan_folding(denoiser_model, [op.sigma for op in calls], label_dim) if fold else FoldPlan()
    dgraph = (plan.model or denoiser_model).graph
    io = scalar_io(dgraph, plan, [op.sigma for op in calls])
    if io is not None:  # carry F, not D: c_in, c_skip, c_out move into the coefficients
        state, out_coef = raw_output_basis(state, out_coef, io)

    outer = GraphBuilder()
    batch = outer.node("Shape", [NOISE], "iia/batch", start=0, end=1)
    if conditional:
        check_labels(outer, batch, label_dim)
    noise_shape = outer.node("Shape", [NOISE], "iia/noise_shape")
    noise_row = outer.node("Reshape", [NOISE, outer.const(np.array([1, -1], np.int64), np.int64)])
    zeros_shape = outer.node("Concat", [outer.const(np.array([n], np.int64), np.int64),
                                        outer.node("Shape", [noise_row], start=1)], axis=0)
    zeros = outer.node("ConstantOfShape", [zeros_shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    buf0 = outer.node("Concat", [noise_row, zeros], "iia/D_init", axis=0)  # [NFE + 1, B * prod(shape)]
    coef_table = outer.const(state.astype(np.float32).reshape(n, 1, n + 1))  # row i: x_i over [noise, D_0..]
    row_table = outer.const(np.arange(1, n + 1, dtype=np.int64).reshape(n, 1, 1), np.int64)
    s_table = outer.const(sigmas.astype(np.float32))

    body = GraphBuilder()
    body._count = 10**6  # body value names never collide with the outer graph's
    body._consts, body.initializers = outer._consts, outer.initializers  # constants live in the outer graph
    it, cond, dbuf = "iia/loop/i", "iia/loop/cond", "iia/loop/D"
    x = _mix(body, body.node("Gather", [coef_table, it], axis=0), dbuf, noise_shape)
    sigma = body.node("Expand", [body.node("Unsqueeze", [body.node("Gather", [s_table, it], axis=0),
                                                         body.const(np.array([0], np.int64), np.int64)]), batch])
    shared = {t.name for t in dgraph.initializer}
    out = "iia/loop/D_i"
    mapping = {DENOISER_X: x, DENOISER_SIGMA: sigma, DENOISER_LABELS: CHECKED_LABELS, dgraph.output[0].name: out}
    skip = (plan.foldable_nodes if plan.values else set()) | (io.nodes if io else set())
    if io is not None:
        mapping.update({io.net_input: x, io.raw_output: out})
    read = {i for k, node in enumerate(dgraph.node) if k not in skip for i in node.input}
    label_groups: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for value in (plan.values[calls[0].sigma] if plan.values else {}):
        if value not in read:
            continue
        rows = np.stack([plan.values[op.sigma][value][0] for op in calls])
        kind = plan.values[calls[0].sigma][value][1]
        if kind == LABEL:  # [NFE, label_dim, ...]: gathered below, one GatherND per group of like tables
            label_groups.setdefault((rows.dtype.str, rows.shape[3:] if rows.ndim > 2 else None), []).append((value, rows))
            continue
        row = body.node("Gather", [outer.const(rows, rows.dtype), it], axis=0)
        if kind == BATCH:
            tail = outer.const(np.array(rows.shape[2:], dtype=np.int64), np.int64)
            row = body.node("Expand", [row, body.node("Concat", [batch, tail], axis=0)])
        mapping[value] = row
    if label_groups:
        mapping.update(_gather_label_tables(body, outer, label_groups, it, batch))

    def rename(value: str) -> str:
        return value if not value or value in shared else mapping.get(value, "iia/loop/den/" + value)

    for k, node in enumerate(dgraph.node):
        if k in skip:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = "iia/loop/den/" + (node.name or f"{node.op_type}_{k}")
        copy.input[:] = [rename(v) for v in node.input]
        copy.output[:] = [rename(v) for v in node.output]
        body.nodes.append(copy)
    update = body.node("Reshape", [out, body.const(np.array([1, -1], np.int64), np.int64)])
    body.node("ScatterND", [dbuf, body.node("Gather", [row_table, it], axis=0), update], "iia/loop/D_next")
    body.node("Identity", [cond], "iia/loop/cond_out")
    body.nodes = live_nodes(body.nodes, {"iia/loop/cond_out", "iia/loop/D_next"})  # e.g. sigma, when all folded
    known = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", *shape])]
    if any(sigma in node.input for node in body.nodes):
        known.append(helper.make_tensor_value_info(sigma, TensorProto.FLOAT, ["batch"]))
    for info in dgraph.value_info:  # the denoiser's inferred shapes, renamed (ONNX Runtime's layout passes need ranks)
        if rename(info.name) not in (x, sigma) and not info.name in mapping:
            renamed = onnx.ValueInfoProto()
            renamed.CopyFrom(info)
            renamed.name = rename(info.name)
            known.append(renamed)
    body_graph = helper.make_graph(
        body.nodes, "iia_denoiser_loop_body",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(dbuf, TensorProto.FLOAT, [n + 1, "batch_elements"])],
        [helper.make_tensor_value_info("iia/loop/cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("iia/loop/D_next", TensorProto.FLOAT, [n + 1, "batch_elements"])],
        value_info=known,
        initializer=[t for t in dgraph.initializer if t.name in {i for node in body.nodes for i in node.input}])
    trip = outer.const(np.array(n, np.int64), np.int64)
    true = outer.const(np.array(True), np.bool_)
    outer.nodes.append(helper.make_node("Loop", [trip, true, buf0], ["iia/D"], name="iia/loop", body=body_graph))
    result = _mix(outer, outer.const(out_coef.astype(np.float32).reshape(1, n + 1)), "iia/D", noise_shape)
    body_reads = {i for node in body.nodes for i in node.input} - {t.name for t in body_graph.initializer}
    return _finish_model(outer, result, shape, conditional, name, denoiser_model, decoder_model, latent,
                         weights=[], also_read=frozenset(body_reads))
