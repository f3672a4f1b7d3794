"""What the time left after the references affords the `auto` search (`calibration/search.py`): how many learned
schedules and global fits (`fit_counts`), and which candidates are scored on the held-out noises
(`choose_finalists`). The references' own plan is `search_plan`'s."""

from __future__ import annotations

import math

from .search_plan import MIN_GLOBAL_EVALS, MIN_SCHEDULE_EVALS
from .search_space import Candidate, SearchOptions


def fit_counts(opts: SearchOptions, per_eval: float, per_holdout: float, left: float, log) -> tuple[int, int]:
    """(learned schedules, global fits) the time `left` affords at `per_eval` seconds per calibration evaluation
    (+ `per_holdout` to score each on held-out noise): each schedule at least MIN_SCHEDULE_EVALS evaluations in
    its ~55% share (all of it without global fits), each global fit MIN_GLOBAL_EVALS (~3 evaluations' time each:
    the backward pass) in the rest; the options' counts at most."""
    if per_eval <= 0 or math.isinf(left):
        return opts.top_k, opts.global_fits
    n_global = min(opts.global_fits, max(int(0.45 * left / (3 * MIN_GLOBAL_EVALS * per_eval + per_holdout)), 0))
    share = 0.55 if n_global else 0.95
    top_k = min(opts.top_k, max(int(share * left / (MIN_SCHEDULE_EVALS * per_eval + per_holdout)), 0))
    if (top_k, n_global) != (opts.top_k, opts.global_fits):
        log(f"  plan: {top_k} of {opts.top_k} learned schedules and {n_global} of {opts.global_fits} global fits: "
            f"{left:.0f} s left afford ~{left / per_eval:.0f} calibration evaluations of {per_eval:.2g} s")
    return top_k, n_global


def choose_finalists(cands: list[Candidate], bases: list[Candidate], per_eval: float, left: float, log) -> list[Candidate]:
    """The candidates to score on held-out noise: all, unless `left` seconds at `per_eval` each cannot: then the
    fitted ones, their own bases and the best other bases by calibration loss that fit (at least one)."""
    if per_eval * len(cands) <= left:
        return cands
    fitted = [c for c in cands if not (c.schedule == "karras" and c.coefficients == "base")]
    needed = {(c.family, c.final) for c in fitted}
    keep = [b for b in bases if (b.family, b.final) in needed] or bases[:1]
    for b in bases:
        if b not in keep and per_eval * (len(fitted) + len(keep) + 1) <= left:
            keep.append(b)
    out = [c for c in cands if c in keep or c in fitted]
    log(f"  held-out scoring: {len(out)} of {len(cands)} candidates ({left:.0f} s left at {per_eval:.2g} s each; "
        f"the other bases ranked lower on calibration noise)")
    return out

