"""What the `auto` search ships and how it is recorded: the finalists scored on held-out noise and the shipping
rule applied (`choose`), the references' check of the choice (`checked_choice`), the candidate table
(`row`, `format_table`) and the choice as the coefficient artifact's CalibrationResult (`to_calibration_result`).
The search's phases are `calibration/search.py`'s."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from iia.cli import Ticker
from iia.models.base import Denoiser

from .evalset import EvalSet
from .fit import CalibrationOptions, CalibrationResult
from .references import reference_check
from .search_fits import coefficient_limit, largest_coefficient
from .search_plan import Clock
from .search_space import Candidate, SearchOptions, own_base
from .shipping import LEVEL, judge, rule_text
from .sampling import sample
from .solvers import build_program


class TickingSet:
    """An EvalSet whose `errors` ticks a Ticker per program scored (the held-out scoring of the finalists)."""

    def __init__(self, inner: EvalSet, tick: Ticker, total: int):
        self.inner, self.tick, self.total, self.done = inner, tick, total, 0
        self.reference = inner.reference

    def errors(self, *args, **kwargs) -> torch.Tensor:
        out = self.inner.errors(*args, **kwargs)
        self.done += 1
        self.tick(self.done, self.total)
        return out

    def __len__(self) -> int:
        return len(self.inner)


def choose(cands: list[Candidate], hold: EvalSet, clock: Clock, level: float = LEVEL) -> Candidate:
    """Score every candidate on held-out noise; eligible = passes the shipping rule against its own base (same
    family and final step, Karras, base coefficients; `shipping.judge` at one-sided `level`); the eligible one
    with the lowest held-out RMSE ships (the test metric; ties: the lower median) unless the float32 graph cannot
    reproduce it (`float32_stray`: then the next)."""
    t0 = time.perf_counter()
    sq = {}
    for c in cands:
        # float32 states, as the compiled graph runs: a fit whose large coefficients amplify rounding pays for it
        err = hold.errors(c.program, dtype=torch.float32, reference=hold.reference)
        sq[id(c)] = err**2
        c.holdout = {"rmse": float((err**2).mean().sqrt()), "median": float(err.median()),
                     "p90": float(torch.quantile(err, 0.9))}
    for c in cands:
        base = own_base(c, cands)
        c.holdout.update(judge(sq[id(c)], sq[id(base)], level).record())
        if c is base:  # against itself the mean test is moot: null in coefficients.json, "-" in the table
            c.holdout["mean_gain"] = None
    ranked = sorted((c for c in cands if c.holdout["eligible"]), key=lambda c: (c.holdout["rmse"], c.holdout["median"]))
    chosen = None
    for c in ranked:  # the best that the float32 graph can reproduce (a base always can: it is its own base)
        stray = float32_stray(c, own_base(c, cands), hold)
        if stray is None:
            chosen = c
            break
        c.holdout.update(eligible=False, float32_stray=stray[0], float32_stray_base=stray[1])
    clock.lap("held-out scoring", t0)
    return chosen


# A fitted candidate with a coefficient past `search_fits.coefficient_limit` of its base (10x its base's largest, at
# least 1; the global fit's bound) is run once more in float64 on a few held-out noises: large
# coefficients on small terms (a global fit's last step to sigma 0, 16 calibration noises, before that limit: 3430
# on iPNDM's newest term, whose base coefficient is 2.3) amplify float32 rounding, and the graph, rounding in
# another order than PyTorch, then missed the parity check (gmm NFE 7: 0.0199 > 10x the floor)
# ... and refused when its float32 run strays from its float64 run by more than this many times its base's stray
# (the parity check's allowance is 10x the float32 floor) and more than FLOAT32_STRAY of the output's scale
STRAY_FACTOR, FLOAT32_STRAY, STRAY_NOISES = 10.0, 1e-5, 4


def _stray(program, hold) -> tuple[float, float]:
    """(max |float32 run - float64 run|, the float64 output's scale (max |x|, at least 1)) on the first
    STRAY_NOISES held-out noises."""
    inner = getattr(hold, "inner", hold)
    noise = inner.noise[:STRAY_NOISES]
    labels = None if inner.labels is None else inner.labels[:STRAY_NOISES]
    x64 = sample(program, inner.denoiser, noise, labels, dtype=torch.float64)
    x32 = sample(program, inner.denoiser, noise, labels, dtype=torch.float32).to(torch.float64)
    return float((x32 - x64).abs().max()), max(1.0, float(x64.abs().max()))


def float32_stray(c: Candidate, base: Candidate, hold) -> tuple[float, float] | None:
    """None when `c` can ship as the float32 graph computes it: a base, a fit whose every |coefficient| is at
    most `search_fits.coefficient_limit` of its base, or one whose float32 run strays from float64 at most STRAY_FACTOR
    x its base's and FLOAT32_STRAY of the output's scale; else (that stray, its base's), relative to the output's
    scale."""
    if c is base:
        return None
    if largest_coefficient(c.program) <= coefficient_limit(base.program):
        return None
    stray, scale = _stray(c.program, hold)
    base_stray, _ = _stray(base.program, hold)
    return None if stray <= max(STRAY_FACTOR * base_stray, FLOAT32_STRAY * scale) else (stray / scale,
                                                                                      base_stray / scale)


def checked_choice(chosen: Candidate, finalists: list[Candidate], plan, max_steps: int, default_cap: bool,
                    log) -> tuple[Candidate, dict]:
    """`references.reference_check` of the choice (logged), and the choice itself unless the references' error
    leaves it possibly worse than its own Karras base (held-out RMSE + error > the base's - error: a fit to coarse
    references learns their error, and the shipping rule's bound then measures the references): its base then
    ships, checked the same way."""
    if not chosen.holdout.get("rmse"):  # (the unsearched prior has no held-out record)
        return chosen, {}
    base = own_base(chosen, finalists)
    line, resolution = reference_check(plan.accuracy, plan.steps, chosen.holdout["rmse"],
                                       None if chosen is base else base.holdout["rmse"], max_steps, default_cap)
    log(line)
    error = resolution.get("reference_error") or 0.0
    if chosen is not base and "rmse_chosen_upper" in resolution and \
            resolution["rmse_chosen_upper"] > base.holdout["rmse"] - error:
        log(f"  {chosen.label} not shipped: within the references' error {error:.2g} it may be worse than its base "
            f"({chosen.holdout['rmse']:.3g} + {error:.2g} > {base.holdout['rmse']:.3g} - {error:.2g}); shipped "
            f"{base.label}")
        return checked_choice(base, finalists, plan, max_steps, default_cap, log)
    return chosen, resolution


def row(c: Candidate, chosen: Candidate) -> dict:
    return {"candidate": c.label, "solver": c.program.solver, "family": c.family, "final": c.final,
            "schedule": c.schedule, "coefficients": c.coefficients, "calib_loss": c.calib_loss,
            "seconds": c.seconds, "note": c.note, "round": c.round, "chosen": c is chosen, **c.holdout}


def format_table(table: list[dict]) -> str:
    """The candidate table, best held-out RMSE first: rmse, median, rmse / its own base's and the shipping rule's
    one-sided upper bound of that ratio (`shipping.judge`), eligible or not."""
    lines = [f"{'candidate':<40} {'held-out rmse':>13} {'median':>9} {'/ base':>7} {'upper':>7} {'mean gain':>9}  "
             f"eligible"]
    for row in sorted(table, key=lambda r: (r.get("rmse", 0.0), r.get("median", 0.0))):
        mark = "  <- shipped" if row["chosen"] else ""
        if "rmse" not in row:  # the unsearched prior: nothing was scored
            lines.append(f"{row['candidate']:<40} {'not scored':>13} {'-':>9} {'-':>7} {'-':>7} {'-':>9}  "
                         f"{row['note']}{mark}")
            continue
        # a base is its own base: its mean test is moot ("-"); otherwise say which test refused the candidate
        is_base = row["schedule"] == "karras" and row["coefficients"] == "base"
        gain = "-" if is_base else ("yes" if row["mean_gain"] else "no")
        why = [] if row["eligible"] or is_base else (
            [f"upper > {1 + row['tolerance']:g}"] * (row["ratio_upper"] > 1 + row["tolerance"])
            + ["no mean gain"] * (not row["mean_gain"])
            + ([f"float32 strays {row['float32_stray']:.2g} of its scale, over {STRAY_FACTOR:g}x its base's "
                 f"{row['float32_stray_base']:.2g} and {FLOAT32_STRAY:g}"] if "float32_stray" in row else []))
        lines.append(f"{row['candidate']:<40} {row['rmse']:>13.5f} {row['median']:>9.5f} {row['ratio_to_base']:>7.3f} "
                     f"{row['ratio_upper']:>7.3f} {gain:>9}  {'yes' if row['eligible'] else 'no'}"
                     f"{' (' + ', '.join(why) + ')' if why else ''}{mark}")
    return "\n".join(lines)


def to_calibration_result(result, calibration: CalibrationOptions, options: SearchOptions,
                          denoiser: Denoiser) -> CalibrationResult:
    """The chosen program of `result` (a `search.SearchResult`) as a CalibrationResult (for the coefficient
    artifact), the table in `search`."""
    chosen = result.chosen
    base = build_program(chosen.program.solver, chosen.program.sigmas, chosen.program.r)
    used = result.references
    resolved = calibration.resolved(denoiser)
    # the search's held-out noises and references, not the guard's defaults it never used
    # (and its calibration noises, the shipped candidate's schedule and history r, not the local fit's defaults)
    recorded = replace(resolved, r=chosen.program.r) if not used else replace(
        resolved, holdout=used["holdout"], reference_steps=used["steps"], batch=used["calibration"],
        schedule=chosen.schedule, r=chosen.program.r)
    res = CalibrationResult(chosen.program, chosen.program, base, recorded)
    base_row = next(r for r in result.table if r["family"] == chosen.family and r["final"] == chosen.final
                    and r["schedule"] == "karras" and r["coefficients"] == "base")
    # the unsearched prior (no references fit the budget) was never scored: no held-out record
    res.guard = {} if not chosen.holdout else {
        "holdout": used["holdout"], "calibration": used["calibration"],
        "reference": {"integrator": used["integrator"], "steps": used["steps"]},
        "rmse_base": base_row["rmse"], "median_base": base_row["median"], "rmse_chosen": chosen.holdout["rmse"],
        "median_chosen": chosen.holdout["median"], "decision": f"auto: {chosen.label}",
        "rule": rule_text(chosen.holdout["level"], chosen.holdout["tolerance"], "its own base's")
        + "; the lowest held-out rmse ships",
        "ratio_to_base": chosen.holdout["ratio_to_base"], "ratio_upper": chosen.holdout["ratio_upper"],
        "mean_gain": chosen.holdout["mean_gain"],
        **{k: used[k] for k in ("reference_error", "rmse_chosen_upper") if k in used}}
    fitted = (chosen.schedule, chosen.coefficients) != ("karras", "base")
    lower = base_row["rmse"] - used.get("reference_error", 0.0) if fitted and "rmse_chosen_upper" in used else 0.0
    if lower > 0:  # the rule's bound measured the references too: the larger of it and theirs (a shipped fit's <= 1)
        res.guard["ratio_upper"] = max(res.guard["ratio_upper"], used["rmse_chosen_upper"] / lower)
    res.search = {"nfe": chosen.program.nfe, "chosen": chosen.label, "seconds": result.seconds, "references": used,
                  "fits": result.fits, "busy_machine": result.busy,
                  "timings_s": result.timings, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                           for k, v in vars(options).items()},
                  "candidates": result.table}
    res.seconds = result.seconds
    return res
