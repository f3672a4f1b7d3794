"""`--solver auto` over a guidance range (`--guidance LO:HI`, `--cfg LO:HI`): the search picks the sampler ONCE,
at the range's centre scale; its coefficients are then fitted at every node (compiler/scales.py) and
interpolated in g as a named solver's are.

`--budget` is split: SEARCH_SHARE for the search at the centre (`calibration.search.auto_search` through the
compiler's cached auto path), the rest for the nodes. What the search chose carries over to every scale:

* family, final step and time steps (Karras, or the schedule it learned at the centre): shared across the range,
  as a range artifact's time steps are (per-step conditioning tables are baked at each sigma);
* coefficients "base": nothing to fit, the constants do not depend on g (the artifact still takes `guidance`);
  "global": `search_fits.fit_global` at each node on that node's calibration noise, kept where it beats the
  base coefficients on the node's held-out noise in RMSE and median (as the search's eligibility), else the
  node ships base coefficients; "local": the paper's fit (`fit.calibrate`, its own held-out guard) at each node.

The node stage is planned from one timed guided-denoiser call: the references (calibration noise at each node,
held-out noise at each node and at each midpoint, the guard's held-out scales) and the scoring must fit
REFERENCE_SHARE of the node budget; first the exact fits at the midpoints (only reported, the guard's
`rmse_exact`) are dropped, then reference steps and noises are cut (as the search cuts its own); when even the
smallest references do not fit, every node ships the chosen candidate's base coefficients, unfitted, and the log
says which budget would afford the fits. Global fits share what is left by deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from iia.calibration.evalset import EvalSet, evaluation_set
from iia.calibration.fit import HOLDOUT_SEED_OFFSET, calibrate
from iia.calibration.search_timing import time_call
from iia.calibration.solvers import Program, build_program
from iia.cli import Ticker

from .scales import ScaleError, base_of, guard_scales, scale_table

SEARCH_SHARE = 0.4  # of --budget for the search at the centre; the node stage computes references at 11 scales
REFERENCE_SHARE = 0.6  # of the node budget, at most, for references and scoring (the rest: the global fits)
MIN_STEPS, MIN_CALIB, MIN_HOLDOUT = 32, 16, 32  # what a cut never goes below (as the search's)
SEARCH_BATCH = {"gmm": 512}  # calibration noises of the global fits when --calib-batch is not set (else 128)


@dataclass(frozen=True)
class Choice:
    """What the search at the centre chose (a row of its candidate table)."""

    label: str
    family: str
    final: str
    schedule: str
    kind: str  # base | local | global
    program: Program


def searched_choice(data: dict, program: Program) -> Choice:
    """The chosen row of an auto coefficient record (`to_calibration_result`'s `search.candidates`)."""
    rows = [r for r in data.get("search", {}).get("candidates", []) if r.get("chosen")]
    if len(rows) != 1:
        raise ScaleError("the auto search's record names no chosen candidate (coefficient record without 'search')")
    r = rows[0]
    # a fit in the linear form is a global fit (fit_at refits the program's own solver at each node)
    kind = "global" if r["coefficients"] == "linear" else r["coefficients"]
    return Choice(r["candidate"], r["family"], r["final"], r["schedule"], kind, program)


@dataclass(frozen=True)
class NodePlan:
    """Sizes of the node stage: calibration / held-out noises, reference Heun steps, whether the midpoints get
    exact fits, whether any fit is affordable; `need_s` what references and scoring are estimated to take."""

    batch: int
    holdout: int
    steps: int
    exact: bool
    fits: bool
    need_s: float
    afford_s: float


def call_cost(den) -> tuple[float, float]:
    """(a, b): seconds of one guided denoiser call on n noises ~ a + b n, from calls on 2 and 32 noises at
    sigma_max (`search_timing.time_call`, the fastest of 2 each: the first pays the warm-up)."""
    small, large = (min(time_call(den, m) for _ in range(2)) for m in (2, 32))
    b = max(large - small, 0.0) / 30
    return max(small - 2 * b, 0.0), b


def plan_nodes(kind: str, cost: tuple[float, float], nfe: int, n_nodes: int, cal, batch: int,
               budget_s: float) -> NodePlan:
    """The largest node stage that fits `budget_s` with one denoiser call on n noises costing cost[0] + cost[1] n
    seconds (see the module docstring). x 1.5 on every estimate: short timings run faster than long ones."""
    n_mid = n_nodes - 1

    def c(n):
        return cost[0] + cost[1] * n

    def need(b, h, s, exact):
        fitted = n_nodes + n_mid * exact  # scales fitted at
        refs = (2 * s - 1) * (fitted * c(b) * (kind == "global") + (n_nodes + n_mid) * c(h))
        scoring = nfe * c(h) * (2 * n_nodes + 3 * n_mid)  # fit and base per node; interpolated, exact, base per midpoint
        local = fitted * ((cal.M + 1) * nfe * c(b) + (nfe + 1) * nfe * c(h)) if kind == "local" else 0
        return 1.5 * (refs + scoring + local)

    share = budget_s * (REFERENCE_SHARE if kind == "global" else 1.0)
    b, h, s, exact = batch, cal.holdout, cal.reference_steps, True
    while need(b, h, s, exact) > share:
        if exact:
            exact = False
        elif s > MIN_STEPS:
            s = max(MIN_STEPS, int(s * 0.7))
        elif b > MIN_CALIB or h > MIN_HOLDOUT:
            b, h = max(MIN_CALIB, int(b * 0.7)), max(MIN_HOLDOUT, int(h * 0.7))
        else:
            break
    total = need(b, h, s, exact)
    afford = need(min(b, MIN_CALIB), min(h, MIN_HOLDOUT), min(s, MIN_STEPS), False) / (
        REFERENCE_SHARE if kind == "global" else 1.0)
    return NodePlan(b, h, s, exact, total <= share, round(total, 2), round(afford, 1))


def _errors(hold: EvalSet, program: Program) -> tuple[float, float]:
    """(rmse, median) of per-sample held-out errors, float32 states as the graph runs (as the search scores)."""
    err = hold.errors(program, dtype=torch.float32)
    return float(err.pow(2).mean().sqrt()), float(err.median())


def fit_at(den, choice: Choice, plan: NodePlan, cal, nfe: int, r: int, deadline: float | None,
           sets: dict) -> tuple[Program, dict]:
    """The chosen candidate's coefficients fitted for `den` (one scale), kept only where they beat the base
    coefficients on that scale's held-out noise; `sets` = {"calib": EvalSet, "hold": EvalSet} of that scale."""
    from iia.calibration.search_fits import fit_global

    hold = sets["hold"]
    if choice.kind == "local":
        res = calibrate(den, "iia-" + choice.family, nfe, replace(cal, batch=plan.batch, holdout=plan.holdout,
                                                                  reference_steps=plan.steps, r=r),
                        reference=(hold.noise, hold.labels, hold.reference_at(choice.program.sigmas[0])))
        return res.program, dict(res.guard, kind="local")
    base = build_program(choice.program.solver, list(choice.program.sigmas), choice.program.r)  # as it was fitted
    fitted, info = fit_global(den, base, sets["calib"], deadline=deadline)
    (r_fit, m_fit), (r_base, m_base) = _errors(hold, fitted), _errors(hold, base)
    # a fit must BEAT the base: one cut before its first step returns the base constants (equal errors)
    moved = fitted.coefficients() != base.coefficients()
    keep = moved and r_fit < r_base and m_fit <= m_base
    decision = ("fitted" if keep else "base: the fit loses to the base coefficients on held-out noise" if moved
                else "base: the fit stopped before its first step (no time left)")
    return (fitted if keep else base), {
        "kind": "global", "holdout": len(hold), "rmse_fitted": r_fit, "median_fitted": m_fit, "rmse_base": r_base,
        "median_base": m_base, "evals": info.get("evals"), "cut": bool(info.get("cut")), "decision": decision}


def auto_range(denoiser, opts, log, progress=None) -> tuple[list[Program], list[dict], list[dict], dict, dict]:
    """--solver auto over `denoiser.guidance_range`: (the programs shipped at the nodes, each node's fit record,
    the guard's rows, {"search": what it chose at which scale, "budget": the split}, the search's coefficient
    record). See the module docstring."""
    from .coefficients import obtain_coefficients
    from .scales import NODES, chebyshev_nodes

    started = time.perf_counter()
    scales = denoiser.guidance_range
    nodes = chebyshev_nodes(scales.lo, scales.hi, NODES)
    centre = (scales.lo + scales.hi) / 2
    search_s = SEARCH_SHARE * opts.budget_s
    log(f"  budget: --budget {opts.budget_s:g} s = the search at g = {centre:g} ({search_s:.3g} s, "
        f"{SEARCH_SHARE:.0%}) + the fits at {len(nodes)} nodes and the guard (the rest)")
    data, program, how = obtain_coefficients(scales.at(centre), "auto", replace(opts, budget_s=search_s), log, progress)
    choice = searched_choice(data, program)
    log(f"  search at g = {centre:g}: {how}")
    record = {"g": centre, "chosen": choice.label, "family": choice.family, "final": choice.final,
              "schedule": choice.schedule, "coefficients": choice.kind, "budget_s": round(search_s, 3),
              "seconds": data.get("search", {}).get("seconds")}  # its candidate table: coefficients.json's `search`
    budget = {"total_s": opts.budget_s, "search_s": round(search_s, 3)}
    if choice.kind == "base":
        log(f"  {choice.label}: base coefficients, nothing to fit; the same constants at every scale")
        return [choice.program] * len(nodes), [{"kind": "base", "decision": "base: nothing to fit"}] * len(nodes), \
            [], {"search": record, "budget": budget}, data

    programs, fits, rows, plan = fit_nodes(scales, nodes, choice, opts, started + opts.budget_s, log)
    budget.update(plan)
    budget["seconds"] = round(time.perf_counter() - started, 2)
    log(f"  auto over the range: {budget['seconds']:.1f} s of --budget {opts.budget_s:g} s")
    return programs, fits, rows, {"search": record, "budget": budget}, data


def _fit_each(at: dict, fitted_at: list[float], choice: Choice, plan, cal, opts, sets: dict, deadline: float,
              log) -> dict:
    """{g: (program, fit record)} at each scale of `fitted_at`, each fit given an equal share of the time left
    before `deadline` less the guard's scoring; a scale with no time left ships the base (recorded so)."""
    fits, tick = {}, Ticker("node fits", log)
    reserve = 0.25 * plan.need_s  # the scoring after the fits (of the references and scoring planned)
    for k, g in enumerate(fitted_at):
        share = max(deadline - reserve - time.perf_counter(), 0.0) / (len(fitted_at) - k)
        if share <= 0.0 or (choice.kind == "local" and time.perf_counter() > deadline - reserve):
            fits[g] = (base_of(choice.program), {"kind": choice.kind, "decision": "base: no --budget left for this fit"})
        else:
            fits[g] = fit_at(at[g], choice, plan, cal, opts.nfe, opts.calibration.r, time.perf_counter() + share,
                             sets[g])
        log(f"  g = {g:.4g}: {fits[g][1]['decision']}")
        tick(k + 1, len(fitted_at))
    return fits


def fit_nodes(scales, nodes: list[float], choice: Choice, opts, deadline: float, log) -> tuple[list[Program], list[dict], list[dict], dict]:
    """The chosen candidate's coefficients fitted at each node by `deadline` (perf_counter seconds), then the guard
    between the nodes: (programs shipped at the nodes, each node's fit record, the guard's rows, the node stage's
    plan for the record). `scales` a GuidanceRange, `opts` the CompileOptions (nfe, calibration, batch)."""
    from .options import is_set

    at = {g: scales.at(g) for g in nodes}
    mids = [(a + b) / 2 for a, b in zip(nodes, nodes[1:])]
    at.update({g: scales.at(g) for g in mids})
    cal = opts.calibration.resolved(at[nodes[0]])
    batch = cal.batch if is_set(opts, "batch") else SEARCH_BATCH.get(at[nodes[0]].identity.get("kind"), 128)
    cost = call_cost(at[nodes[0]])
    left = deadline - time.perf_counter()
    plan = plan_nodes(choice.kind, cost, opts.nfe, len(nodes), cal, batch, max(left, 0.0))
    budget = dict(nodes_s=round(left, 3), plan=_plan_record(plan))

    def unfitted(why: str):  # every node on the chosen candidate's base constants: nothing between nodes to judge
        log(f"  node fits dropped: {why}; every node ships {choice.label}'s base coefficients (the guard is not "
            f"needed: the interpolant is the base solver)")
        budget["plan"]["fits"] = False
        budget["dropped"] = why
        return [base_of(choice.program)] * len(nodes), \
            [{"kind": choice.kind, "decision": f"base: {why}"}] * len(nodes), [], budget

    if not plan.fits:
        return unfitted(f"{left:.3g} s of --budget left cannot afford even {MIN_CALIB} + {MIN_HOLDOUT} noises at "
                        f"{MIN_STEPS} Heun steps at {len(nodes)} scales (about {plan.afford_s:.0f} s for the nodes "
                        f"would, by the timed cost per call x 1.5)")
    log(f"  plan: {left:.3g} s for the nodes: {plan.batch} calibration + {plan.holdout} held-out noises, "
        f"{plan.steps} Heun steps at each scale, references and scoring ~{plan.need_s:.1f} s"
        + ("" if plan.exact else "; no exact fits at the midpoints (the guard's rmse_exact not measured)"))
    sets, replanned = None, False
    while sets is None:  # references first (the fits share what is left); re-planned once at the measured pace
        fitted_at = nodes + (mids if plan.exact else [])
        order = fitted_at + [m for m in mids if m not in fitted_at]
        sets, tick, t0 = {}, Ticker("node references", log), time.perf_counter()
        for k, g in enumerate(order):
            if time.perf_counter() > deadline:
                return unfitted(f"--budget ran out computing the references ({k} of {len(order)} scales done)")
            sets[g] = _reference_sets(at[g], choice, plan, cal, g in fitted_at)
            tick(k + 1, len(order))
            if k == 0 and not replanned:
                replanned = True
                spent = time.perf_counter() - t0
                slow = spent / max(_scale_s(plan, cost, choice.kind, True), 1e-9)
                rest = slow * sum(_scale_s(plan, cost, choice.kind, m in fitted_at) for m in order[1:])
                if time.perf_counter() + rest + 0.25 * plan.need_s > deadline:
                    left = deadline - time.perf_counter()
                    again = plan_nodes(choice.kind, (cost[0] * slow, cost[1] * slow), opts.nfe, len(nodes), cal,
                                       batch, max(left, 0.0))
                    log(f"  references re-planned at {slow:.2g}x the timed cost per call: {again.batch} calibration "
                        f"+ {again.holdout} held-out noises, {again.steps} Heun steps, exact fits at the midpoints "
                        f"{'kept' if again.exact else 'dropped'} ({left:.3g} s left)")
                    budget["plan"] = dict(_plan_record(again), replanned_at_pace=round(slow, 3))
                    if not again.fits:
                        return unfitted(f"at the measured pace ({slow:.2g}x the timed cost per call) {left:.3g} s of "
                                        f"--budget left cannot afford even the smallest references")
                    if again != plan:
                        plan, sets = again, None
                        break
    log(f"  references at {len(sets)} scales ({max(deadline - time.perf_counter(), 0.0):.1f} s of --budget left)")
    fits = _fit_each(at, fitted_at, choice, plan, cal, opts, sets, deadline, log)
    programs = [fits[g][0] for g in nodes]
    if all(p.coefficients() == base_of(choice.program).coefficients() for p in programs):
        log("  no node fit beat the base coefficients: every node ships them (the guard is not needed)")
        return programs, [fits[g][1] for g in nodes], [], budget
    table = scale_table(nodes, programs)
    if any(tuple(p.sigmas) != tuple(choice.program.sigmas) for p in programs):
        raise ScaleError("the node fits do not keep the searched time steps")
    exact = (lambda g: fits[g][0]) if plan.exact else None
    options = replace(cal, holdout=plan.holdout, reference_steps=plan.steps)
    table, rows = guard_scales(table, base_of(programs[0]), mids, at.__getitem__, exact, options, log,
                               sets={g: sets[g]["hold"] for g in mids})
    return list(table.programs), [fits[g][1] for g in nodes], rows, budget


def _plan_record(plan: NodePlan) -> dict:
    return {"calibration_noises": plan.batch, "held_out_noises": plan.holdout, "reference_steps": plan.steps,
            "exact_fits_at_midpoints": plan.exact, "estimated_s": plan.need_s}


def _scale_s(plan: NodePlan, cost: tuple[float, float], kind: str, fitted: bool) -> float:
    """Seconds one scale's references take by the timed cost (a scale fitted at: calibration set too when
    global), as plan_nodes counts them."""
    calls = 2 * plan.steps - 1
    return calls * ((cost[0] + cost[1] * plan.batch) * (kind == "global" and fitted) + cost[0] + cost[1] * plan.holdout)


def _reference_sets(den, choice: Choice, plan: NodePlan, cal, fitted: bool) -> dict:
    """{"calib": EvalSet or None, "hold": EvalSet} of one scale, references computed now."""
    calib = evaluation_set(den, plan.batch, cal.seed, plan.steps) if fitted and choice.kind == "global" else None
    hold = evaluation_set(den, plan.holdout, cal.seed + HOLDOUT_SEED_OFFSET, plan.steps)
    if calib is not None:
        calib.reference  # noqa: B018 -- computed now: what fit_global fits to (from sigma_max)
    hold.reference_at(choice.program.sigmas[0])
    return {"calib": calib, "hold": hold}
