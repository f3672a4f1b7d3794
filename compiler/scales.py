"""Per-request guidance: the sampler's constants as functions of the guidance scale g.

A range artifact (`--guidance LO:HI`, `--cfg LO:HI`) is calibrated at NODES scales of the range (Chebyshev-
Lobatto nodes: the endpoints and points crowded toward them), each fit the one a single-scale compile at that g
would ship (same cache entry). The time steps are shared across the range: a named solver's schedule does not
depend on g, and per-image time steps would defeat the per-step conditioning tables (fold.py evaluates the
embedding at each baked sigma). What follows g are the step coefficients, interpolated piecewise-linearly
between the nodes with hat weights w_k(g) (`runtime.program.hat_weights`: sum 1, exact at the nodes), so every
combination weight of the plan is the interpolant of its values at the nodes (program.json's per-node weights,
`Plan.at`). The graph computes the weights once per image and from them, before the loop, each image's linear
form (each denoiser input and the output over [noise, D_0, ...]); the PyTorch reference runs the interpolated
coefficients through the interpreter (`ScaleTable.program_at`).

The guard judges the INTERPOLATED sampler at held-out scales between the nodes (the midpoints) against the
sampler fitted exactly there and against the base solver, on held-out noise of that scale: where the
interpolant loses to the base, the two nodes around that scale fall back to base coefficients, until no tested
scale is worse than the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from iia.calibration.evalset import evaluation_set
from iia.calibration.fit import HOLDOUT_SEED_OFFSET
from iia.calibration.solvers import Program, build_program

from iia.runtime.program import Plan, ProgramError, hat_weights, over_nodes

NODES = 6  # scales calibrated at: where interpolated / exact flattens, measured in docs/compiler.md ("Guidance as an input")
INTERPOLATION = "piecewise-linear"


class ScaleError(ValueError):
    pass


def chebyshev_nodes(lo: float, hi: float, n: int = NODES) -> list[float]:
    """n >= 2 Chebyshev-Lobatto points of [lo, hi], ascending, both ends included (a piecewise-linear interpolant
    cannot extrapolate, so the ends must be nodes)."""
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    inner = [centre - half * math.cos(math.pi * k / (n - 1)) for k in range(1, n - 1)]
    return [float(lo), *inner, float(hi)]


def hat_slopes(nodes: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(aL, bL, aR, bR) float64 [n]: w_k(g) = clip(min(aL_k g + bL_k, aR_k g + bR_k), 0, 1), the hat function
    of node k (rising from node k-1, falling to node k+1; flat 2 beyond the ends, then clipped to 1): the
    graph's form of `runtime.program.hat_weights`."""
    n = len(nodes)
    a_l, b_l, a_r, b_r = np.zeros(n), np.full(n, 2.0), np.zeros(n), np.full(n, 2.0)
    for k in range(n):
        if k > 0:
            a_l[k] = 1.0 / (nodes[k] - nodes[k - 1])
            b_l[k] = -nodes[k - 1] * a_l[k]
        if k < n - 1:
            a_r[k] = -1.0 / (nodes[k + 1] - nodes[k])
            b_r[k] = -nodes[k + 1] * a_r[k]
    return a_l, b_l, a_r, b_r


@dataclass(frozen=True)
class ScaleTable:
    """The sampler fitted (or base) at each node, same steps and basis; between nodes its step coefficients are
    interpolated piecewise-linearly in g, which makes every combination weight of its plan the interpolant
    of the nodes' weights (`runtime.program.Plan.at`: what the graph, the runtime's loop and `program_at` run)."""

    nodes: tuple[float, ...]
    programs: tuple[Program, ...]

    def program_at(self, g: float) -> Program:
        """The interpolated sampler at scale g, for the PyTorch interpreter."""
        w = hat_weights([g], list(self.nodes))[0]
        per_node = [p.coefficients() for p in self.programs]
        return self.programs[0].with_coefficients(
            [[float(sum(w[k] * c[i][j] for k, c in enumerate(per_node))) for j in range(len(step))]
             for i, step in enumerate(per_node[0])])

    def plan(self) -> Plan:
        """The plan with per-node combination weights (program.json's guidance form; the graph is emitted from it)."""
        return over_nodes(self.nodes, [p.plan() for p in self.programs])


