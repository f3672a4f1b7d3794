"""What the time left after the references affords the `auto` search (`calibration/search.py`): how many learned
schedules and global fits (`fit_counts`), and which candidates are scored on the held-out noises
(`choose_finalists`). The references' own plan is `search_plan`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .search_plan import MIN_GLOBAL_EVALS, MIN_SCHEDULE_EVALS, is_prior
from .search_space import Candidate, SearchOptions


# the fewest evaluations a Karras global fit is planned at when nothing else fits: EDM's CIFAR-10 configuration
# (55.7 M parameters, 16 calibration noises) cut its iPNDM fit's calibration loss 430x in 4 L-BFGS evaluations,
# where a busy --budget 1800 left 971 s (4 such evaluations) idle and shipped the unfitted base
KARRAS_MIN_EVALS = 4


@dataclass(frozen=True)
class FitCounts:
    """What the search fits: `schedules` learned schedules, then `global_fits` global fits; `karras`: no schedule
    is learned and the global fits go to Karras bases (`search.globals_to_fit` with no learned schedule)."""
    schedules: int
    global_fits: int
    karras: bool = False


def fit_counts(opts: SearchOptions, per_eval: float, per_holdout: float, left: float, log) -> FitCounts:
    """The learned schedules and global fits the time `left` affords at `per_eval` seconds per calibration
    evaluation (+ `per_holdout` to score each on held-out noise): each schedule at least MIN_SCHEDULE_EVALS
    evaluations in its ~55% share (all of it without global fits), each global fit MIN_GLOBAL_EVALS (~3
    evaluations' time each: the backward pass) in the rest; the options' counts at most.

    When that leaves no global fit, the time goes to one global fit on a Karras base instead (the prior's when
    scored: `search.globals_to_fit`), no schedule, even at KARRAS_MIN_EVALS evaluations. At equal time (16x16
    EDM-format pickles, NFE 9, 128 calibration noises) a Karras global fit reached a lower held-out RMSE than a learned schedule on ADM (iPNDM's fit 0.035x
    the best base's vs DEIS-3's schedule 0.17x) and NCSN++ (UniPC-2's 0.21x vs 0.39x), about the same on DDPM++
    (iPNDM's 0.84x vs UniPC-2's schedule 0.80x), where iPNDM's is 0.31x its own Karras base."""
    if per_eval <= 0 or math.isinf(left):
        return FitCounts(opts.top_k, opts.global_fits)
    one_global = 3 * MIN_GLOBAL_EVALS * per_eval + per_holdout
    n_global = min(opts.global_fits, max(int(0.45 * left / one_global), 0))
    share = 0.55 if n_global else 0.95
    top_k = min(opts.top_k, max(int(share * left / (MIN_SCHEDULE_EVALS * per_eval + per_holdout)), 0))
    said = f"{left:.0f} s left afford ~{left / per_eval:.0f} calibration evaluations of {per_eval:.2g} s"
    if n_global == 0 and opts.global_fits > 0 and 0.95 * left >= 3 * KARRAS_MIN_EVALS * per_eval + per_holdout:
        log(f"  plan: one global fit on a Karras base (the prior's when scored) and no learned schedule (too short "
            f"for a schedule and a global fit on it): {said}")
        return FitCounts(0, 1, True)
    if (top_k, n_global) != (opts.top_k, opts.global_fits):
        log(f"  plan: {top_k} of {opts.top_k} learned schedules and {n_global} of {opts.global_fits} global fits: "
            f"{said}")
    return FitCounts(top_k, n_global)


# a base whose calibration loss is over this many times the best base's is not scored on held-out noise unless a
# fit was built on it (4: twice the RMSE under the default "mse" loss); on a busy 16x16 DDPM++ pickle, 13 held-out
# candidates took 31 of 169 s, 8 of them bases 2.4-5.5x the best base's RMSE
FINALIST_LOSS_FACTOR = 4.0


def held_out_bases(bases: list[Candidate]) -> list[Candidate]:
    """The bases (sorted by calibration loss) the held-out scoring keeps when time allows: those within
    FINALIST_LOSS_FACTOR of the best's calibration loss, and the prior's (PRIOR_FAMILIES[0], PRIOR_FINAL)."""
    if not bases:
        return []
    limit = FINALIST_LOSS_FACTOR * bases[0].calib_loss
    return [b for b in bases if b.calib_loss <= limit or is_prior(b)]


def choose_finalists(cands: list[Candidate], bases: list[Candidate], per_eval: float, left: float, log) -> list[Candidate]:
    """The candidates to score on held-out noise: the fitted ones, their own bases and `held_out_bases`; when
    `left` seconds at `per_eval` each cannot afford those, the fitted ones, their own bases and the best other
    bases by calibration loss that fit (at least one)."""
    fitted = [c for c in cands if not (c.schedule == "karras" and c.coefficients == "base")]
    needed = {(c.family, c.final) for c in fitted}
    worth = held_out_bases(bases)
    pool = [c for c in cands if c in fitted or c in worth or (c in bases and (c.family, c.final) in needed)]
    if per_eval * len(pool) <= left:
        if len(pool) < len(cands):
            left_out = ", ".join(f"{c.family}/{c.final} {c.calib_loss:.3g}" for c in cands if c not in pool)
            log(f"  held-out scoring: {len(pool)} of {len(cands)} candidates; not scored, their calibration loss over "
                f"{FINALIST_LOSS_FACTOR:g}x the best base's {bases[0].calib_loss:.3g}: {left_out}")
        return pool
    keep = [b for b in bases if (b.family, b.final) in needed] or bases[:1]
    for b in bases:
        if b not in keep and per_eval * (len(fitted) + len(keep) + 1) <= left:
            keep.append(b)
    out = [c for c in cands if c in keep or c in fitted]
    log(f"  held-out scoring: {len(out)} of {len(cands)} candidates ({left:.0f} s left at {per_eval:.2g} s each; "
        f"the other bases ranked lower on calibration noise)")
    return out
