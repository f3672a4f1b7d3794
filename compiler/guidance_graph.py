"""The graph side of a guidance range (compiler/scales.py): the checked per-image `guidance` input, the hat
weights over the nodes computed from it once, and the per-image mix of coefficient rows with the loop's flat
buffer (emit_loop.emit_sampler_loop uses them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, numpy_helper

from iia.runtime.contract import GUIDANCE, NOISE
from iia.runtime.program import Denoise, Plan

from .graph import GraphBuilder

CHECKED_GUIDANCE = "iia/guidance_checked"  # guidance after check_guidance: what the weights and every call read


def check_guidance(gb: GraphBuilder, batch: str, lo: float, hi: float) -> str:
    """Make the graph refuse guidance scales outside [lo, hi] (NaN included) instead of extrapolating the
    coefficients: `guidance` must have the batch's length (a Reshape to [B] fails otherwise) and each scale
    must lie in the range (a Gather of a one-element table at index 1 fails otherwise, the error naming the
    node `iia/guidance_must_be_in_<lo>_to_<hi>`). Nothing is clamped. Returns CHECKED_GUIDANCE."""
    g = gb.node("Reshape", [GUIDANCE, batch], "iia/guidance_one_per_image")
    inside = gb.node("And", [gb.node("GreaterOrEqual", [g, gb.const(np.array(lo, np.float32))]),
                             gb.node("LessOrEqual", [g, gb.const(np.array(hi, np.float32))])])
    outside = gb.node("Cast", [gb.node("Not", [inside])], to=TensorProto.INT64)
    zero = gb.node("Gather", [gb.const(np.zeros(1, np.float32)), outside], f"iia/guidance_must_be_in_{lo:g}_to_{hi:g}",
                   axis=0)
    return gb.node("Add", [g, zero], CHECKED_GUIDANCE)


@dataclass(frozen=True)
class ScaleInputs:
    """What the loop form needs of a guidance range (compiler.scales.ScaleTable): the scale bounds, the hat
    functions' slopes over the nodes, and the plan whose combination weights are given per node."""

    lo: float
    hi: float
    slopes: tuple[np.ndarray, ...]  # scales.hat_slopes(nodes): (aL, bL, aR, bR)
    plan: Plan  # runtime.program.over_nodes of the nodes' plans


def scale_inputs(table, scales) -> ScaleInputs:
    """ScaleInputs of a ScaleTable (compiler.scales) and the model's GuidanceRange (models.guidance)."""
    from .scales import hat_slopes

    return ScaleInputs(scales.lo, scales.hi, hat_slopes(list(table.nodes)), table.plan())


def hat_weights_node(gb: GraphBuilder, g: str, slopes: tuple[np.ndarray, ...]) -> str:
    """float64 [B, n] interpolation weights of the per-image scales g [B] (`runtime.program.hat_weights` in the
    graph; float64 like the rows made from them, so that at a node the rows round to float32 as one scale's do)."""
    a_l, b_l, a_r, b_r = (gb.const(v.astype(np.float64).reshape(1, -1), np.float64) for v in slopes)
    column = gb.node("Cast", [gb.node("Unsqueeze", [g, gb.const(np.array([1], np.int64), np.int64)])],
                     to=TensorProto.DOUBLE)
    rise = gb.node("Add", [gb.node("Mul", [column, a_l]), b_l])
    fall = gb.node("Add", [gb.node("Mul", [column, a_r]), b_r])
    return gb.node("Clip", [gb.node("Min", [rise, fall]), gb.const(np.array(0, np.float64), np.float64),
                            gb.const(np.array(1, np.float64), np.float64)], "iia/guidance_weights")