def scale_table(nodes: list[float], programs: list[Program]) -> ScaleTable:
    """The nodes' samplers as one table; ScaleError when they do not share time steps and ops."""
    table = ScaleTable(tuple(nodes), tuple(programs))
    try:
        table.plan()
    except ProgramError as err:
        raise ScaleError(f"the samplers fitted at guidance {', '.join(f'{g:g}' for g in nodes)} differ: {err}") from None
    return table


def _rmse(errors: torch.Tensor) -> float:
    """The RMSE over all samples from their per-sample RMSEs (evalset.sample_errors)."""
    return float(errors.pow(2).mean().sqrt())


def guard_scales(table: ScaleTable, base: Program, held_out: list[float], at, exact, options, log,
                 sets: dict | None = None) -> tuple[ScaleTable, list[dict]]:
    """Judge the interpolated sampler at each held-out scale against the base solver and the sampler fitted
    exactly there (`exact(g)` -> Program; None: not fitted there, rmse_exact None), on held-out noise of that
    scale (`sets[g]`, else the held-out set a fit at g uses: `at(g)` -> the guided Denoiser, `options`' sizes).
    Nodes around a scale where the interpolant loses to the base fall back to base coefficients, and the table
    is judged again. Returns the shipped table and the guard's rows (g, rmse of interpolated, exact, base)."""
    given, sets = sets or {}, {}
    for g in held_out:  # the held-out set the guard of a fit at g uses (same noise, same reference)
        hold = given.get(g)
        if hold is None:
            den = at(g)
            resolved = options.resolved(den)
            hold = evaluation_set(den, resolved.holdout, resolved.seed + HOLDOUT_SEED_OFFSET, resolved.reference_steps)
        sets[g] = (hold, None if exact is None else _rmse(hold.errors(exact(g))), _rmse(hold.errors(base)))
    fallen: set[int] = set()
    while True:
        rows, losing = [], []
        for g, (hold, r_exact, r_base) in sets.items():
            r_interp = _rmse(hold.errors(table.program_at(g)))
            rows.append({"g": g, "rmse_interpolated": r_interp, "rmse_exact": r_exact, "rmse_base": r_base})
            if r_interp > r_base:
                losing.append(g)
        if not losing:
            return table, [dict(r, fallback_nodes=sorted(table.nodes[k] for k in fallen)) for r in rows]
        around = {j for g in losing for k in range(len(table.nodes) - 1)
                  if table.nodes[k] <= g <= table.nodes[k + 1] for j in (k, k + 1)} - fallen
        if not around:
            raise ScaleError(f"the base solver itself loses at guidance {losing[0]:g}: nothing to fall back to")
        log(f"  guard: the interpolant loses to the base at g = {', '.join(f'{g:g}' for g in losing)}; nodes "
            f"{', '.join(f'{table.nodes[k]:g}' for k in sorted(around))} fall back to base coefficients")
        fallen |= around
        programs = [base if k in fallen else p for k, p in enumerate(table.programs)]
        table = scale_table(list(table.nodes), programs)


def base_of(program: Program) -> Program:
    """The base solver's coefficients on the same time steps (what a guard falls back to)."""
    return build_program(program.solver, program.sigmas, program.r)


def _base_name(program: Program, family: str) -> str:
    """The base family's solver name where its constants are `program`'s (iia-ipndm's base = ipndm), else
    `program.solver` (iia-edm's base coefficients are not edm's: its basis differs)."""
    try:
        named = build_program(family, program.sigmas, program.r)
    except (KeyError, ValueError):
        return program.solver
    same = named.coefficients() == program.coefficients() and named.plan() == program.plan()
    return family if same else program.solver


def check_range_options(coefficients: str | None) -> None:
    """What a range compile cannot do, refused by flag (ScaleError)."""
    if coefficients:
        raise ScaleError(f"--coefficients {coefficients}: a coefficient file holds one scale's fit; a guidance range "
                         f"is calibrated at several (drop --coefficients)")


__all__ = ["INTERPOLATION", "NODES", "ScaleError", "ScaleTable", "base_of", "chebyshev_nodes", "check_range_options",
           "guard_scales", "hat_slopes", "scale_table"]


