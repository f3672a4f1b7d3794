"""Emit the unrolled sampler as ONE ONNX graph around the once-exported denoiser (`--graph unrolled`; the Loop
form, `--graph loop`, is compiler/emit_loop.py, built on this module's calls, checks and `_finish_model`).

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

import numpy as np
import onnx
from onnx import TensorProto, helper

from iia.calibration.solvers import Combine, Denoise, Program
from iia.runtime.program import ProgramError, linear_form as program_linear_form
from iia.runtime.contract import (DECODER_SAMPLES, DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, GUIDANCE, IMAGES,
                                  IMAGES_U8, LABELS, LATENTS, NOISE)

from .export import decoded_shape
from .fold import BATCH, LABEL, FoldPlan
from .graph import GraphBuilder, initializer_bytes, live_nodes, reads  # noqa: F401 (initializer_bytes: build.py)
from .guidance_graph import CHECKED_GUIDANCE, ScaleInputs, check_guidance, hat_weights_node, per_image_weight
from .passes import optimize_decoder

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


def _value(name: str) -> str:
    return f"v/{name}"


def emit_combine(gb: GraphBuilder, op: Combine, weight_of=None) -> None:
    """op.out = sum of weight * value over op.terms; `weight_of(w)` -> the value name of a weight (default: a
    float32 constant)."""
    if not op.terms:
        raise EmitError(f"empty combination for {op.out}")
    weight_of = weight_of or gb.const
    products = [gb.node("Mul", [_value(name), weight_of(weight)]) for name, weight in op.terms]
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
    A guided denoiser's `guidance` input reads the checked per-image scales (guidance_graph.check_guidance).
    """
    shared = {t.name for t in denoiser.initializer}
    mapping = {DENOISER_X: _value(state), DENOISER_SIGMA: sigma, DENOISER_LABELS: CHECKED_LABELS,
               GUIDANCE: CHECKED_GUIDANCE, denoiser.output[0].name: _value(out)}
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


