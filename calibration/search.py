"""The `auto` search: the best sampler at a given NFE, by END-TO-END error on held-out noise.

For one NFE, candidates = solver families x final-step convention x schedule (Karras / learned) x coefficients
(base / local IIA / global) (`search_space`), NOT all combinations: every family x final step on the Karras
schedule with base coefficients, learned schedules (`search_fits.learn_schedule`) and global fits
(`search_fits.fit_global`) for the best of those, and the paper's local fit on the best base that has one; then,
while the budget lasts, further rounds of the lead's schedule and global fit, each on fresh calibration noises
(`search_rounds`: a fit depends on its draw of noises more than on its evaluation counts), after the global fits
are continued on more calibration noises where the time affords it (`search_rounds.refine_fits`).
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
from .fit import CalibrationOptions, calibrate
from .references import INTEGRATOR
from .schedules import karras_sigmas, program_for
from .search_budget import FitCounts, choose_finalists, fit_counts, held_out_bases
from .search_plan import (FIXED_SHARE, HOLDOUT_BYTES, LOCAL_FIT_SHARE, MIN_FIT_BUDGET_S, MIN_HOLDOUT,
                          MIN_SCHEDULE_EVALS, OPTIMISER_LOAD_S, PRIOR_FAMILIES, SEARCH_HOLDOUT, SEARCH_HOLDOUT_FLOOR,
                          Clock, ReferencePlan, holdout_bytes, is_prior, load_optimisers_beside,
                          plan_references, prior_base, search_holdout)
from .search_sets import evaluation_sets
from .search_timing import Pace, busy_machine_threads, machine_busy
from .search_choice import TickingSet, checked_choice, choose, format_table, row, to_calibration_result
from .search_fits import calib_loss, global_candidate, schedule_candidate
from .search_rounds import FURTHER_FACTORS, REFINE_FACTORS, ROUND_SLACK, fit_rounds, refine_fits
from .search_space import FAMILIES, Candidate, SearchError, SearchOptions
from .solvers import Program, linear_name, valid_nfe

__all__ = ["FAMILIES", "PRIOR_FAMILIES", "SEARCH_VERSION", "Candidate", "SearchError", "SearchOptions", "SearchResult",
           "auto_search", "format_table", "to_calibration_result"]

# Bumped when what the search ships or records for the same options changes, so that a cached `auto` result is
# searched again (iia-compile's coefficient cache key; 2: 1024 held-out noises for networks, the prior's global
# fit, a base's mean test recorded as null; 3: fit rounds on fresh calibration noises; 4: the references' error and
# the shipped RMSE's upper bound when they are over 0.1x of it, the probe measures the cap's steps, a cut keeps the
# probe's best base, a re-plan never raises a small --holdout, global fits at r = 3; 5: a budget short of a
# schedule and a global fit on it fits Karras bases instead, the prior's Karras base gets the first Karras global fit,
# bases far worse than the best are not scored on held-out noise, the prior's fits first, the pace over the latest
# ~15 s of work, no learned schedule for a model whose round_sigma snaps to a table; 6: the lead's global fit in the
# linear form too where time is left, and in each round; 7: a cheap model's calibration noises grown to what its
# fits afford, up to 4096; 8: global fits refined on 2-4x the calibration noises where time is left, a fit the
# float32 graph cannot reproduce is refused, PyTorch on 1 thread on busy cores; 9: global fits' coefficients
# bounded to 10x their base's largest of the base, search_fits.coefficient_limit; the fits refined once more on 8x
# the calibration noises before the rounds; a round starts when the time left covers its expected time; 10:
# a learned schedule's Nelder-Mead starts from the best of Karras and its jumps; 11: 32768 held-out noises asked
# for, bounded by their memory; 12: a cheap model's references in batches of ~0.1 s; 13: reference steps never
# cut below those a fit needs to ship, `search_plan.resolving_steps`).
SEARCH_VERSION = 13
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
    # what the budget fitted (`search_budget.FitCounts`): {"schedules", "global_fits", "karras"}; empty unsearched
    fits: dict = field(default_factory=dict)
    busy: str | None = None  # why the machine was found busy during the search (`search_timing.machine_busy`)


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


def schedules_to_learn(bases: list[Candidate], top_k: int, fitted_after: bool = False) -> list[Candidate]:
    """The bases (sorted by calibration loss) that get a learned schedule: the top `top_k`, the prior's
    (PRIOR_FAMILIES[0], PRIOR_FINAL) in the last slot when it was scored but ranked lower and top_k >= 2, or in
    the only slot when a global fit follows (`fitted_after`: `globals_to_fit` gives the prior's its first). A
    base's loss does not rank what fitting makes of it: gmm NFE 5, deis-3 and deis-2 ranked first and deis-3's fit
    shipped at test RMSE 0.055; with iPNDM's schedule learned too, iPNDM's fit ships at 0.041 (docs/accuracy.md);
    a busy 16x16 DDPM++ search with one schedule and one global fit shipped UniPC-2's (the best base) at 0.9x."""
    top = bases[:top_k]
    prior = next((b for b in bases if is_prior(b)), None)
    if prior is not None and prior not in top and (top_k >= 2 or (top_k == 1 and fitted_after)):
        top = top[:-1] + [prior]
    return top


def _learn_schedules(denoiser, nfe, bases, opts, calib, clock: Clock, log, counts: FitCounts) -> list[Candidate]:
    """Learned schedules for `schedules_to_learn` (they share 55% of the remaining time equally, all of it
    without global fits to follow, one's unused time carried to the next: `_equal_part`)."""
    top_k = counts.schedules
    if top_k == 0:
        return []
    learned, top = [], schedules_to_learn(bases, top_k, fitted_after=counts.global_fits > 0)
    phase_end = clock.share(0.55 if counts.global_fits else 0.95)
    for k, b in enumerate(top):
        t0 = time.perf_counter()
        cand, info = schedule_candidate(denoiser, nfe, b.family, b.final, calib, opts,
                                        _equal_part(phase_end, len(top) - k), log)
        learned.append(cand)
        clock.lap("schedules", t0)
        log(f"  schedule {b.family}/{b.final}: calibration loss on {len(calib)} noises {info['loss_karras']:.4g} -> "
            f"{info['loss']:.4g} "
            f"({info['evals']} evals, {info['seconds']:.1f} s{', cut short by the budget' if info['cut'] else ''})")
    return learned


def discrete(denoiser: Denoiser) -> bool:
    """Whether the model's sigmas are a table of training timesteps (`sigma_table`, or a `round_sigma` that moves
    a Karras grid: EDM's iDDPM preconditioner): a learned schedule's free sigmas do not apply to it."""
    if denoiser.sigma_table is not None:
        return True
    grid = karras_sigmas(16, denoiser.sigma_min, denoiser.sigma_max, denoiser.rho)
    return not torch.equal(torch.as_tensor(denoiser.round_sigma(grid), dtype=torch.float64), grid)


def _fit_counts(denoiser, opts: SearchOptions, per_eval: float, per_holdout: float, left: float, log) -> FitCounts:
    """`search_budget.fit_counts`, with no schedule asked of a `discrete` model (its time goes to global fits)."""
    if discrete(denoiser):
        log("  learned schedules skipped: the model is discrete (its sigmas are rounded to a table of training "
            "timesteps; a learned grid off the table scored 1.3-4.5x worse than its Karras base on an iDDPM pickle)")
        opts = replace(opts, top_k=0)
    return fit_counts(opts, per_eval, per_holdout, left, log)


def _equal_part(phase_end: float | None, left: int) -> float | None:
    """The deadline of the next of `left` fits sharing the time until `phase_end` equally (None: no bound). A
    share of the time remaining after the fits before gave the last fit the most (digits NFE 9: the lead's global
    fit cut at 41 evaluations, the Karras base's after it ran its 63 in full)."""
    return None if phase_end is None else time.perf_counter() + max(phase_end - time.perf_counter(), 0.0) / left


def globals_to_fit(learned: list[Candidate], bases: list[Candidate], n_fits: int) -> list[Candidate]:
    """What gets a global fit, in order: the prior's (PRIOR_FAMILIES[0], PRIOR_FINAL) learned schedule, the best
    other learned schedule (by calibration loss), the prior's Karras base, the best other Karras base, then the
    other learned ones. A schedule's or base's loss does not rank what a global fit makes of it; the prior's fits
    gain the most where measured (16x16 EDM-format pickles, NFE 9, schedule then global fit, held-out RMSE):
    DDPM++ iPNDM's 0.0045 vs UniPC-2's (the best base, whose schedule led) 0.0064, ADM 0.00004 vs DEIS-3's 0.00014;
    NCSN++ 0.00037 vs UniPC-2's 0.00022 the other way. Where only one fits, the prior's gains most on its own base."""
    ranked = sorted(learned, key=lambda c: c.calib_loss)
    first = [c for c in ranked if is_prior(c)][:1]
    first += [c for c in ranked if c not in first][:1]
    karras = [b for b in bases if is_prior(b)][:1]
    karras += [b for b in bases if b not in karras][:1]
    order = first + karras + [c for c in ranked if c not in first]
    return order[:n_fits]


def _global_fits(denoiser, learned, bases, opts, calib, clock: Clock, log, n_fits: int, per_holdout: float,
                 refine: Callable[[list[Candidate]], list[Candidate]], share: float = 0.6) -> list[Candidate]:
    """Global coefficient fits for `globals_to_fit` (they share `share` of the remaining time equally), in their
    families' bases (all in the linear form with opts.basis "linear"), refined on more calibration noises where
    the time left affords it (`search_rounds.refine_fits`); with "both", then the lead's in the linear form too
    where the time left affords it (`_lead_linear`), refined likewise. Refining first: on digits at NFE 9 the
    lead's refinement cut its test RMSE 0.0239 -> 0.0174, and the linear fit lost there on held-out noise."""
    to_fit, out = globals_to_fit(learned, bases, n_fits), []
    phase_end = clock.share(share)
    for k, c in enumerate(to_fit):
        if clock.remaining() <= 0:
            log(f"  global fits: {len(to_fit) - k} of {len(to_fit)} skipped, the budget is spent (raise --budget)")
            break
        t0 = time.perf_counter()
        cand, info = global_candidate(denoiser, c, calib, opts, _equal_part(phase_end, len(to_fit) - k), log,
                                      linear=opts.basis == "linear")
        out.append(cand)
        clock.lap("global fits", t0)
        _said(log, cand, info, len(calib))
    refined = refine(out)
    if opts.basis == "both" and out and linear_name(to_fit[0].family):
        refined += refine(_lead_linear(denoiser, to_fit[0], out[0], opts, calib, clock, per_holdout, log))
    return refined


def _said(log, cand: Candidate, info: dict, n: int) -> None:
    """A fit's line; its loss is on the first round's `n` noises."""
    log(f"  {cand.coefficients} fit {cand.family}/{cand.final}/{cand.schedule}: calibration loss on {n} noises "
        f"{info['loss_base']:.4g} -> {info['loss']:.4g} ({info['evals']} evals, {info['seconds']:.1f} s"
        f"{', cut short by the budget' if info.get('cut') else ''})")


def _lead_linear(denoiser, lead: Candidate, lead_fit: Candidate, opts, calib, clock: Clock, per_holdout: float,
                 log) -> list[Candidate]:
    """The lead's global fit in the linear form (`solvers.linear_step`) beside its fit in the family's basis,
    when the time left affords ROUND_SLACK x what that fit took and its held-out scoring (before any fit round:
    on digits NFE 9 the time rounds cannot use). Neither basis wins everywhere (SearchOptions.basis): the
    held-out noises choose."""
    limit = ROUND_SLACK * lead_fit.seconds
    if clock.deadline is not None and clock.remaining() < limit + per_holdout:
        log(f"  linear fit of {lead.family}/{lead.final}/{lead.schedule} skipped: ~{limit + per_holdout:.0f} s, "
            f"{max(clock.remaining(), 0):.0f} s are left (raise --budget)")
        return []
    clock.reserve(per_holdout)
    t0 = time.perf_counter()
    deadline = None if clock.deadline is None else min(time.perf_counter() + limit, clock.deadline)
    cand, info = global_candidate(denoiser, lead, calib, opts, deadline, log, linear=True)
    clock.lap("global fits", t0)
    _said(log, cand, info, len(calib))
    return [cand]


def _rounds(denoiser, nfe, learned, bases, fitted, opts, cal, calib, plan, clock, pace, per_holdout, cache,
            log) -> list[Candidate]:
    """`search_rounds.fit_rounds` for the lead: the candidate the first global fit went to (`globals_to_fit`),
    with the fits it got (in one basis or both); nothing when the lead has neither a learned schedule nor a fit."""
    lead = (globals_to_fit(learned, bases, 1) or [None])[0]
    if opts.rounds < 2 or lead is None:
        return []
    lead_fits = [g for g in fitted if (g.family, g.final, g.schedule) == (lead.family, lead.final, lead.schedule)]
    if lead.schedule == "karras" and not lead_fits:
        return []
    return fit_rounds(denoiser, nfe, lead, lead_fits, opts, cal, len(calib), plan, clock, pace, per_holdout, cache,
                      log)


def _fits(denoiser, nfe, bases, opts, cal, calib, plan, clock, pace, per_holdout, counts: FitCounts, cache,
          log) -> list[Candidate]:
    """The fit phase: learned schedules, global fits (refined on more calibration noises), the fits refined once
    more where the time affords it (`_refine_best`), then the fit rounds."""
    learned = _learn_schedules(denoiser, nfe, bases, opts, calib, clock, log, counts)
    kept: dict = {}  # the larger calibration set, made once

    def refine(fits, factors=REFINE_FACTORS):
        return refine_fits(denoiser, fits, calib, opts, cal, plan, clock, pace, cache, log, kept, factors)

    fitted = _global_fits(denoiser, learned, bases, opts, calib, clock, log, counts.global_fits, per_holdout,
                          refine, 0.95 if counts.karras else 0.6)
    # refined once more before any round: a round's fits on a fresh draw of as few noises overfit it as the first
    # round's did (where the calibration noises are at MAX_REFINE_NOISES already, gmm, the rounds get the time)
    fitted = _refine_best(fitted, lambda fits: refine(fits, FURTHER_FACTORS))
    return learned + fitted + _rounds(denoiser, nfe, learned, bases, fitted, opts, cal, calib, plan, clock, pace,
                                      per_holdout, cache, log)


def _refine_best(fitted: list[Candidate], refine: Callable[[list[Candidate]], list[Candidate]]) -> list[Candidate]:
    """`fitted` refined once more (`refine`: `search_rounds.refine_fits` on FURTHER_FACTORS x the calibration
    noises), the lowest calibration loss first (after the first refinement they share one calibration set) while
    the time affords; in their order."""
    order = sorted(range(len(fitted)), key=lambda i: fitted[i].calib_loss)
    again = dict(zip(order, refine([fitted[i] for i in order])))
    return [again[i] for i in range(len(fitted))]


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


class _Watchdog:
    """The search's log with a watchdog thread: a line whenever nothing was logged for `every` seconds (one
    evaluation of a large model on a CPU can take minutes, longer than a phase's own progress ticks), naming the
    work in progress: what the last progress ticker started counting (`iia.progress.Ticker` calls `starting`)."""

    def __init__(self, log: Callable[[str], None], every: float = 12.0):
        self.log, self.every = log, every
        self.started = self.last = time.perf_counter()
        self.phase = "timing and planning"  # before the first ticker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="search watchdog", daemon=True)

    def __call__(self, text: str) -> None:
        self.last = time.perf_counter()
        self.log(text)

    def starting(self, what: str) -> None:
        self.phase = what

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            now = time.perf_counter()
            if now - self.last >= self.every:
                self(f"  search: still working on {self.phase}, {now - self.started:.0f} s in ({now - self.last:.0f} "
                     f"s since the last line)")

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
    with _Watchdog(log or (lambda text: None)) as watched, busy_machine_threads(denoiser, watched, opts.budget_s):
        return _search(denoiser, nfe, opts, calibration, watched, reference_cache)


def _search_holdout(given: CalibrationOptions, cal: CalibrationOptions, shape: tuple[int, ...],
                    log) -> tuple[CalibrationOptions, int | None]:
    """(options, floor): unless --holdout is given, the search asks for `search_holdout(shape)` held-out noises
    (SEARCH_HOLDOUT where their memory allows), which a short budget cuts first down to the floor,
    SEARCH_HOLDOUT_FLOOR or the guard's default where smaller (`cal` is resolved); a given one below MIN_HOLDOUT is
    used, and said to be unreliable; a default the memory bound lowered, and a given one past it, are said."""
    asked, size = search_holdout(shape), holdout_bytes(1, shape)
    if given.holdout is None:
        if asked < SEARCH_HOLDOUT:
            log(f"  held-out noises: {asked} asked, not {SEARCH_HOLDOUT}: their float64 noises and references are "
                f"kept within {HOLDOUT_BYTES / 2**20:.0f} MiB ({size} bytes each)")
        return replace(cal, holdout=asked), min(cal.holdout, SEARCH_HOLDOUT_FLOOR)
    if given.holdout < MIN_HOLDOUT:
        log(f"  --holdout {given.holdout}: below {MIN_HOLDOUT} held-out noises the shipping rule's 95% bound is "
            f"not reliable (a fit may ship on chance); the search's default is {asked}")
    elif given.holdout * size > HOLDOUT_BYTES:
        log(f"  --holdout {given.holdout}: their float64 noises and references take {given.holdout * size / 2**30:.2f}"
            f" GiB of memory where the budget affords them all (the search's default, {asked}, stays within "
            f"{HOLDOUT_BYTES / 2**20:.0f} MiB)")
    return cal, None


def _search(denoiser: Denoiser, nfe: int, opts: SearchOptions, calibration: CalibrationOptions | None,
            log: Callable[[str], None], reference_cache: Path | None) -> SearchResult:
    given = calibration or CalibrationOptions()
    cal = given.resolved(denoiser)
    cal, holdout_floor = _search_holdout(given, cal, tuple(denoiser.shape), log)
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
        table = [row(chosen, chosen)]
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
    fixed_s = per_holdout * (len(cands) - len(bases) + len(held_out_bases(bases)))
    counts = _fit_counts(denoiser, opts, per_eval, per_holdout, clock.remaining() - fixed_s, log) if fits else \
        FitCounts(0, 0)
    clock.reserve(fixed_s + per_holdout * (counts.schedules + counts.global_fits))
    if fits:
        cands += _fits(denoiser, nfe, bases, opts, cal, calib, plan, clock, pace, per_holdout, counts,
                       reference_cache, log)
    elif opts.budget_s is not None and opts.budget_s < MIN_FIT_BUDGET_S:
        log(f"  learned schedules and global fits skipped: --budget {opts.budget_s:g} s is below {MIN_FIT_BUDGET_S:g} s "
            f"(loading their optimisers alone takes seconds)")
    left = math.inf if end is None else end - time.perf_counter()
    finalists = choose_finalists(cands, bases, pace.predict(len(hold), nfe), left, log)
    chosen = choose(finalists, TickingSet(hold, Ticker("held-out scoring", log), len(finalists)), clock,
                     cal.guard_level)
    chosen, resolution = checked_choice(chosen, finalists, plan, cal.reference_steps, given.reference_steps is None,
                                         log)
    table = [row(c, chosen) for c in finalists]
    used = {"calibration": len(calib), "holdout": len(hold), "integrator": INTEGRATOR, "steps": plan.steps,
            "rounds": max(c.round for c in cands), **resolution}
    return SearchResult(chosen.program, chosen, finalists, table, round(time.perf_counter() - clock.started, 2),
                        clock.timings, used, vars(counts), machine_busy())