def range_coefficients(denoiser, opts, log, progress=None) -> tuple[dict, Program, str, ScaleTable]:
    """coefficients.json data, the interpolated sampler at the default scale, where they came from, and the
    shipped ScaleTable of a range compile: a fit (or the base solver) at each node, through the same cache
    entries as single-scale compiles at those scales, then the held-out guard between the nodes; --solver auto:
    the search at the centre, the chosen candidate fitted at each node (compiler/scales_search.py)."""
    from iia.calibration import artifact
    from iia.calibration.solvers import get_solver

    from .coefficients import obtain_coefficients

    scales = denoiser.guidance_range
    nodes = chebyshev_nodes(scales.lo, scales.hi, NODES)
    searched = {}
    if opts.solver == "auto":
        from .scales_search import auto_range

        programs, fits, rows, searched, first = auto_range(denoiser, opts, log, progress)
        made = [({"guard": f}, p) for f, p in zip(fits, programs)]
        table = scale_table(nodes, programs)
    else:
        made = []
        for g in nodes:
            data, program, how = obtain_coefficients(scales.at(g), opts.solver, opts, log, progress)
            log(f"  g = {g:.4g}: {how}")
            made.append((data, program))
        table = scale_table(nodes, [p for _, p in made])
        rows: list[dict] = []
        if get_solver(opts.solver).fitted:
            held_out = [(a + b) / 2 for a, b in zip(nodes, nodes[1:])]
            exact = lambda g: obtain_coefficients(scales.at(g), opts.solver, opts, log, progress)[1]  # noqa: E731
            table, rows = guard_scales(table, base_of(made[0][1]), held_out, scales.at, exact, opts.calibration, log)
        first = made[0][0]
    for row in rows:
        exact_rmse = ("exact fit there not measured" if row["rmse_exact"] is None
                      else f"exact fit there {row['rmse_exact']:.4g}")
        log(f"  guard at g = {row['g']:.4g}: held-out rmse interpolated {row['rmse_interpolated']:.4g}, {exact_rmse}, "
            f"base {row['rmse_base']:.4g}")
    fallen = rows[0]["fallback_nodes"] if rows else []
    base = base_of(table.programs[0])
    unfitted = bool(searched) and all(p.coefficients() == base.coefficients() for p in table.programs)
    record = {"range": [scales.lo, scales.hi], "nodes": nodes, "default": scales.default,
              "interpolation": INTERPOLATION, "guard": rows, **searched}
    if unfitted:  # what the manifest's guidance note says (compiler/stages.py)
        record["note"] = ("every node ships the base coefficients of the searched solver (nodes' `shipped` says "
                          "why): the constants do not follow g; a request's g must lie in the range")
    data = {k: first[k] for k in ("schema", "schema_version", "created", "solver", "solver_definition", "nfe", "r",
                                  "sigmas", "options") if k in first}
    if searched:  # the centre's record is the search's: the nodes' solver, steps and basis are the table's
        shipped = table.programs[0]
        data.update(solver=_base_name(shipped, searched["search"]["family"]) if unfitted else shipped.solver,
                    r=shipped.r, sigmas=list(shipped.sigmas), search=first.get("search"))

    def shipped_as(g: float, d: dict) -> str:
        decision = (d.get("guard") or {}).get("decision", "") if searched else ""
        return "base (guard fallback)" if g in fallen else decision if decision.startswith("base") else "as fitted at g"

    if rows:
        verdict = "interpolated sampler no worse than the base at every held-out scale" + (
            f" (nodes {', '.join(f'{g:g}' for g in fallen)} on base coefficients)" if fallen else "")
    elif len({tuple(map(tuple, p.coefficients())) for p in table.programs}) == 1:
        verdict = "not checked: the same constants at every node (nothing interpolated)"
    else:
        verdict = "not checked (no time)"
    data.update(model=artifact.model_identity(denoiser), guidance=record,
                nodes=[{"g": g, "shipped": shipped_as(g, d),
                        "coefficients": p.coefficients(), "steps": d.get("steps"), "guard": d.get("guard")}
                       for g, (d, _), p in zip(nodes, made, table.programs)],
                guard={"decision": verdict, "scales": rows},
                versions=first.get("versions"))
    chosen = "" if not searched else f"auto: {searched['search']['chosen']}" + (
        f", shipped as {data['solver']} (base coefficients at every node)" if unfitted else "")
    how = (f"{chosen or opts.solver} at {len(nodes)} scales "
           f"({', '.join(f'{g:.4g}' for g in nodes)}), {INTERPOLATION} in g between them")
    return data, table.program_at(scales.default), how, table
