"""The `auto` search: the best sampler at a given NFE, by END-TO-END error on held-out noise.

For one NFE, candidates = solver families x final-step convention x schedule (Karras / learned) x coefficients
(base / local IIA / global) (`search_space`), NOT all combinations: every family x final step on the Karras
schedule with base coefficients, learned schedules (`search_fits.learn_schedule`) and global fits
(`search_fits.fit_global`) for the best of those, and the paper's local fit on the best base that has one.
All are scored on HELD-OUT noise by mean AND median per-sample error; a candidate is eligible only if it is no
worse than its own base (same family and final step, Karras, base coefficients) in both; the best eligible one
ships. `SearchOptions.budget_s` bounds the whole search, references included (they are sized from a timed
denoiser call and the log says what was cut); `budget_s=None` bounds it by evaluation counts only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from iia.cli import Ticker
from iia.models.base import Denoiser

from .evalset import EvalSet, evaluation_set
from .fit import HOLDOUT_SEED_OFFSET, CalibrationOptions, CalibrationResult, calibrate
from .sampling import reference_solution
from .schedules import program_for
from .search_fits import calib_loss, fit_global, learn_schedule
from .search_space import FAMILIES, Candidate, SearchError, SearchOptions
from .solvers import Program, build_program, valid_nfe

__all__ = ["FAMILIES", "Candidate", "SearchError", "SearchOptions", "SearchResult", "auto_search", "format_table",
           "to_calibration_result"]

FIXED_SHARE = 0.6  # of --budget, at most, for what cannot stop early: references, scoring bases and finalists
MIN_REFERENCE_STEPS, MIN_CALIB, MIN_HOLDOUT = 32, 16, 32  # what a cut never goes below
# below this --budget, no learned schedules or global fits: loading their optimisers (scipy.optimize, torch.optim,
# whose first optimiser imports torch._dynamo) alone takes ~1 + ~3 s in a fresh process
MIN_FIT_BUDGET_S = 5.0
OPTIMISER_LOAD_S = 4.0  # what the plan keeps for loading them (they load after it, when the search goes ahead)


def load_optimisers() -> None:
    """Import what learned schedules and global fits need, so that the budget pays for it up front."""
    import scipy.optimize  # noqa: F401

    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])


@dataclass
class SearchResult:
    program: Program
    chosen: Candidate
    candidates: list[Candidate]
    table: list[dict]
    seconds: float
    timings: dict


class Clock:
    """One search's time: its deadline (None: no time bound) and the seconds each stage took."""

    def __init__(self, budget_s: float | None):
        self.started = time.perf_counter()
        self.deadline = None if budget_s is None else self.started + budget_s
        self.timings: dict[str, float] = {}

    def lap(self, name: str, t0: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def share(self, fraction: float) -> float | None:
        """The deadline of a fit that may spend `fraction` of the remaining time (None: no time bound)."""
        return None if self.deadline is None else time.perf_counter() + self.remaining() * fraction

    def reserve(self, seconds: float) -> None:
        """Keep `seconds` at the end for what runs after the searches."""
        if self.deadline is not None:
            self.deadline = max(self.deadline - seconds, time.perf_counter())


# No references fit the budget (a large model on a CPU): ship this base solver unsearched. The prior is the
# family that wins most often in docs/accuracy.md's `auto` tables (gmm and digits, NFE 4-10): iPNDM, 9 of 14
# (DEIS-3 3, UniPC-3 2), always with the sigma_min final step; the next valid family when it cannot spend the NFE.
PRIOR_FAMILIES, PRIOR_FINAL = ("ipndm", "deis-3", "unipc-3"), "sigma_min"
PROBE_BATCH = 2  # noises of the first timed denoiser call (it decides which finer timing the budget affords)
PRECISE_TIMING_SHARE = 0.05  # of --budget, at most, for the precise timing (4416 image-calls, see _call_cost)
PRECISE_CALLS = 18 * 32 + 15 * 256  # image-calls of the precise timing


def _time_call(denoiser: Denoiser, m: int) -> float:
    """Seconds of ONE denoiser call on m noises (at sigma_max)."""
    x = torch.randn(m, *denoiser.shape, generator=torch.Generator().manual_seed(0)).to(denoiser.device) * denoiser.sigma_max
    labels = torch.zeros(m, dtype=torch.int64) if denoiser.conditional else None
    t0 = time.perf_counter()
    with torch.no_grad():
        denoiser(x, denoiser.sigma_max, labels)
    return time.perf_counter() - t0


def _chunked(per_call: Callable[[int], float]) -> Callable[[int], float]:
    """cost(n) of one step on n noises, 256 at a time (as the samplers chunk), from the cost of one call."""
    def cost(n: int) -> float:
        full, rest = divmod(n, 256)
        return full * per_call(256) + (per_call(rest) if rest else 0.0)
    return cost


def _call_cost(denoiser: Denoiser, budget_s: float) -> tuple[Callable[[int], float], float, str]:
    """(cost, seconds per image-call, how it was timed): cost(n) = seconds of one executor step (a denoiser call
    and its combinations) on n noises. First ONE call on PROBE_BATCH noises (warm-up included: an upper bound);
    then, each only when it costs <= PRECISE_TIMING_SHARE of `budget_s` at that rate, the finest affordable of:
    short Heun integrations of 32 and 256 noises after a warm-up (PRECISE_CALLS image-calls), extrapolated
    linearly; calls on PROBE_BATCH and on 32 noises (the fastest of 3 each), extrapolated linearly; one more call on
    PROBE_BATCH; else the probe's own. The last two: that cost per image times n (the per-call overhead counted
    per image: an over-estimate, on the safe side)."""
    rate = _time_call(denoiser, PROBE_BATCH) / PROBE_BATCH
    share = PRECISE_TIMING_SHARE * budget_s
    if rate * PRECISE_CALLS <= share:
        times = {}
        for m, steps in ((32, 2), (32, 8), (256, 8)):  # the first is the warm-up
            x = torch.randn(m, *denoiser.shape, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0)).to(denoiser.device)
            labels = torch.zeros(m, dtype=torch.int64) if denoiser.conditional else None
            t0 = time.perf_counter()
            reference_solution(denoiser, x, labels, steps=steps)
            times[m] = (time.perf_counter() - t0) / (2 * steps - 1)
        slope = max(times[256] - times[32], 0.0) / 224

        def cost(n: int) -> float:
            full, rest = divmod(n, 256)
            return full * times[256] + (times[32] + slope * max(rest - 32, 0) if rest else 0.0)
        return cost, times[256] / 256, "Heun runs on 32 and 256 noises"
    if rate * 3 * (PROBE_BATCH + 32) <= share:  # the fastest of 3 of each: one load spike would skew a slope
        small = min(_time_call(denoiser, PROBE_BATCH) for _ in range(3))
        large = min(_time_call(denoiser, 32) for _ in range(3))
        slope = max(large - small, 0.0) / (32 - PROBE_BATCH)
        return (_chunked(lambda m: small + slope * max(m - PROBE_BATCH, 0)), large / 32,
                f"calls on {PROBE_BATCH} and 32 noises")
    if rate * PROBE_BATCH <= share:  # the first call paid the warm-up (allocations, kernels): time one more
        rate = _time_call(denoiser, PROBE_BATCH) / PROBE_BATCH
        return (lambda n: rate * n), rate, f"a second call on {PROBE_BATCH} noises"
    return (lambda n: rate * n), rate, f"one call on {PROBE_BATCH} noises, warm-up included"


