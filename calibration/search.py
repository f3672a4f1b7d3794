"""The `auto` search: the best sampler at a given NFE, by END-TO-END error on held-out noise.

For one NFE, candidates = solver families x final-step convention x schedule (Karras / learned) x coefficients
(base / local IIA / global) (`search_space`), NOT all combinations: every family x final step on the Karras
schedule with base coefficients, learned schedules (`search_fits.learn_schedule`) and global fits
(`search_fits.fit_global`) for the best of those, and the paper's local fit on the best base that has one; then,
while the budget lasts, further rounds of the lead's schedule and global fit, each on fresh calibration noises
(`search_rounds`: a fit depends on its draw of noises more than on its evaluation counts).
All are scored on HELD-OUT noise; a candidate is eligible only if it passes the shipping rule against its own
base (same family and final step, Karras, base coefficients: `shipping.judge`, a paired-bootstrap upper bound on
the ratio of their RMSEs and a paired mean test); the eligible one with the lowest held-out RMSE ships. `SearchOptions.budget_s` bounds the whole search, references included: a timed denoiser call and the
reference's measured accuracy (`references.choose_steps`) size the noises, the reference steps, the base families
scored and the fits (the plan block in the log says what was cut and which budget would afford it all); every
later phase watches the clock at the pace measured since (references re-planned after each batch, bases and
finalists scored while the time lasts, fits stopped at their deadlines), so a machine that gets busier after
the timing cuts work, not the budget; long phases log progress with an ETA (`iia.cli.Ticker`).
`budget_s=None` bounds it by evaluation counts only. The budget's arithmetic (timing, plan, pace, sizes) is
`calibration/search_plan.py`; this module runs the phases and chooses.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from iia.cli import Ticker
from iia.models.base import Denoiser

from .evalset import EvalSet
from .fit import CalibrationOptions, CalibrationResult, calibrate
from .references import INTEGRATOR, reference_check
from .schedules import program_for
from .search_budget import choose_finalists, fit_counts
from .search_plan import (FIXED_SHARE, LOCAL_FIT_SHARE, MIN_FIT_BUDGET_S, MIN_HOLDOUT, MIN_SCHEDULE_EVALS,
                          OPTIMISER_LOAD_S, PRIOR_FAMILIES, PRIOR_FINAL, SEARCH_HOLDOUT, SEARCH_HOLDOUT_FLOOR, Clock,
                          Pace, ReferencePlan, evaluation_sets, load_optimisers_beside, plan_references, prior_base)
from .search_fits import calib_loss, global_candidate, schedule_candidate
from .search_rounds import fit_rounds
from .search_space import FAMILIES, Candidate, SearchError, SearchOptions, own_base
from .shipping import LEVEL, judge, rule_text
from .solvers import Program, build_program, valid_nfe

__all__ = ["FAMILIES", "PRIOR_FAMILIES", "SEARCH_VERSION", "Candidate", "SearchError", "SearchOptions", "SearchResult",
           "auto_search", "format_table", "to_calibration_result"]

# Bumped when what the search ships or records for the same options changes, so that a cached `auto` result is
# searched again (iia-compile's coefficient cache key; 2: 1024 held-out noises for networks, the prior's global
# fit, a base's mean test recorded as null; 3: fit rounds on fresh calibration noises; 4: the references' error and
# the shipped RMSE's upper bound when they are over 0.1x of it, the probe measures the cap's steps, a cut keeps the
# probe's best base, a re-plan never raises a small --holdout, global fits at r = 3).
SEARCH_VERSION = 4
MIN_FIT_NOISES = 32  # below this many calibration noises the search says that its fits will overfit them


@dataclass
class SearchResult:
    program: Program
    chosen: Candidate
    candidates: list[Candidate]
    table: list[dict]
    seconds: float
    timings: dict
    # what the held-out scoring used: {"calibration": noises, "holdout": noises, "integrator": ..., "steps": ...}
    # (empty for the unsearched prior)
    references: dict = field(default_factory=dict)


def _score_bases(denoiser, nfe, plan: ReferencePlan, opts, calib: EvalSet, clock: Clock, pace: Pace,
                 fixed_until: float | None, log) -> list[Candidate]:
    """The planned families x final steps on the Karras schedule with base coefficients, scored on `calib` in
    the plan's order (the probe's best base's family first, then PRIOR_FAMILIES); the rest is skipped (and said)
    when the measured pace would pass `fixed_until`."""
    t0 = time.perf_counter()
    pairs = [(fam, final) for fam in plan.families for final in plan.finals]
    cands, tick = [], Ticker("scoring base solvers", log)
    for k, (fam, final) in enumerate(pairs):
        if cands and fixed_until is not None and time.perf_counter() + pace.predict(len(calib), nfe) > fixed_until:
            log(f"  base solvers: {len(pairs) - k} of {len(pairs)} not scored, the budget's share is spent")
            break
        prog = program_for(denoiser, fam, nfe, 1, "karras", final)
        c = Candidate(fam, final, "karras", "base", prog)
        t1 = time.perf_counter()
        c.calib_loss = float(calib_loss(calib.errors(prog, reference=calib.reference), opts.loss))
        pace.observe(len(calib), nfe, time.perf_counter() - t1)
        cands.append(c)
        tick(k + 1, len(pairs))
    clock.lap("bases", t0)
    return cands


def schedules_to_learn(bases: list[Candidate], top_k: int) -> list[Candidate]:
    """The bases (sorted by calibration loss) that get a learned schedule: the top `top_k`, the prior's
    (PRIOR_FAMILIES[0], PRIOR_FINAL) in the last slot when it was scored but ranked lower and top_k >= 2. A base's
    loss does not rank what fitting makes of it: gmm NFE 5, deis-3 and deis-2 ranked first and deis-3's fit
    shipped at test RMSE 0.055; with iPNDM's schedule learned too, iPNDM's fit ships at 0.041 (docs/accuracy.md)."""
    top = bases[:top_k]
    prior = next((b for b in bases if (b.family, b.final) == (PRIOR_FAMILIES[0], PRIOR_FINAL)), None)
    if top_k >= 2 and prior is not None and prior not in top:
        top = top[:-1] + [prior]
    return top


def _learn_schedules(denoiser, nfe, bases, opts, calib, clock: Clock, log, top_k: int,
                     share: float = 0.55) -> list[Candidate]:
    """Learned schedules for `schedules_to_learn(bases, top_k)` (they share `share` of the remaining time equally,
    one's unused time carried to the next: `_equal_part`)."""
    if denoiser.sigma_table is not None:
        log("  learned schedules skipped: the model is discrete (its sigmas are a table of training timesteps)")
        return []
    learned, top = [], schedules_to_learn(bases, top_k)
    phase_end = clock.share(share)
    for k, b in enumerate(top):
        t0 = time.perf_counter()
        cand, info = schedule_candidate(denoiser, nfe, b.family, b.final, calib, opts,
                                        _equal_part(phase_end, len(top) - k), log)
        learned.append(cand)
        clock.lap("schedules", t0)
        log(f"  schedule {b.family}/{b.final}: calibration loss {info['loss_karras']:.4g} -> {info['loss']:.4g} "
            f"({info['evals']} evals, {info['seconds']:.1f} s{', cut short by the budget' if info['cut'] else ''})")
    return learned


def _equal_part(phase_end: float | None, left: int) -> float | None:
    """The deadline of the next of `left` fits sharing the time until `phase_end` equally (None: no bound). A
    share of the time remaining after the fits before gave the last fit the most (digits NFE 9: the lead's global
    fit cut at 41 evaluations, the Karras base's after it ran its 63 in full)."""
    return None if phase_end is None else time.perf_counter() + max(phase_end - time.perf_counter(), 0.0) / left


def globals_to_fit(learned: list[Candidate], bases: list[Candidate], n_fits: int) -> list[Candidate]:
    """What gets a global fit, in order: the best learned schedule (by calibration loss), the prior's (PRIOR_FAMILIES[0],
    PRIOR_FINAL) learned schedule when it ranks lower, the best Karras base, then the other learned ones. A
    schedule's loss does not rank what a global fit makes of it: on a 16x16 DDPM++ pickle at NFE 9, unipc-2/zero's
    learned schedule led (held-out 0.0065) and its global fit gained nothing; iPNDM's reached 0.0051."""
    ranked = sorted(learned, key=lambda c: c.calib_loss)
    prior = [c for c in ranked[1:] if (c.family, c.final) == (PRIOR_FAMILIES[0], PRIOR_FINAL)][:1]
    order = ranked[:1] + prior + bases[:1] + [c for c in ranked[1:] if c not in prior]
    return order[:n_fits]


def _global_fits(denoiser, learned, bases, opts, calib, clock: Clock, log, n_fits: int) -> list[Candidate]:
    """Global coefficient fits for `globals_to_fit` (they share 60% of the remaining time equally)."""
    to_fit, out = globals_to_fit(learned, bases, n_fits), []
    phase_end = clock.share(0.6)
    for k, c in enumerate(to_fit):
        if clock.remaining() <= 0:
            log(f"  global fits: {len(to_fit) - k} of {len(to_fit)} skipped, the budget is spent (raise --budget)")
            break
        t0 = time.perf_counter()
        cand, info = global_candidate(denoiser, c, calib, opts, _equal_part(phase_end, len(to_fit) - k), log)
        out.append(cand)
        clock.lap("global fits", t0)
        log(f"  global fit {c.family}/{c.final}/{c.schedule}: calibration loss {info['loss_base']:.4g} -> "
            f"{info['loss']:.4g} ({info['evals']} evals, {info['seconds']:.1f} s"
            f"{', cut short by the budget' if info.get('cut') else ''})")
    return out


def _rounds(denoiser, nfe, learned, bases, fitted, opts, cal, calib, plan, clock, pace, per_holdout, cache,
            log) -> list[Candidate]:
    """`search_rounds.fit_rounds` for the lead: the candidate the first global fit went to (`globals_to_fit`),
    with that global fit when there was one; nothing when the lead has neither a learned schedule nor a fit."""
    lead = (globals_to_fit(learned, bases, 1) or [None])[0]
    if opts.rounds < 2 or lead is None:
        return []
    lead_fit = next((g for g in fitted if (g.family, g.final, g.schedule) == (lead.family, lead.final, lead.schedule)),
                    None)
    if lead.schedule == "karras" and lead_fit is None:
        return []
    return fit_rounds(denoiser, nfe, lead, lead_fit, opts, cal, len(calib), plan, clock, pace, per_holdout, cache,
                      log)


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
            tick = Ticker(f"local IIA fit {b.family}", log)
            res = calibrate(denoiser, "iia-" + b.family, nfe, CalibrationOptions(**{**vars(cal), "guard": False,
                                                                                   "r": opts.r}),
                            progress=lambda done, total, text: tick(done, total))
            clock.lap("local fit", t0)
            return [Candidate(b.family, b.final, "karras", "local", res.program, seconds=round(res.seconds, 2))]
    return []


class _TickingSet:
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


def _choose(cands: list[Candidate], hold: EvalSet, clock: Clock, level: float = LEVEL) -> Candidate:
    """Score every candidate on held-out noise; eligible = passes the shipping rule against its own base (same
    family and final step, Karras, base coefficients; `shipping.judge` at one-sided `level`); the eligible one
    with the lowest held-out RMSE ships (the test metric; ties: the lower median)."""
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
    clock.lap("held-out scoring", t0)
    return min((c for c in cands if c.holdout["eligible"]), key=lambda c: (c.holdout["rmse"], c.holdout["median"]))


def _checked_choice(chosen: Candidate, finalists: list[Candidate], plan, max_steps: int, default_cap: bool,
                    log) -> tuple[Candidate, dict]:
    """`references.reference_check` of the choice (logged), and the choice itself unless the references' error
    leaves it possibly worse than its own Karras base (held-out RMSE + error > the base's - error: a fit to coarse
    references learns their error, and the shipping rule's bound then measures the references): its base then
    ships, checked the same way."""
    if not chosen.holdout.get("rmse"):  # (the unsearched prior has no held-out record)
        return chosen, {}
    base = own_base(chosen, finalists)
    line, resolution = reference_check(plan.accuracy, plan.steps, chosen.holdout["rmse"], base.holdout["rmse"],
                                       max_steps, default_cap)
    log(line)
    error = resolution.get("reference_error") or 0.0
    if chosen is not base and "rmse_chosen_upper" in resolution and \
            resolution["rmse_chosen_upper"] > base.holdout["rmse"] - error:
        log(f"  {chosen.label} not shipped: within the references' error {error:.2g} it may be worse than its base "
            f"({chosen.holdout['rmse']:.3g} + {error:.2g} > {base.holdout['rmse']:.3g} - {error:.2g}); shipped "
            f"{base.label}")
        return _checked_choice(base, finalists, plan, max_steps, default_cap, log)
    return chosen, resolution


class _Watchdog:
    """The search's log with a watchdog thread: a line whenever nothing was logged for `every` seconds (one
    evaluation of a large model on a CPU can take minutes, longer than a phase's own progress ticks)."""

    def __init__(self, log: Callable[[str], None], every: float = 12.0):
        self.log, self.every = log, every
        self.started = self.last = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="search watchdog", daemon=True)

    def __call__(self, text: str) -> None:
        self.last = time.perf_counter()
        self.log(text)

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            now = time.perf_counter()
            if now - self.last >= self.every:
                self(f"  search: still working, {now - self.started:.0f} s in ({now - self.last:.0f} s since the "
                     f"last line)")

    def __enter__(self) -> "_Watchdog":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def auto_search(denoiser: Denoiser, nfe: int, options: SearchOptions | None = None,
                calibration: CalibrationOptions | None = None, log: Callable[[str], None] | None = None,
                reference_cache: Path | None = None) -> SearchResult:
    """Search for the best sampler at `nfe` (see the module docstring); returns the chosen program and the table.
    `reference_cache`: the folder of the one cache where reference solutions are kept (None: not cached)."""
    opts = options or SearchOptions()
    opts.validate()
    if opts.batch is not None and opts.batch < MIN_FIT_NOISES and log is not None:
        log(f"  --calib-batch {opts.batch}: fits to fewer than {MIN_FIT_NOISES} calibration noises overfit them (the "
            f"shipping rule then refuses most); the search's default is 512 analytic, 128 networks")
    with _Watchdog(log or (lambda text: None)) as watched:
        return _search(denoiser, nfe, opts, calibration, watched, reference_cache)