def _copy_node(node: onnx.NodeProto, prefix: str, rename, unnamed: str | None = None) -> onnx.NodeProto:
    """A copy of `node` named `prefix` + its name (`unnamed`, default its op type, when it has none), its
    value names mapped through `rename`."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = prefix + (node.name or unnamed or node.op_type)
    copy.input[:] = [rename(n) for n in node.input]
    copy.output[:] = [rename(n) for n in node.output]
    return copy


def emit_decode(gb: GraphBuilder, decoder: onnx.GraphProto, source: str, out: str) -> list[onnx.TensorProto]:
    """Append the decode stage's nodes reading `source` and writing `out`; returns its initializers, renamed
    with DECODE_PREFIX (its weights are stored once, apart from the denoiser's)."""
    inputs = [i.name for i in decoder.input]
    if inputs != [DECODER_SAMPLES] or len(decoder.output) != 1:
        raise EmitError(f"decode graph must take ({DECODER_SAMPLES}) and give one output, has {inputs}")
    mapping = {DECODER_SAMPLES: source, decoder.output[0].name: out}

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


def emit_sampler(program: Program, denoiser_model: onnx.ModelProto, shape: tuple[int, ...], conditional: bool, *,
                 plan: FoldPlan, name: str = "iia_sampler", decoder_model: onnx.ModelProto | None = None,
                 latent: bool = False, label_dim: int = 0, scales: ScaleInputs | None = None) -> onnx.ModelProto:
    """The whole fixed-NFE sampler as one ONNX model (weights shared with `denoiser_model`).

    `plan` (`fold.plan_folding` on this denoiser and the program's sigmas, or `FoldPlan()` for the denoiser
    as exported, nothing folded): each call site copies `plan.model` (the denoiser after the graph passes)
    with its conditioning subgraph replaced by the plan's constant values or, for a conditional model given
    its `label_dim`, per-label tables (see fold.py).
    `decoder_model` (the model's decode stage, see export.export_decoder) adds the `images_uint8` output;
    `latent` names the float output `latents` instead of `images`.
    `scales` (a guidance range): the graph takes `guidance` float32 [B] (checked by `check_guidance`), each
    guided call reads it, and a combination weight given per node becomes each image's interpolant
    (`per_image_weight`); `program` then gives only the time steps, which the nodes share.
    """
    dgraph = denoiser_model.graph
    _check_denoiser_graph(dgraph)
    if len(dgraph.input) != 2 + conditional + (scales is not None):
        raise EmitError("denoiser graph's inputs do not match the model's conditioning and guidance input")
    gb = GraphBuilder()
    batch = gb.node("Shape", [NOISE], "iia/batch", start=0, end=1)
    if conditional:
        check_labels(gb, batch, label_dim)
    dgraph = (plan.model or denoiser_model).graph
    gb.nodes.append(helper.make_node("Identity", [NOISE], [_value("noise")], name="iia/noise"))
    sigma_names: dict[float, str] = {}
    site = 0
    ops, output = program.ops(), program.output
    weights = None
    if scales is not None:
        weights = hat_weights_node(gb, check_guidance(gb, batch, scales.lo, scales.hi), scales.slopes)
        ops, output = list(scales.plan.flat().ops), scales.plan.output
    for op in ops:
        if isinstance(op, Denoise):
            if op.sigma not in sigma_names:
                sigma_names[op.sigma] = gb.node("Expand", [gb.const([op.sigma]), batch], f"iia/sigma_{len(sigma_names)}")
            emit_call(gb, dgraph, site, op.state, sigma_names[op.sigma], op.out,
                      plan.values.get(op.sigma), plan.foldable_nodes)
            site += 1
        elif weights is not None:
            emit_combine(gb, op, lambda w: per_image_weight(gb, weights, w, batch, len(shape)))
        else:
            emit_combine(gb, op)
    return _finish_model(gb, _value(output), shape, conditional, name, denoiser_model, decoder_model, latent,
                         weights=list(dgraph.initializer))


def _finish_model(gb: GraphBuilder, source: str, shape: tuple[int, ...], conditional: bool, name: str,
                  denoiser_model: onnx.ModelProto, decoder_model: onnx.ModelProto | None, latent: bool,
                  weights: list[onnx.TensorProto], body_weights: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """The model around `gb`'s nodes: `source` as the samples output, the decode stage, inputs, and the
    initializers that are read (by gb's nodes or their subgraphs), from `weights` and gb's constants;
    `body_weights` go into the Loop body (LOOP_NODE). The tensors are copied once, into the finished model
    (protobuf copies a message on every assignment: weights added earlier would be copied at each level)."""
    samples = LATENTS if latent else IMAGES
    gb.nodes.append(helper.make_node("Identity", [source], [samples], name=f"iia/{samples}"))
    outputs = [helper.make_tensor_value_info(samples, TensorProto.FLOAT, ["batch", *shape])]
    decode_weights: list[onnx.TensorProto] = []
    if decoder_model is not None:
        decoder = optimize_decoder(decoder_model.graph)  # a VAE's last convolution (C -> 3), see passes/small_convs
        decode_weights = emit_decode(gb, decoder, samples, IMAGES_U8)
        h, w, c = decoded_shape(decoder_model)
        outputs.append(helper.make_tensor_value_info(IMAGES_U8, TensorProto.UINT8, ["batch", h, w, c]))
    inputs = [helper.make_tensor_value_info(NOISE, TensorProto.FLOAT, ["batch", *shape])]
    if conditional:
        inputs.append(helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["batch"]))
    if any(GUIDANCE in node.input for node in gb.nodes):
        inputs.append(helper.make_tensor_value_info(GUIDANCE, TensorProto.FLOAT, ["batch"]))
    gb.nodes = live_nodes(gb.nodes, {o.name for o in outputs})  # e.g. a call site's sigma, when all folded
    # Folding leaves some denoiser tensors (the noise-embedding MLP, sigma-only constants) unread: drop them.
    used = reads(gb.nodes)
    initializers = [t for t in weights + decode_weights + gb.initializers if t.name in used]
    model = helper.make_model(helper.make_graph(gb.nodes, name, inputs, outputs),
                              opset_imports=list(denoiser_model.opset_import), producer_name="iia")
    model.graph.initializer.extend(initializers)
    if body_weights:
        loop = next(node for node in model.graph.node if node.name == LOOP_NODE)
        next(a for a in loop.attribute if a.name == "body").g.initializer.extend(body_weights)
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


GRAPH_FORMS = ("unrolled", "loop")  # the loop form: compiler/emit_loop.py
LOOP_NODE = "iia/loop"  # the Loop node of the loop form (its body's weights are placed by `_finish_model`)
# The unrolled form holds one copy of the denoiser's nodes per call. ONNX Runtime's session creation grows faster
# than the node count and cannot be interrupted (tester-42: 1000 calls of the digits model, 317,990 nodes, hung the
# parity check for 10+ minutes through Ctrl-C and SIGTERM); past this many nodes the loop form is asked for instead.
MAX_UNROLLED_NODES = 100_000


def unrolled_size_error(nfe: int, denoiser_nodes: int) -> str | None:
    """Why `--graph unrolled` is refused for `nfe` calls of a denoiser of `denoiser_nodes` nodes (None: it is not):
    over MAX_UNROLLED_NODES nodes in all."""
    if nfe * denoiser_nodes <= MAX_UNROLLED_NODES:
        return None
    return (f"--graph unrolled at NFE {nfe}: {nfe} copies of the denoiser's {denoiser_nodes} nodes (~"
            f"{nfe * denoiser_nodes:,}) are over the {MAX_UNROLLED_NODES:,} ONNX Runtime loads in reasonable time "
            f"(and cannot be interrupted while it does); use --graph loop (the default: one copy)")


def linear_form(program: Program) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Denoise]]:
    """`iia.runtime.program.linear_form` of the program's plan (EmitError if it reads a value before defining it)."""
    try:
        return program_linear_form(program.plan())
    except ProgramError as err:
        raise EmitError(str(err)) from None