@dataclass
class ReferencePlan:
    """What the budget affords: calibration and held-out noises, reference Heun steps, what was cut; `fits`
    False: no references fit (ship the prior base unsearched); `afford_s`: the budget that would afford the
    minimal references, `full_s` the unreduced ones; `lines`: the plan block for the log."""
    batch: int
    holdout: int
    steps: int
    cut: str
    fits: bool = True
    afford_s: float = 0.0
    full_s: float = 0.0
    lines: tuple[str, ...] = ()


def reference_sizes(denoiser: Denoiser, nfe: int, n_cands: int, batch: int, holdout: int, steps: int,
                    budget_s: float | None) -> ReferencePlan:
    """The references, scoring the bases on the calibration noises and `n_cands` finalists on the held-out
    ones must fit FIXED_SHARE of the budget by the timed step cost (`_call_cost`); fewer Heun steps go first
    (down to MIN_REFERENCE_STEPS), then fewer noises (down to MIN_CALIB / MIN_HOLDOUT); when even those do
    not fit, `fits` is False."""
    if budget_s is None:
        return ReferencePlan(batch, holdout, steps, "")
    cost, rate, how = _call_cost(denoiser, budget_s)

    def total(n_cal, n_hold, n_steps):  # x 1.5: short timings run faster than long ones (caches, other load)
        return 1.5 * (2 * n_steps - 1 + n_cands * nfe) * (cost(n_cal) + cost(n_hold))

    new = [batch, holdout, steps]
    while total(*new) > FIXED_SHARE * budget_s:
        if new[2] > MIN_REFERENCE_STEPS:
            new[2] = max(MIN_REFERENCE_STEPS, int(new[2] * 0.7))
        elif new[0] > MIN_CALIB or new[1] > MIN_HOLDOUT:
            new[0], new[1] = max(MIN_CALIB, int(new[0] * 0.7)), max(MIN_HOLDOUT, int(new[1] * 0.7))
        else:
            break
    cut = [f"{what} {b} -> {a}" for what, a, b in zip(("calibration noises", "held-out noises", "reference steps"),
                                                      new, (batch, holdout, steps)) if a != b]
    afford = total(MIN_CALIB, MIN_HOLDOUT, MIN_REFERENCE_STEPS) / FIXED_SHARE
    full = total(batch, holdout, steps) / FIXED_SHARE
    fits = total(*new) <= FIXED_SHARE * budget_s
    lines = (f"  plan: {budget_s:.3g} s of the budget left after timing; {rate:.3g} s per image-call (timed by {how}); "
             f"references and scoring need {total(*new):.1f} s, their share of the budget is "
             f"{FIXED_SHARE * budget_s:.1f} s",)
    if fits:
        lines += (f"  plan: {new[0]} calibration + {new[1]} held-out noises, {new[2]} Heun steps"
                  + (f"; cut: {', '.join(cut)}" if cut else "; nothing cut")
                  + (f" (--budget {full:.0f} would afford them all)" if cut else ""),)
    else:
        lines += (f"  plan: dropped the search (references, fits, scoring): even {MIN_CALIB} + {MIN_HOLDOUT} noises at "
                  f"{MIN_REFERENCE_STEPS} Heun steps need --budget {afford:.0f} (the full search's references: "
                  f"--budget {full:.0f})",)
    return ReferencePlan(*new, ", ".join(cut), fits, afford, full, lines)