def _search_holdout(given: CalibrationOptions, cal: CalibrationOptions, log) -> tuple[CalibrationOptions, int | None]:
    """(options, floor): unless --holdout is given, the search asks for SEARCH_HOLDOUT held-out noises, which a
    short budget cuts first down to the floor, SEARCH_HOLDOUT_FLOOR or the guard's default where smaller (`cal` is
    resolved); a given one below MIN_HOLDOUT is used, and said to be unreliable."""
    if given.holdout is None:
        return replace(cal, holdout=SEARCH_HOLDOUT), min(cal.holdout, SEARCH_HOLDOUT_FLOOR)
    if given.holdout < MIN_HOLDOUT:
        log(f"  --holdout {given.holdout}: below {MIN_HOLDOUT} held-out noises the shipping rule's 95% bound is "
            f"not reliable (a fit may ship on chance); the search's default is {SEARCH_HOLDOUT}")
    return cal, None


def _search(denoiser: Denoiser, nfe: int, opts: SearchOptions, calibration: CalibrationOptions | None,
            log: Callable[[str], None], reference_cache: Path | None) -> SearchResult:
    given = calibration or CalibrationOptions()
    cal = given.resolved(denoiser)
    cal, holdout_floor = _search_holdout(given, cal, log)
    clock = Clock(opts.budget_s)
    families = [f for f in opts.families if valid_nfe(f, nfe)]
    if not families:
        raise SearchError(f"no solver family can spend exactly NFE {nfe}")
    if given.reference_steps is not None and given.reference_steps < 2 * nfe:  # it cannot judge an NFE-n sampler
        raise SearchError(f"--reference-steps {given.reference_steps}: a reference coarser than twice the sampler's "
                          f"NFE {nfe} cannot judge it; give at least {2 * nfe}, or leave it to the plan's probe")
    fits = opts.budget_s is None or opts.budget_s >= MIN_FIT_BUDGET_S
    load = fits and opts.budget_s is not None
    reserve = OPTIMISER_LOAD_S if load else 0.0
    # planned first, so that a search the budget cannot afford does not load the optimisers either
    plan = plan_references(denoiser, nfe, families, opts, cal, clock, log, reserve, holdout_floor)
    if not plan.fits:
        chosen = prior_base(denoiser, nfe, families, opts.finals)
        log(f"  shipped {chosen.label} unsearched, by the documented prior (search.PRIOR_FAMILIES): --budget "
            f"{opts.budget_s:g} s cannot afford the references; --budget {plan.afford_s:g} would")
        table = [_row(chosen, chosen)]
        return SearchResult(chosen.program, chosen, [chosen], table, round(time.perf_counter() - clock.started, 2),
                            clock.timings)
    end = None if opts.budget_s is None else clock.started + opts.budget_s
    fixed_until = None if end is None else time.perf_counter() + FIXED_SHARE * max(clock.remaining() - reserve, 0.0)
    n_fitted = (plan.fitted if opts.budget_s is not None else opts.top_k + opts.global_fits) if fits else 0
    loading = load_optimisers_beside() if load else None
    pace = Pace(plan)
    calib, hold = evaluation_sets(denoiser, plan, cal, clock, pace, fixed_until, nfe, n_fitted, reference_cache, log)
    # the bases first: the held-out scoring keeps time for the best base and the fitted candidates (`_finalists`)
    bases_until = None if fixed_until is None else fixed_until - pace.predict(len(hold), nfe * (1 + n_fitted))
    cands = _score_bases(denoiser, nfe, plan, opts, calib, clock, pace, bases_until, log)
    bases = sorted(cands, key=lambda c: c.calib_loss)
    if loading is not None:  # wait for the imports only while a fit could still follow them
        t0 = time.perf_counter()
        loading.join(max(clock.remaining() - pace.predict(len(hold), nfe) * (len(cands) + 1)
                         - pace.predict(len(calib), nfe) * MIN_SCHEDULE_EVALS, 0.0))
        clock.lap("loading optimisers", t0)
        if loading.is_alive():
            log("  learned schedules and global fits skipped: their optimisers were still loading when the budget "
                "left no time for them (raise --budget)")
            fits = False
    # the local fit (~M + 1 calls per step on its batch) when it fits its share; then the fits, their deadlines
    # keeping time for scoring the finalists on the held-out noises, at the pace measured so far
    per_eval = pace.predict(len(calib), nfe)
    local_s = pace.predict(cal.batch, (cal.M + 1) * nfe)
    local = opts.local and (end is None or local_s <= LOCAL_FIT_SHARE * max(clock.remaining(), 0.0))
    if opts.local and not local:
        log(f"  local IIA fit skipped: ~{local_s:.0f} s is over {LOCAL_FIT_SHARE:g} of the {clock.remaining():.0f} s "
            f"left (raise --budget)")
    if local:  # first: it cannot stop early, and the fits' deadlines then follow from what it really took
        cands += _local_fit(denoiser, nfe, bases, opts, cal, clock, log)
    per_holdout = pace.predict(len(hold), nfe)
    fixed_s = per_holdout * len(cands)
    top_k, n_global = fit_counts(opts, per_eval, per_holdout, clock.remaining() - fixed_s, log) if fits else (0, 0)
    clock.reserve(fixed_s + per_holdout * (top_k + n_global))
    if fits:
        learned = _learn_schedules(denoiser, nfe, bases, opts, calib, clock, log, top_k, 0.55 if n_global else 0.95)
        fitted = _global_fits(denoiser, learned, bases, opts, calib, clock, log, n_global)
        cands += learned + fitted + _rounds(denoiser, nfe, learned, bases, fitted, opts, cal, calib, plan, clock, pace,
                                            per_holdout, reference_cache, log)
    elif opts.budget_s is not None and opts.budget_s < MIN_FIT_BUDGET_S:
        log(f"  learned schedules and global fits skipped: --budget {opts.budget_s:g} s is below {MIN_FIT_BUDGET_S:g} s "
            f"(loading their optimisers alone takes seconds)")
    left = math.inf if end is None else end - time.perf_counter()
    finalists = choose_finalists(cands, bases, pace.predict(len(hold), nfe), left, log)
    chosen = _choose(finalists, _TickingSet(hold, Ticker("held-out scoring", log), len(finalists)), clock,
                     cal.guard_level)
    chosen, resolution = _checked_choice(chosen, finalists, plan, cal.reference_steps, given.reference_steps is None,
                                         log)
    table = [_row(c, chosen) for c in finalists]
    used = {"calibration": len(calib), "holdout": len(hold), "integrator": INTEGRATOR, "steps": plan.steps,
            "rounds": max(c.round for c in cands), **resolution}
    return SearchResult(chosen.program, chosen, finalists, table, round(time.perf_counter() - clock.started, 2),
                        clock.timings, used)


def _row(c: Candidate, chosen: Candidate) -> dict:
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
            + ["no mean gain"] * (not row["mean_gain"]))
        lines.append(f"{row['candidate']:<40} {row['rmse']:>13.5f} {row['median']:>9.5f} {row['ratio_to_base']:>7.3f} "
                     f"{row['ratio_upper']:>7.3f} {gain:>9}  {'yes' if row['eligible'] else 'no'}"
                     f"{' (' + ', '.join(why) + ')' if why else ''}{mark}")
    return "\n".join(lines)


def to_calibration_result(result: SearchResult, calibration: CalibrationOptions, options: SearchOptions,
                          denoiser: Denoiser) -> CalibrationResult:
    """The chosen program as a CalibrationResult (for the coefficient artifact), the table in `search`."""
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
                  "timings_s": result.timings, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                           for k, v in vars(options).items()},
                  "candidates": result.table}
    res.seconds = result.seconds
    return res

