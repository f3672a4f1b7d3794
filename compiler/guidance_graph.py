"""The graph side of a guidance range (compiler/scales.py): the checked per-image `guidance` input, the hat
weights over the nodes computed from it once, and the per-image mix of coefficient rows with the loop's flat
buffer (emit.emit_sampler_loop uses them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from iia.runtime.contract import GUIDANCE

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
    """What the loop form needs of a guidance range (compiler.scales.ScaleTable): the scale bounds, the nodes,
    and the linear-form rows at each node, state [n, N, N+1] and out [n, N+1] (float64)."""

    lo: float
    hi: float
    nodes: tuple[float, ...]
    slopes: tuple[np.ndarray, ...]  # scales.hat_slopes(nodes): (aL, bL, aR, bR)
    state: np.ndarray
    out: np.ndarray


def scale_inputs(table, scales) -> ScaleInputs:
    """ScaleInputs of a ScaleTable (compiler.scales) and the model's GuidanceRange (models.guidance)."""
    from .scales import hat_slopes

    return ScaleInputs(scales.lo, scales.hi, table.nodes, hat_slopes(list(table.nodes)), table.state, table.out)


def hat_weights_node(gb: GraphBuilder, g: str, slopes: tuple[np.ndarray, ...]) -> str:
    """float32 [B, n] interpolation weights of the per-image scales g [B] (scales.hat_weights in the graph)."""
    a_l, b_l, a_r, b_r = (gb.const(v.astype(np.float32).reshape(1, -1)) for v in slopes)
    column = gb.node("Unsqueeze", [g, gb.const(np.array([1], np.int64), np.int64)])
    rise = gb.node("Add", [gb.node("Mul", [column, a_l]), b_l])
    fall = gb.node("Add", [gb.node("Mul", [column, a_r]), b_r])
    return gb.node("Clip", [gb.node("Min", [rise, fall]), gb.const(np.array(0, np.float32)),
                            gb.const(np.array(1, np.float32))], "iia/guidance_weights")


def mix_per_image(gb: GraphBuilder, weights: str, rows: str, buf: str, batch: str, shape_of: str) -> str:
    """Per image b: (weights[b] @ rows) . buf[:, b]: weights [B, n], rows [n, N+1] (one row per node), buf
    [N+1, B*prod(shape)] -> the noise's shape."""
    coef = gb.node("MatMul", [weights, rows])  # [B, N+1]
    split = gb.node("Concat", [gb.const(np.array([0], np.int64), np.int64), batch,
                               gb.const(np.array([-1], np.int64), np.int64)], axis=0)
    mixed = gb.node("Einsum", [coef, gb.node("Reshape", [buf, split])], equation="bn,nbk->bk")
    return gb.node("Reshape", [mixed, shape_of])