def prior_base(denoiser: Denoiser, nfe: int, families: list[str], finals: tuple[str, ...]) -> Candidate:
    """The unsearched base solver shipped when no references fit the budget (PRIOR_FAMILIES, PRIOR_FINAL;
    `families`: those that can spend `nfe`)."""
    fam = next(f for f in PRIOR_FAMILIES + tuple(families) if f in families)
    final = PRIOR_FINAL if PRIOR_FINAL in finals else finals[0]
    return Candidate(fam, final, "karras", "base", program_for(denoiser, fam, nfe, 1, "karras", final),
                     note="prior: no references fit the budget")


def _plan(denoiser: Denoiser, nfe: int, n_bases: int, opts: SearchOptions, cal: CalibrationOptions, clock: Clock,
          log, reserve_s: float = 0.0) -> ReferencePlan:
    """The reference sizes the remaining budget less `reserve_s` affords (`reference_sizes`), its plan block
    logged."""
    t0 = time.perf_counter()
    batch = opts.batch or (512 if denoiser.identity.get("kind") == "gmm" else 128)
    left = None if opts.budget_s is None else max(clock.remaining() - reserve_s, 0.0)
    plan = reference_sizes(denoiser, nfe, 2 * n_bases, batch, cal.holdout, cal.reference_steps, left)
    clock.lap("references", t0)  # the timing is part of what the references cost
    for line in plan.lines:
        log(line)
    if plan.cut and plan.fits:
        log(f"  references cut to fit --budget {opts.budget_s:g} s: {plan.cut}")
    return plan


