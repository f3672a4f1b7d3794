"""Emit the sampler as ONE ONNX `Loop` of NFE iterations around ONE copy of the denoiser (`--graph loop`, the
default): the same `Program` as `emit.emit_sampler` (the unrolled form), from its linear form (`emit.linear_form`:
every call's input a combination of the noise and the earlier outputs), with one flat buffer
[NFE + 1, B * prod(shape)] carried through the loop and the conditioning values folded into per-step tables
(`fold.FoldPlan`), read per iteration (and per class label: `_gather_label_tables`). Interface as in `emit`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from iia.calibration.solvers import Program
from iia.runtime.contract import DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, GUIDANCE, NOISE

from .emit import (CHECKED_LABELS, LOOP_NODE, EmitError, _check_denoiser_graph, _copy_node, _finish_model,
                   check_labels, linear_form)
from .fold import BATCH, LABEL, FoldPlan
from .graph import GraphBuilder, live_nodes, reads
from .guidance_graph import (CHECKED_GUIDANCE, ScaleInputs, check_guidance, hat_weights_node, per_image_buffer,
                             per_image_rows)
from .passes.scalar_io import raw_output_basis, scalar_io
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


def emit_sampler_loop(program: Program, denoiser_model: onnx.ModelProto, shape: tuple[int, ...], conditional: bool,
                      *, plan: FoldPlan, name: str = "iia_sampler", decoder_model: onnx.ModelProto | None = None,
                      latent: bool = False, label_dim: int = 0, scales: ScaleInputs | None = None) -> onnx.ModelProto:
    """The same sampler as `emit_sampler`, as ONE ONNX `Loop` of NFE iterations around ONE copy of the denoiser.

    The loop carries one flat buffer [NFE + 1, B * prod(shape)]: row 0 the noise, row j + 1 the output D_j of
    denoiser call j. Iteration i computes x_i = a_i * noise + sum_j b_ij D_j (`linear_form`) as ONE MatMul of
    the coefficient row [a_i, b_i] with the buffer, D_i = denoiser(x_i, sigma_i), and writes D_i into row
    i + 1 (ScatterND); after the loop the output is the same product with the output's row. The rows, sigma
    and the folded conditioning values (fold.py) are [NFE, ...] tables gathered by the iteration counter
    (per-label values: [NFE, label_dim, ...] tables gathered at (i, class_labels[b]) with GatherND). Under
    EDM's preconditioning (passes/scalar_io.py) the buffer holds the raw network outputs F_j instead of D_j.
    Same interface, `plan` and outputs as `emit_sampler`.

    `scales` (a guidance range): the graph takes `guidance` float32 [B] (checked by `check_guidance`), the
    denoiser's last input; before the loop each image's hat weights over the nodes and, from them and the
    plan's per-node weights, its rows [N, B, 1, N+1] are computed (`per_image_rows`); the buffer is batch-major
    [B, N+1, prod(shape)] (`per_image_buffer`), so iteration i mixes row i of each image with its buffer in ONE
    batched MatMul and scatters D_i per image. `program` then gives only the time steps, which the nodes share.
    """
    _check_denoiser_graph(denoiser_model.graph)
    if len(denoiser_model.graph.input) != 2 + conditional + (scales is not None):
        raise EmitError("denoiser graph's inputs do not match the model's conditioning and guidance input")
    state, sigmas, out_coef, calls = linear_form(program)
    n = len(calls)
    if n == 0:
        raise EmitError("program has no denoiser calls")
    dgraph = (plan.model or denoiser_model).graph
    # a range interpolates rows over [noise, D_0..]; carrying F instead would change the basis per node
    io = scalar_io(dgraph, plan, [op.sigma for op in calls]) if scales is None else None
    if io is not None:  # carry F, not D: c_in, c_skip, c_out move into the coefficients
        state, out_coef = raw_output_basis(state, out_coef, io)

    outer = GraphBuilder()
    batch = outer.node("Shape", [NOISE], "iia/batch", start=0, end=1)
    if conditional:
        check_labels(outer, batch, label_dim)
    per_image = None
    if scales is not None:  # each image's rows [N, B, 1, N+1] and output row [B, 1, N+1], from its scale
        weights = hat_weights_node(outer, check_guidance(outer, batch, scales.lo, scales.hi), scales.slopes)
        per_image = per_image_rows(outer, weights, scales.plan, batch)
    noise_shape = outer.node("Shape", [NOISE], "iia/noise_shape")
    if per_image is None:
        noise_row = outer.node("Reshape", [NOISE, outer.const(np.array([1, -1], np.int64), np.int64)])
        zeros_shape = outer.node("Concat", [outer.const(np.array([n], np.int64), np.int64),
                                            outer.node("Shape", [noise_row], start=1)], axis=0)
        zeros = outer.node("ConstantOfShape", [zeros_shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
        buf0 = outer.node("Concat", [noise_row, zeros], "iia/D_init", axis=0)  # [NFE + 1, B * prod(shape)]
        rows = outer.const(state.astype(np.float32).reshape(n, 1, n + 1))  # x_i's row
        targets = outer.const(np.arange(1, n + 1, dtype=np.int64).reshape(n, 1, 1), np.int64)  # buffer row of D_i
    else:  # [B, NFE + 1, prod(shape)]: each image's rows mixed by ONE batched MatMul, D_i scattered per image
        rows = per_image[0]
        buf0, targets = per_image_buffer(outer, n, batch)
    tables = (rows, targets, outer.const(sigmas.astype(np.float32)))
    body_graph, body_weights = _loop_body(outer, dgraph, plan, io, calls, tables, batch, noise_shape, shape,
                                          per_image is not None)
    trip = outer.const(np.array(n, np.int64), np.int64)
    true = outer.const(np.array(True), np.bool_)
    outer.nodes.append(helper.make_node("Loop", [trip, true, buf0], ["iia/D"], name=LOOP_NODE, body=body_graph))
    if per_image is None:
        result = _mix(outer, outer.const(out_coef.astype(np.float32).reshape(1, n + 1)), "iia/D", noise_shape)
    else:
        result = _mix(outer, per_image[1], "iia/D", noise_shape)
    return _finish_model(outer, result, shape, conditional, name, denoiser_model, decoder_model, latent, weights=[],
                         body_weights=body_weights)


LOOP_IT, LOOP_COND, LOOP_BUFFER = "iia/loop/i", "iia/loop/cond", "iia/loop/D"
LOOP_D, LOOP_COND_OUT, LOOP_BUFFER_OUT = "iia/loop/D_i", "iia/loop/cond_out", "iia/loop/D_next"


def _loop_body(outer: GraphBuilder, dgraph: onnx.GraphProto, plan: FoldPlan, io, calls: list, tables: tuple,
               batch: str, noise_shape: str, shape: tuple[int, ...],
               per_image: bool = False) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
    """The Loop body: mix x_i from the buffer (`per_image`: a guidance range's batch-major buffer, a row per
    image, see `guidance_graph.per_image_buffer`), the denoiser copy
    (folded values gathered at the iteration, EDM's scalings dropped under `io`), D_i (or F_i) scattered into
    the buffer. Its constants go to `outer`. Returns the body without its initializers, and them (the denoiser's
    weights it reads, added by `_finish_model`)."""
    coef_table, row_table, s_table = tables
    n = len(calls)
    body = outer.inner(10**6)  # body value names never collide with the outer graph's
    it = LOOP_IT
    rows = body.node("Gather", [coef_table, it], axis=0)
    x = _mix(body, rows, LOOP_BUFFER, noise_shape)  # [1, N+1] @ [N+1, B*K], or per image [B, 1, N+1] @ [B, N+1, K]
    sigma = body.node("Expand", [body.node("Unsqueeze", [body.node("Gather", [s_table, it], axis=0),
                                                         body.const(np.array([0], np.int64), np.int64)]), batch])
    shared = {t.name for t in dgraph.initializer}
    mapping = {DENOISER_X: x, DENOISER_SIGMA: sigma, DENOISER_LABELS: CHECKED_LABELS, dgraph.output[0].name: LOOP_D}
    if per_image:
        mapping[GUIDANCE] = CHECKED_GUIDANCE
    skip = (plan.foldable_nodes if plan.values else set()) | (io.nodes if io else set())
    if io is not None:
        mapping.update({io.net_input: x, io.raw_output: LOOP_D})
    read = {i for k, node in enumerate(dgraph.node) if k not in skip for i in node.input}
    mapping.update(_folded_rows(body, outer, plan, calls, read, batch))

    def rename(value: str) -> str:
        return value if not value or value in shared else mapping.get(value, "iia/loop/den/" + value)

    for k, node in enumerate(dgraph.node):
        if k not in skip:
            body.nodes.append(_copy_node(node, "iia/loop/den/", rename, f"{node.op_type}_{k}"))
    update = body.node("Reshape", [LOOP_D, body.const(np.array([0 if per_image else 1, -1], np.int64), np.int64)])
    body.node("ScatterND", [LOOP_BUFFER, body.node("Gather", [row_table, it], axis=0), update], LOOP_BUFFER_OUT)
    body.node("Identity", [LOOP_COND], LOOP_COND_OUT)
    body.nodes = live_nodes(body.nodes, {LOOP_COND_OUT, LOOP_BUFFER_OUT})  # e.g. sigma, when all folded
    known = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", *shape])]
    if any(sigma in node.input for node in body.nodes):
        known.append(helper.make_tensor_value_info(sigma, TensorProto.FLOAT, ["batch"]))
    for info in dgraph.value_info:  # the denoiser's inferred shapes, renamed (ONNX Runtime's layout passes need ranks)
        if rename(info.name) not in (x, sigma) and not info.name in mapping:
            renamed = onnx.ValueInfoProto()
            renamed.CopyFrom(info)
            renamed.name = rename(info.name)
            known.append(renamed)
    used = reads(body.nodes)
    buffer_shape = ["batch", n + 1, "elements"] if per_image else [n + 1, "batch_elements"]
    return helper.make_graph(
        body.nodes, "iia_denoiser_loop_body",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(LOOP_COND, TensorProto.BOOL, []),
         helper.make_tensor_value_info(LOOP_BUFFER, TensorProto.FLOAT, buffer_shape)],
        [helper.make_tensor_value_info(LOOP_COND_OUT, TensorProto.BOOL, []),
         helper.make_tensor_value_info(LOOP_BUFFER_OUT, TensorProto.FLOAT, buffer_shape)],
        value_info=known), [t for t in dgraph.initializer if t.name in used]


def _folded_rows(body: GraphBuilder, outer: GraphBuilder, plan: FoldPlan, calls: list, read: set[str],
                 batch: str) -> dict[str, str]:
    """Denoiser value name -> the body value holding its folded row at the iteration, for the folded values
    the remaining nodes read: [NFE, ...] tables gathered by the counter (BATCH rows expanded to the batch),
    per-label tables through `_gather_label_tables`."""
    mapping: dict[str, str] = {}
    label_groups: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for value in (plan.values[calls[0].sigma] if plan.values else {}):
        if value not in read:
            continue
        rows = np.stack([plan.values[op.sigma][value][0] for op in calls])
        kind = plan.values[calls[0].sigma][value][1]
        if kind == LABEL:  # [NFE, label_dim, ...]: gathered below, one GatherND per group of like tables
            label_groups.setdefault((rows.dtype.str, rows.shape[3:] if rows.ndim > 2 else None), []).append((value, rows))
            continue
        row = body.node("Gather", [outer.const(rows, rows.dtype), LOOP_IT], axis=0)
        if kind == BATCH:
            tail = outer.const(np.array(rows.shape[2:], dtype=np.int64), np.int64)
            row = body.node("Expand", [row, body.node("Concat", [batch, tail], axis=0)])
        mapping[value] = row
    if label_groups:
        mapping.update(_gather_label_tables(body, outer, label_groups, LOOP_IT, batch))
    return mapping
