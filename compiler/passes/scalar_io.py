"""EDM's input/output scalings matched in the denoiser graph, for the loop emitter.

EDM's preconditioning (Karras et al. 2022, eq. 7) computes D(x) = c_skip x + c_out F(c_in x) with per-sigma
scalars. When x and D enter the graph only through those three products, and the fold plan turns c_skip,
c_out, c_in into one number per call, the loop can carry the raw network outputs F instead of D: with
D_j = c_skip_j x_j + c_out_j F_j, every x_i = a_i noise + sum_j b_ij D_j is again linear in [noise, F_0, ...],
so the three products leave the loop body and move into its coefficient rows (`raw_output_basis`).

Preconditions (each checked by `scalar_io`): the graph output is Add(Mul(x, c_skip), Mul(F, c_out)) and is
read by nothing else, x is read by exactly that Mul and Mul(x, c_in), each product read once, and every
scaling a folded value of one element per call (never a per-label table). This matches; it edits nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from iia.runtime.contract import DENOISER_X

from ..fold import LABEL, FoldPlan
from ..graph import DEFAULT_DOMAINS, producers
from ..graph import readers as reader_index


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
    readers, producer = reader_index(graph), producers(graph)
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