def _evaluation_sets(denoiser: Denoiser, plan: ReferencePlan, cal: CalibrationOptions, clock: Clock,
                     log) -> tuple[EvalSet, EvalSet]:
    t0 = time.perf_counter()
    calib = evaluation_set(denoiser, plan.batch, cal.seed, plan.steps)
    hold = evaluation_set(denoiser, plan.holdout, cal.seed + HOLDOUT_SEED_OFFSET, plan.steps)
    for name, es in (("calibration references", calib), ("held-out references", hold)):
        es.reference_at(None, on_step=Ticker(name, log))  # computed here, so that the timings say what they cost
    clock.lap("references", t0)
    log(f"  references: {plan.batch} calibration + {len(hold)} held-out noises, {plan.steps} Heun steps "
        f"({clock.timings['references']:.1f} s)")
    return calib, hold


def _score_bases(denoiser, nfe, families, opts, calib: EvalSet, clock: Clock) -> list[Candidate]:
    """Every family x final step on the Karras schedule with base coefficients, scored on `calib`."""
    t0 = time.perf_counter()
    cands = []
    for fam in families:
        for final in opts.finals:
            prog = program_for(denoiser, fam, nfe, 1, "karras", final)
            c = Candidate(fam, final, "karras", "base", prog)
            c.calib_loss = float(calib_loss(calib.errors(prog, reference=calib.reference), opts.loss))
            cands.append(c)
    clock.lap("bases", t0)
    return cands


def _learn_schedules(denoiser, nfe, bases, opts, calib, clock: Clock, log) -> list[Candidate]:
    """Learned schedules for the top-k bases (they share ~55% of the remaining time)."""
    if denoiser.sigma_table is not None:
        log("  learned schedules skipped: the model is discrete (its sigmas are a table of training timesteps)")
        return []
    learned, top = [], bases[:opts.top_k]
    for k, b in enumerate(top):
        t0 = time.perf_counter()
        sig, info = learn_schedule(denoiser, b.family, nfe, b.final, calib, loss=opts.loss, max_evals=opts.max_evals,
                                   deadline=clock.share(0.55 / (len(top) - k)))
        learned.append(Candidate(b.family, b.final, "learned", "base", build_program(b.family, sig), info["loss"],
                                 seconds=info["seconds"], note=f"{info['evals']} evals"))
        clock.lap("schedules", t0)
        log(f"  schedule {b.family}/{b.final}: calibration loss {info['loss_karras']:.4g} -> {info['loss']:.4g} "
            f"({info['evals']} evals, {info['seconds']:.1f} s{', cut short by the budget' if info['cut'] else ''})")
    return learned


def _global_fits(denoiser, learned, bases, opts, calib, clock: Clock, log) -> list[Candidate]:
    """Global coefficient fits: the best learned schedule, the best Karras base, then more learned ones."""
    ranked = sorted(learned, key=lambda c: c.calib_loss)
    to_fit, out = (ranked[:1] + bases[:1] + ranked[1:])[:opts.global_fits], []
    for k, c in enumerate(to_fit):
        if clock.remaining() <= 0:
            log(f"  global fits: {len(to_fit) - k} of {len(to_fit)} skipped, the budget is spent (raise --budget)")
            break
        t0 = time.perf_counter()
        # the base coefficients of the iia program are the family's (all extra ones 0)
        prog = build_program("iia-" + c.family, c.program.sigmas, opts.r)
        prog, info = fit_global(denoiser, prog, calib, opts.loss, max_iter=opts.max_iter,
                                deadline=clock.share(0.6 / (len(to_fit) - k)))
        out.append(Candidate(c.family, c.final, c.schedule, "global", prog, info["loss"], seconds=info["seconds"],
                             note=f"{info['evals']} evals"))
        clock.lap("global fits", t0)
        log(f"  global fit {c.family}/{c.final}/{c.schedule}: calibration loss {info['loss_base']:.4g} -> "
            f"{info['loss']:.4g} ({info['evals']} evals, {info['seconds']:.1f} s"
            f"{', cut short by the budget' if info.get('cut') else ''})")
    return out