def per_image_rows(gb: GraphBuilder, weights: str, plan: Plan, batch: str) -> tuple[str, str]:
    """Each image's linear form of `plan` at its scale, computed in float64 once before the loop: (state float32
    [N, B, 1, N+1], row i the coefficients of denoiser call i's input over [noise, D_0, ..., D_{N-1}]; output
    [B, 1, N+1]: batched MatMul operands over the buffer of `per_image_buffer`). A combination weight given per node becomes weights @ w
    ([B, 1]), as `Plan.at` interpolates it; the rows are then the combinations' products, as
    `emit.linear_form` computes them for one scale."""
    n = len(plan.calls)
    eye = np.eye(n + 1)  # float64 throughout, cast to float32 once (emit.linear_form's rows are float64 too)
    values = {plan.input: gb.const(eye[:1], np.float64)}  # [1, N+1] rows broadcast over the batch until a weight varies
    states = []
    for op in plan.ops:
        if isinstance(op, Denoise):
            states.append(values[op.state])
            values[op.out] = gb.const(eye[len(states):len(states) + 1], np.float64)
            continue
        acc = None
        for name, w in op.terms:
            per_node = isinstance(w, tuple) and len(set(w)) > 1
            coef = (gb.node("MatMul", [weights, gb.const(np.asarray(w, np.float64).reshape(-1, 1), np.float64)])
                    if per_node else gb.const(np.array([[w[0] if isinstance(w, tuple) else w]]), np.float64))
            term = gb.node("Mul", [values[name], coef])
            acc = term if acc is None else gb.node("Add", [acc, term])
        values[op.out] = acc
    shape = gb.node("Concat", [batch, gb.const(np.array([n + 1], np.int64), np.int64)], axis=0)
    axes = gb.const(np.array([0, 2], np.int64), np.int64)
    rows = [gb.node("Unsqueeze", [gb.node("Expand", [s, shape]), axes]) for s in states]
    state = gb.node("Cast", [gb.node("Concat", rows, axis=0)], "iia/guidance_rows", to=TensorProto.FLOAT)
    out = gb.node("Unsqueeze", [gb.node("Expand", [values[plan.output], shape]), gb.const(np.array([1], np.int64), np.int64)])
    return state, gb.node("Cast", [out], to=TensorProto.FLOAT)


def per_image_buffer(gb: GraphBuilder, n: int, batch: str) -> tuple[str, str]:
    """The loop buffer of a guidance range, batch-major: (initial buffer float32 [B, N+1, prod(shape)], image b's
    row 0 its noise, the rest zeros; scatter targets int64 [N, B, 2], entry (i, b) = (b, i + 1), where ScatterND
    writes image b's D_i). With each image's rows [B, 1, N+1] the mix is then ONE batched MatMul per step, as
    the single-scale graph's is one MatMul: per-step Reshape/Transpose (or Einsum "bn,nbk->bk", 2-3x the
    MatMul in ONNX Runtime) cost a range graph ~6 % at batch 1 on the test pair (docs/compiler.md)."""
    noise_rows = gb.node("Reshape", [NOISE, gb.const(np.array([0, 1, -1], np.int64), np.int64)])  # [B, 1, K]
    zeros_shape = gb.node("Concat", [batch, gb.const(np.array([n], np.int64), np.int64),
                                     gb.node("Shape", [noise_rows], start=2)], axis=0)
    zeros = gb.node("ConstantOfShape", [zeros_shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    buf0 = gb.node("Concat", [noise_rows, zeros], "iia/D_init", axis=1)
    grid = gb.node("Concat", [gb.const(np.array([n], np.int64), np.int64), batch,
                              gb.const(np.array([1], np.int64), np.int64)], axis=0)
    images = gb.node("Range", [gb.const(np.array(0, np.int64), np.int64),
                               gb.node("Squeeze", [batch, gb.const(np.array([0], np.int64), np.int64)]),
                               gb.const(np.array(1, np.int64), np.int64)])
    images = gb.node("Expand", [gb.node("Unsqueeze", [images, gb.const(np.array([0, 2], np.int64), np.int64)]), grid])
    steps = gb.node("Expand", [gb.const(np.arange(1, n + 1, dtype=np.int64).reshape(n, 1, 1), np.int64), grid])
    return buf0, gb.node("Concat", [images, steps], "iia/guidance_scatter_targets", axis=2)


def per_image_weight(gb: GraphBuilder, weights: str, w, batch: str, rank: int) -> str:
    """A combination weight of the unrolled form: a float for every image, or given per node (a tuple) the
    float32 interpolant of each image (weights [B, n] @ w, rounded once, as `Plan.at`), shaped [B, 1, ...] to
    broadcast over the values (`rank` sample axes)."""
    if not isinstance(w, tuple) or len(set(w)) == 1:
        return gb.const(w[0] if isinstance(w, tuple) else w)
    column = gb.node("MatMul", [weights, gb.const(np.asarray(w, np.float64).reshape(-1, 1), np.float64)])
    shape = gb.const(np.array([-1] + [1] * rank, np.int64), np.int64)
    return gb.node("Reshape", [gb.node("Cast", [column], to=TensorProto.FLOAT), shape])
