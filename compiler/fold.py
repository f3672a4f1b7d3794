"""Fold the denoiser's conditioning subgraph (c_skip/c_out/c_in, noise and label embeddings, their MLPs and the
per-block affine projections of the embedding) per denoiser call.

At each call sigma is a baked constant and class labels range over a finite set [0, label_dim), so every value
computed from sigma, the labels and constants only is one of label_dim constants per call. We evaluate those
values once per distinct sigma with ONNX Runtime, for all labels, and substitute them (CONST/BATCH/LABEL):
a call then gathers one row per image instead of recomputing the embedding network NFE times (the loop around
`denoiser.onnx` a user would write cannot: it sees sigma and labels only at run time). Where the label tables
would be too large (`table_budget`) or a value does not behave row-wise, only the sigma-only part is folded
(values then constant per call or broadcast to the batch). Values over `size_limit` bytes per row are left to
be computed (a weight scaled by a sigma-dependent factor would otherwise be duplicated per call).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from iia.runtime.contract import DENOISER_LABELS, DENOISER_SIGMA

from .graph import quiet_session, source_cone, submodel
from .passes import Optimized, optimize

SIZE_LIMIT = 64 * 1024  # bytes per folded row
TABLE_FLOOR, TABLE_CAP = 1 << 20, 64 << 20  # bytes of all label tables together: see table_budget

# How a folded value enters a call: CONST the same array for any batch; BATCH one row [1, ...] broadcast to
# [B, ...]; LABEL a table [label_dim, ...] of which image b reads row class_labels[b].
CONST, BATCH, LABEL = "const", "batch", "label"


@dataclass
class FoldPlan:
    model: onnx.ModelProto | None = None  # the denoiser the node indices refer to (after the graph passes)
    foldable_nodes: set[int] = field(default_factory=set)  # indices into graph.node, removed at call sites
    values: dict[float, dict[str, tuple[np.ndarray, str]]] = field(default_factory=dict)  # sigma -> name -> (array, kind)
    summary: str = "nothing folded"  # one line for the compile log: how the conditioning was folded, or why not
    rewrites: str = "none"  # one line for the compile log: what the graph passes (passes/) rewrote


def conditioning_nodes(graph: onnx.GraphProto, sources: tuple[str, ...] = (DENOISER_SIGMA,)) -> tuple[set[int], list[str]]:
    """Nodes computing values from `sources` (graph inputs) and constants only, that depend on a source; and
    the boundary values (those read by other nodes or graph outputs), sorted."""
    nodes, depends, _, _ = source_cone(graph, sources)
    consumed_outside = set()
    for k, node in enumerate(graph.node):
        if k not in nodes:
            consumed_outside.update(i for i in node.input if i in depends and i not in sources)
    consumed_outside.update(o.name for o in graph.output if o.name in depends)
    return nodes, sorted(consumed_outside)


def _subgraph_model(model: onnx.ModelProto, nodes: set[int], outputs: list[str], sources: tuple[str, ...]) -> onnx.ModelProto:
    """The conditioning nodes with the constants they may read, as a model from `sources` to `outputs`."""
    g = model.graph
    constant_nodes = source_cone(g, sources)[3]  # Constant nodes, and weight-only arithmetic the rewrites introduced
    sub_nodes = [n for k, n in enumerate(g.node) if k in nodes or k in constant_nodes]
    return submodel(model, sub_nodes, [i for i in g.input if i.name in sources], outputs, "conditioning")


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float32 rounding (ONNX Runtime may pick another GEMM kernel for another batch size)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return np.array_equal(a, b)
    scale = max(float(np.abs(a).max(initial=0.0)), 1.0)
    return bool(np.all(np.isfinite(a) == np.isfinite(b))) and bool(np.abs(a - b).max(initial=0.0) <= 1e-5 * scale)


def _classify(runs: list[tuple[np.ndarray, np.ndarray]], with_labels: bool) -> tuple[np.ndarray, str] | None:
    """(array, kind) of one boundary value from runs [(labels fed, value)] at batches 1, 2 and label_dim;
    None when it is not row-wise in the batch (then nothing is folded)."""
    (l1, v1), (l2, v2), (lall, vall) = runs
    sizes = (len(l1), len(l2), len(lall))
    if all(_close(v1, v) for v in (v2, vall)):
        return v1, CONST
    if not all(v.ndim > 0 for v in (v1, v2, vall)) or (v1.shape[0], v2.shape[0], vall.shape[0]) != sizes:
        return None
    if not (v1.shape[1:] == v2.shape[1:] == vall.shape[1:]):
        return None
    if not with_labels:  # rows of a sigma-only value: all the same
        return (v1, BATCH) if _close(np.broadcast_to(v1, v2.shape), v2) else None
    table = vall  # row k is label k: lall = arange(label_dim)
    if not (_close(table[l1], v1) and _close(table[l2], v2)):
        return None
    if all(_close(table[:1], table[k:k + 1]) for k in range(1, len(table))):
        return table[:1], BATCH
    return table, LABEL


LABEL_CHUNK = 256  # labels evaluated per ONNX Runtime call: a one-hot encoding is [chunk, label_dim]


def _label_dependent(graph: onnx.GraphProto, nodes: set[int]) -> set[str]:
    """Values of the conditioning nodes that depend on the class labels."""
    dependent = {DENOISER_LABELS}
    for k in sorted(nodes):
        if any(i in dependent for i in graph.node[k].input):
            dependent.update(graph.node[k].output)
    return dependent


def _runner(session, boundary: list[str]):
    """run(sigma, labels [n]) -> the boundary values for n images at that sigma."""
    fed = {i.name for i in session.get_inputs()}

    def run(s: float, labels: np.ndarray) -> list[np.ndarray]:
        feed = {DENOISER_SIGMA: np.full(len(labels), s, np.float32)}
        if DENOISER_LABELS in fed:
            feed[DENOISER_LABELS] = labels.astype(np.int64)
        return session.run(boundary, feed)

    return run


def _evaluate(optimized: Optimized, sigmas: list[float], label_dim: int, size_limit: int,
              table_limit: int) -> tuple[FoldPlan | None, str]:
    """(plan, "") or (None, why nothing is folded this way); `optimized`: the denoiser after the graph passes,
    with the conditioning sources this label_dim implies."""
    sources = (DENOISER_SIGMA, DENOISER_LABELS) if label_dim else (DENOISER_SIGMA,)
    model = optimized.model
    nodes, boundary = conditioning_nodes(model.graph, sources)
    if not nodes or not boundary:
        return None, "no value is computed from the conditioning alone"
    with quiet_session(_subgraph_model(model, nodes, boundary, sources)) as session:
        run = _runner(session, boundary)
        top, distinct = max(label_dim, 1), sorted(set(sigmas))
        few = [np.array([top - 1]), np.array([top - 1, 0])]
        if label_dim:  # the tables' size, known from one image, before evaluating every label
            dependent = _label_dependent(model.graph, nodes)
            one = run(distinct[0], few[0])
            bound = sum(v.nbytes for name, v in zip(boundary, one) if name in dependent) * top * len(distinct)
            if bound > table_limit:
                return None, f"per-label tables would take {bound} bytes > budget {table_limit} (fold.table_budget)"
        plan, table_bytes = FoldPlan(model, nodes), 0
        for s in distinct:
            runs = [run(s, labels) for labels in few]
            chunks = ([runs[0]] if top == 1 else  # arange(1) is few[0]: no second run
                      [run(s, np.arange(a, min(a + LABEL_CHUNK, top))) for a in range(0, top, LABEL_CHUNK)])
            batched = [a.ndim > 0 and b.ndim > 0 and a.shape[0] == 1 and b.shape[0] == 2 for a, b in zip(*runs)]
            runs.append([np.concatenate([c[k] for c in chunks]) if batched[k] else chunks[0][k]
                         for k in range(len(boundary))])
            values, why = _classify_all(boundary, [*few, np.arange(top)], runs, bool(label_dim), size_limit)
            if values is None:
                return None, why
            table_bytes += sum(array.nbytes for array, kind in values.values() if kind == LABEL)
            if table_bytes > table_limit:
                return None, f"per-label tables take {table_bytes} bytes > budget {table_limit} (fold.table_budget)"
            plan.values[s] = values
    kinds = {kind for v in plan.values.values() for _, kind in v.values()}
    plan.summary = (f"per (step, label): {table_bytes} bytes of tables" if LABEL in kinds else "per step")
    plan.rewrites = optimized.summary()
    return plan, ""


def _classify_all(boundary: list[str], labels: list[np.ndarray], runs: list[list[np.ndarray]], with_labels: bool,
                  size_limit: int) -> tuple[dict | None, str]:
    """({name: (array, kind)}, "") for the boundary values at one sigma from runs at `labels`, or (None, why
    not) when one is not row-wise or takes over `size_limit` bytes per row."""
    values = {}
    for k, name in enumerate(boundary):
        got = _classify([(fed, r[k]) for fed, r in zip(labels, runs)], with_labels)
        if got is None:
            return None, f"value {name!r} is not row-wise in the batch"
        array, kind = got
        row_bytes = array.nbytes // len(array) if kind == LABEL else array.nbytes
        if row_bytes > size_limit:
            return None, f"value {name!r} takes {row_bytes} bytes per row > {size_limit}"
        values[name] = got
    return values, ""


def table_budget(denoiser_model: onnx.ModelProto) -> int:
    """Bytes the label tables of all sigmas may take together: the denoiser's own weight bytes (the artifact
    at most doubles), at least TABLE_FLOOR (small nets), at most TABLE_CAP (large label sets, e.g. 1000 ImageNet
    classes, fall back to sigma-only folding)."""
    weights = sum(int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                  for t in denoiser_model.graph.initializer)  # from the header: weights may be external data
    return int(min(TABLE_CAP, max(TABLE_FLOOR, weights)))


def plan_folding(denoiser_model: onnx.ModelProto, sigmas: list[float], label_dim: int = 0,
                 size_limit: int = SIZE_LIMIT, table_limit: int | None = None,
                 disabled: frozenset[str] = frozenset()) -> FoldPlan:
    """Evaluate the conditioning values at each sigma (and each label in [0, label_dim) when the denoiser reads
    class labels): the sigma-and-label plan if it is row-wise and fits `table_limit` (default
    `table_budget`), else the sigma-only plan, else an empty plan (nothing folded, nothing rewritten).

    The values are those of the denoiser after the graph passes (`passes.optimize`, less `disabled`): the
    affine chains they collapse make combined scale/shift values that are folded too. Emit from `plan.model`;
    `plan.rewrites` says what the passes did. The passes run once for the sources tried; they run again only
    when per-label tables are refused, as the affine-chain pass then sees fewer conditioning-only values."""
    reads_labels = any(i.name == DENOISER_LABELS for i in denoiser_model.graph.input)
    table_limit = table_budget(denoiser_model) if table_limit is None else table_limit
    why_not_labels = ""
    if label_dim > 0 and reads_labels:
        optimized = optimize(denoiser_model, (DENOISER_SIGMA, DENOISER_LABELS), disabled)
        plan, why_not_labels = _evaluate(optimized, sigmas, label_dim, size_limit, table_limit)
        if plan is not None:
            return plan
        del optimized  # a copy of the weights: freed before the next is made
    optimized = optimize(denoiser_model, (DENOISER_SIGMA,), disabled)
    plan, why = _evaluate(optimized, sigmas, 0, size_limit, table_limit)
    if plan is None:
        return FoldPlan(summary=f"nothing folded: {why}")
    plan.summary += f" (not per label: {why_not_labels})" if why_not_labels else ""
    return plan