def _local_fit(denoiser, nfe, bases, opts, cal: CalibrationOptions, clock: Clock, log) -> list[Candidate]:
    """The paper's local fit on the best Karras base that supports it (final step "zero")."""
    if not opts.local:
        return []
    if clock.remaining() <= 0:
        log("  local IIA fit skipped: the budget is spent (raise --budget)")
        return []
    for b in bases:
        if b.final == "zero":
            t0 = time.perf_counter()
            res = calibrate(denoiser, "iia-" + b.family, nfe, CalibrationOptions(**{**vars(cal), "guard": False,
                                                                                   "r": opts.r}))
            clock.lap("local fit", t0)
            return [Candidate(b.family, b.final, "karras", "local", res.program, seconds=round(res.seconds, 2))]
    return []


def _choose(cands: list[Candidate], hold: EvalSet, clock: Clock) -> Candidate:
    """Score every candidate on held-out noise; eligible = no worse than its own base in RMSE and median."""
    t0 = time.perf_counter()
    for c in cands:
        # float32 states, as the compiled graph runs: a fit whose large coefficients amplify rounding pays for it
        err = hold.errors(c.program, dtype=torch.float32, reference=hold.reference)
        c.holdout = {"rmse": float((err**2).mean().sqrt()), "median": float(err.median()),
                     "p90": float(torch.quantile(err, 0.9))}
    clock.lap("held-out scoring", t0)
    base_of = {(c.family, c.final): c for c in cands if c.schedule == "karras" and c.coefficients == "base"}
    best_rmse = min(c.holdout["rmse"] for c in cands)
    best_median = min(c.holdout["median"] for c in cands)
    for c in cands:
        b = base_of[(c.family, c.final)].holdout
        c.holdout["eligible"] = c.holdout["rmse"] <= b["rmse"] and c.holdout["median"] <= b["median"]
        # geometric mean of the two ratios to the best candidate: scale-free, neither statistic dominates
        c.holdout["score"] = math.sqrt(c.holdout["rmse"] / best_rmse * c.holdout["median"] / best_median)
    return min((c for c in cands if c.holdout["eligible"]), key=lambda c: c.holdout["score"])


def auto_search(denoiser: Denoiser, nfe: int, options: SearchOptions | None = None,
                calibration: CalibrationOptions | None = None, log: Callable[[str], None] | None = None) -> SearchResult:
    """Search for the best sampler at `nfe` (see the module docstring); returns the chosen program and the table."""
    opts = options or SearchOptions()
    opts.validate()
    cal = (calibration or CalibrationOptions()).resolved(denoiser)
    log = log or (lambda text: None)
    clock = Clock(opts.budget_s)
    families = [f for f in opts.families if valid_nfe(f, nfe)]
    if not families:
        raise SearchError(f"no solver family can spend exactly NFE {nfe}")
    fits = opts.budget_s is None or opts.budget_s >= MIN_FIT_BUDGET_S
    load = fits and opts.budget_s is not None
    # planned first, so that a search the budget cannot afford does not load the optimisers either
    plan = _plan(denoiser, nfe, len(families) * len(opts.finals), opts, cal, clock, log,
                 OPTIMISER_LOAD_S if load else 0.0)
    if load and plan.fits:
        t0 = time.perf_counter()
        load_optimisers()
        clock.lap("loading optimisers", t0)
    if not plan.fits:
        chosen = prior_base(denoiser, nfe, families, opts.finals)
        log(f"  shipped {chosen.label} unsearched, by the documented prior (search.PRIOR_FAMILIES): --budget "
            f"{opts.budget_s:g} s cannot afford the references; --budget {plan.afford_s:.0f} would")
        table = [_row(chosen, chosen)]
        return SearchResult(chosen.program, chosen, [chosen], table, round(time.perf_counter() - clock.started, 2),
                            clock.timings)
    calib, hold = _evaluation_sets(denoiser, plan, cal, clock, log)
    cands = _score_bases(denoiser, nfe, families, opts, calib, clock)
    bases = sorted(cands, key=lambda c: c.calib_loss)
    # keep time for what runs after the searches: the local fit (~M + 1 calls per step on its batch) and scoring
    # every candidate on the held-out noises, estimated from what one calibration evaluation just cost
    per_eval = clock.timings["bases"] / max(len(cands), 1)
    n_final = len(cands) + opts.top_k + opts.global_fits + int(opts.local)
    clock.reserve(per_eval * (len(hold) / len(calib) * n_final
                              + (cal.M + 1) * cal.batch / len(calib) * int(opts.local)))
    if fits:
        learned = _learn_schedules(denoiser, nfe, bases, opts, calib, clock, log)
        cands += learned + _global_fits(denoiser, learned, bases, opts, calib, clock, log)
    else:
        log(f"  learned schedules and global fits skipped: --budget {opts.budget_s:g} s is below {MIN_FIT_BUDGET_S:g} s "
            f"(loading their optimisers alone takes seconds)")
    cands += _local_fit(denoiser, nfe, bases, opts, cal, clock, log)
    chosen = _choose(cands, hold, clock)
    table = [_row(c, chosen) for c in cands]
    return SearchResult(chosen.program, chosen, cands, table, round(time.perf_counter() - clock.started, 2),
                        clock.timings)


def _row(c: Candidate, chosen: Candidate) -> dict:
    return {"candidate": c.label, "solver": c.program.solver, "family": c.family, "final": c.final,
            "schedule": c.schedule, "coefficients": c.coefficients, "calib_loss": c.calib_loss,
            "seconds": c.seconds, "note": c.note, "chosen": c is chosen, **c.holdout}


def format_table(table: list[dict]) -> str:
    lines = [f"{'candidate':<40} {'held-out rmse':>13} {'median':>9} {'score':>7}  eligible"]
    for row in sorted(table, key=lambda r: r.get("score", 0.0)):
        mark = "  <- shipped" if row["chosen"] else ""
        if "rmse" not in row:  # the unsearched prior: nothing was scored
            lines.append(f"{row['candidate']:<40} {'not scored':>13} {'-':>9} {'-':>7}  {row['note']}{mark}")
            continue
        lines.append(f"{row['candidate']:<40} {row['rmse']:>13.5f} {row['median']:>9.5f} {row['score']:>7.3f}  "
                     f"{'yes' if row['eligible'] else 'no'}{mark}")
    return "\n".join(lines)


def to_calibration_result(result: SearchResult, calibration: CalibrationOptions, options: SearchOptions,
                          denoiser: Denoiser) -> CalibrationResult:
    """The chosen program as a CalibrationResult (for the coefficient artifact), the table in `search`."""
    chosen = result.chosen
    base = build_program(chosen.program.solver, chosen.program.sigmas, chosen.program.r)
    res = CalibrationResult(chosen.program, chosen.program, base, calibration.resolved(denoiser))
    base_row = next(r for r in result.table if r["family"] == chosen.family and r["final"] == chosen.final
                    and r["schedule"] == "karras" and r["coefficients"] == "base")
    # the unsearched prior (no references fit the budget) was never scored: no held-out record
    res.guard = {} if not chosen.holdout else {"holdout": int(calibration.resolved(denoiser).holdout), "rmse_base": base_row["rmse"],
                 "median_base": base_row["median"], "rmse_chosen": chosen.holdout["rmse"],
                 "median_chosen": chosen.holdout["median"], "decision": f"auto: {chosen.label}"}
    res.search = {"nfe": chosen.program.nfe, "chosen": chosen.label, "seconds": result.seconds,
                  "timings_s": result.timings, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                           for k, v in vars(options).items()},
                  "candidates": result.table}
    res.seconds = result.seconds
    return res
