"""The budget of the `auto` search (`calibration/search.py`): what a timed denoiser call and the reference's
measured accuracy afford, and the pace the later phases watch.

`search_timing.call_cost` times the model's call; `references.choose_steps` measures the reference steps it needs;
`reference_sizes` cuts noises, base families, final steps, fitted candidates and reference steps, in that order,
until the references and the scoring fit FIXED_SHARE of `--budget` (the plan block in the log says what was cut
and which budget would afford it all; when nothing fits, the documented prior base ships: `prior_base`);
`search_sets.evaluation_sets` computes the references in batches, re-planned at the measured pace; `search_budget`
sizes the fits and the held-out scoring from what is left (`Clock`).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from iia.models.base import Denoiser

from .fit import CalibrationOptions
from .references import INTEGRATOR, Accuracy, choose_steps
from .sampling import reference_calls
from .schedules import program_for
from .search_space import Candidate, SearchOptions
from .search_timing import PRECISE_TIMING_SHARE, call_cost
from .solvers import Program


FIXED_SHARE = 0.6  # of --budget, at most, for what cannot stop early: references, scoring bases and finalists
HOLDOUT_BONUS_SHARE = 0.25  # of --budget, at most, for all of that with held-out noises above the plan's floor
WIDE_HOLDOUT_SHARE = 0.05  # ... and with held-out noises above SEARCH_HOLDOUT_FLOOR (cheap models only)
MIN_REFERENCE_STEPS, MIN_CALIB, MIN_HOLDOUT = 16, 16, 32  # what a cut never goes below
PROBE_SHARE = 0.08  # of --budget, at most, for measuring the reference's accuracy (`references.choose_steps`)
# of the time left, at most, for the paper's local fit (it cannot stop early; it shipped in none of our budget-
# bound searches, and at 0.2 took 30 s of a busy 16x16 DDPM++ search whose one learned schedule got 23 evaluations)
LOCAL_FIT_SHARE = 0.05
# fewer evaluations than these leave a learned schedule / global fit at its start: spend the time elsewhere
MIN_SCHEDULE_EVALS, MIN_GLOBAL_EVALS = 20, 8
# below this --budget, no learned schedules or global fits: loading their optimisers (scipy.optimize, torch.optim,
# whose first optimiser imports torch._dynamo) alone takes ~1 + ~3 s in a fresh process
MIN_FIT_BUDGET_S = 5.0
OPTIMISER_LOAD_S = 2.0  # what the plan keeps for loading them (they load beside the references, see below)
# Held-out noises the search asks every model for unless --holdout is given, cut first: above SEARCH_HOLDOUT_FLOOR
# to what WIDE_HOLDOUT_SHARE of the budget affords (gmm keeps 32768, digits 1024), then down to the floor (the
# guard's default where smaller: 4096 analytic, 256 networks) to what HOLDOUT_BONUS_SHARE affords. A sampler's RMSE
# is carried by the few noises it sends to another mode than the exact ODE does (gmm: 50% of a fit's squared error
# in 8-15 of 8000 noises): 1024 held-out noises hold one or none, so the choice among the fit rounds' candidates
# was a draw; 4096 hold a few and still ranked fits 1.3x apart the wrong way (gmm NFE 6: held-out 0.0388 vs
# 0.0439, 8000 test noises 0.0435 vs 0.0331); 32768 rank them as the test noises do (docs/accuracy.md). The floor:
# 4096 as a floor on a 192-d mixture cut the references too coarse to judge the tails; at digits NFE 9, 256
# refused the best fit (held-out 0.22x its base, the paired mean test failed on a few noises; test 0.44x), 1024
# shipped it (docs/calibration.md)
SEARCH_HOLDOUT, SEARCH_HOLDOUT_FLOOR = 32768, 1024
HOLDOUT_BYTES = 1 << 29  # the held-out noises and references (float64) the search asks for, at most: 512 MiB


def holdout_bytes(n: int, shape: tuple[int, ...]) -> int:
    """Bytes of n held-out noises of images of `shape` and their references, both float64."""
    return 16 * n * math.prod(shape)


def search_holdout(shape: tuple[int, ...]) -> int:
    """The held-out noises the search asks for on images of `shape`: SEARCH_HOLDOUT, fewer where their noises and
    references would pass HOLDOUT_BYTES (`holdout_bytes`), never fewer than SEARCH_HOLDOUT_FLOOR (a cheap model of
    3x64x64 images: 2730)."""
    return min(SEARCH_HOLDOUT, max(SEARCH_HOLDOUT_FLOOR, HOLDOUT_BYTES // holdout_bytes(1, shape)))
# Calibration noises a cheap model's fits get unless --calib-batch is given: the default (512 gmm, 128 others)
# doubled while the first round's fits at that size take at most GROW_SHARE of the time left (`grown_batch`).
# The fits see the rare noises that carry the RMSE only in a large set: gmm NFE 8, iPNDM learned schedule + global
# fit, 16000 test noises, two calibration draws: 4096 noises 0.0345 / 0.0306 (18-24 noises in another mode) vs
# 512: 0.0509 / 0.0472 (44-50); the learned schedule alone 0.047 vs 0.049-0.070.
MAX_GROWN_CALIB, GROW_SHARE = 4096, 0.4
# a global fit's evaluations (L-BFGS iterations plus line-search evaluations) x calls' cost of one (forward+backward)
GLOBAL_FIT_EVALS, BACKWARD_COST = 1.3, 3.0


def load_optimisers() -> None:
    """Import what learned schedules and global fits need, so that the budget pays for it up front."""
    import scipy.optimize  # noqa: F401

    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])


def load_optimisers_beside() -> threading.Thread:
    """`load_optimisers` in a thread started now, to join before the fits: the imports (~4 s idle, twice that on
    a busy machine) overlap the references instead of adding to the budget."""
    thread = threading.Thread(target=load_optimisers, name="load optimisers", daemon=True)
    thread.start()
    return thread


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


def is_prior(c: Candidate) -> bool:
    """Whether `c` is of the prior's family and final step (PRIOR_FAMILIES[0], PRIOR_FINAL), any schedule."""
    return (c.family, c.final) == (PRIOR_FAMILIES[0], PRIOR_FINAL)
@dataclass
class ReferencePlan:
    """What the budget affords: calibration and held-out noises, reference steps (of `references.INTEGRATOR`),
    the base families and final steps scored, what was cut; `fits` False: no references fit (ship the prior base
    unsearched); `afford_s`: the budget that would afford the minimal references, `full_s` the unreduced ones;
    `cost(n)`: seconds of one executor step on n noises as timed, `rate` seconds per image-call; `accuracy`:
    the reference's error as measured by the probe, possibly at other steps than `steps` (`Accuracy.at`; None:
    not measured); `lines`: the plan block for the log."""
    batch: int
    holdout: int
    steps: int
    cut: str
    fits: bool = True
    afford_s: float = 0.0
    full_s: float = 0.0
    lines: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    finals: tuple[str, ...] = ()
    cost: Callable[[int], float] | None = None
    rate: float = 0.0
    accuracy: Accuracy | None = None
    fitted: int = 0  # fitted candidates the held-out scoring keeps time for
    holdout_floor: int = 0  # held-out noises cut first, down to this, before anything else (`reference_sizes`)


def _prior_order(families, lead: str | None = None) -> list[str]:
    """`families` with `lead` (when among them), then PRIOR_FAMILIES first (what a tight budget keeps)."""
    first = ([lead] if lead in families else []) + [f for f in PRIOR_FAMILIES if f in families and f != lead]
    return first + [f for f in families if f not in first]


def held_out_programs(n_bases: int, n_fitted: int) -> int:
    """Programs the held-out scoring must afford: the fitted ones, their own bases (the rule's reference) and the
    best other; more only while time lasts (`choose_finalists`; counting all cut held-out noises to 52 on a busy
    machine, where the rule refused every fit)."""
    return n_fitted + min(n_bases, n_fitted + 1)


def _what_was_cut(asked: tuple, new: list) -> list[str]:
    """The plan's cuts in words: `asked` and `new` are (calibration noises, held-out noises, reference steps,
    base families, final steps, fitted candidates)."""
    cut = [f"{what} {b} -> {a}" for what, a, b in zip(("calibration noises", "held-out noises", "reference steps"),
                                                      new, asked) if a != b]
    families, finals, n_fitted = asked[3:]
    if len(new[3]) < len(families):
        cut.append(f"base families {len(families)} -> {len(new[3])} ({', '.join(new[3])})")
    if len(new[4]) < len(finals):
        cut.append(f"final steps {', '.join(finals)} -> {', '.join(new[4])}")
    if new[5] < n_fitted:
        cut.append(f"fitted candidates {n_fitted} -> {new[5]}")
    return cut


# A --budget the plan suggests is what it priced, with room for what a larger budget spends itself (its timing
# takes up to PRECISE_TIMING_SHARE of it) and for the timings' spread: tester, EDM's CIFAR-10 size on a CPU,
# the minimal references priced 884 s at --budget 120 (4.5 s of timing) and 1008 s at --budget 900 (27 s), so
# following the first figure was refused again.
SUGGEST_MARGIN = 1.2


def suggested_budget(need_s: float, spent_s: float) -> int:
    """The --budget (whole seconds) to suggest for work priced `need_s` seconds of its share, beside `spent_s`
    spent or kept outside it (see SUGGEST_MARGIN)."""
    return math.ceil(SUGGEST_MARGIN * (need_s + spent_s) / (1 - PRECISE_TIMING_SHARE))


# A fit ships only when its held-out RMSE is below its base's by twice the references' error
# (`search_choice.checked_choice`); on networks fits reach ~0.45-0.6x their base, so references erring by more
# than a fifth of the best base's error could let none ship (tester, EDM's CIFAR-10 size at the suggested
# --budget 1240: 16 reference steps erred 0.32x the base, a global fit at 0.45x its base was refused after 20 min;
# with 0.25, 19 steps erring ~0.23x refused one at 0.54x)
SHIP_RESOLUTION = 0.2


def resolving_steps(accuracy: Accuracy | None, steps: int) -> int:
    """The fewest reference steps (MIN_REFERENCE_STEPS to `steps`) whose error, as the probe estimates it
    (`Accuracy.at`), is at most SHIP_RESOLUTION of the probe's best base's: with fewer, no fit could ship.
    MIN_REFERENCE_STEPS when the probe measured nothing."""
    n = MIN_REFERENCE_STEPS
    if accuracy is None or not accuracy.base_error:
        return n
    while n < steps and accuracy.at(n)[0] > SHIP_RESOLUTION * accuracy.base_error:
        n += 1
    return n


def budget_flag(seconds: float) -> str:
    """'--budget N', with N in hours or days beside it when over an hour (a full search on a CPU can need months)."""
    n = math.ceil(seconds)
    if n < 3600:
        return f"--budget {n}"
    return f"--budget {n} (~{n / 3600:.0f} h)" if n < 2 * 86400 else f"--budget {n} (~{n / 86400:.0f} days)"


def _plan_lines(need_s: float, share: float, new: list, cut: list[str], fits: bool, afford: int,
                full: int, tiers: str = "", min_steps: int = MIN_REFERENCE_STEPS) -> tuple[str, ...]:
    """The plan block's lines for `reference_sizes`: what the kept sizes `new` need against the share (and the
    held-out noises' smaller `tiers`, said when they cut), and what was cut (or that the search was dropped) with
    the --budget figures."""
    lines = (f"  plan: references, scoring the bases and the finalists need {need_s:.1f} s, their share of the "
             f"budget is {share:.1f} s{tiers}",)
    if fits:
        return lines + (f"  plan: {new[0]} calibration + {new[1]} held-out noises, {new[2]} {INTEGRATOR} steps, "
                        f"{len(new[3]) * len(new[4])} base solver{'s' * (len(new[3]) * len(new[4]) != 1)}"
                        + (f"; cut: {', '.join(cut)}" if cut else "; nothing cut")
                        + (f" ({budget_flag(full)} would afford them all)" if cut else ""),)
    why = ("" if min_steps <= MIN_REFERENCE_STEPS else  # raised by `resolving_steps`, not a --reference-steps cap
           f" (fewer steps err by more than {SHIP_RESOLUTION:g}x the best base's error: no fit could ship)")
    return lines + (f"  plan: dropped the search (references, fits, scoring): even {MIN_CALIB} + {MIN_HOLDOUT} noises "
                    f"at {min_steps} {INTEGRATOR} steps{why} and one base solver need {budget_flag(afford)} (the "
                    f"full search's references: {budget_flag(full)})",)


def reference_sizes(nfe: int, families: tuple[str, ...], finals: tuple[str, ...], n_fitted: int, batch: int,
                    holdout: int, steps: int, budget_s: float, cost: Callable[[int], float],
                    spent_s: float = 0.0, holdout_floor: int | None = None,
                    lead: tuple[str, str] | None = None, min_steps: int = MIN_REFERENCE_STEPS) -> ReferencePlan:
    """The references, scoring the bases on the calibration noises and them plus `n_fitted` fitted candidates on
    the held-out noises must fit FIXED_SHARE of `budget_s` by the timed step cost `cost(n)`. First the held-out
    noises above SEARCH_HOLDOUT_FLOOR are cut until all fits WIDE_HOLDOUT_SHARE, then those above `holdout_floor`
    (None: `holdout`; a bonus that sharpens the shipping rule, worth neither calibration noises nor the fits'
    time) until all fits HOLDOUT_BONUS_SHARE (neither tier below `holdout_floor`); then, in this order until
    it fits FIXED_SHARE: noises down to 64 + 128; the families down to PRIOR_FAMILIES; noises down to MIN_CALIB +
    MIN_HOLDOUT; the final steps down to PRIOR_FINAL; one family; one fitted candidate; reference steps down to
    `min_steps` (`resolving_steps`: fewer could let no fit ship); `lead` (family, final step), the probe's best
    base, is kept first (it measured better
    than the prior). When even that does not fit, `fits` is False. `spent_s`: the seconds of --budget spent
    or kept outside `budget_s` (the timing, the probe, the optimisers' reserve): the --budget figures the plan
    suggests (`afford_s`, `full_s`) include them and are rounded up, so that they are over any --budget that
    could not afford what they name."""
    def need(n_cal, n_hold, n_steps, fams, fins, n_fitted=n_fitted):  # x 1.5: short timings run faster than long ones
        n_bases = len(fams) * len(fins)
        return 1.5 * (reference_calls(INTEGRATOR, n_steps) * (cost(n_cal) + cost(n_hold))
                      + nfe * (n_bases * cost(n_cal) + held_out_programs(n_bases, n_fitted) * cost(n_hold)))

    share, floor = FIXED_SHARE * budget_s, holdout if holdout_floor is None else min(holdout_floor, holdout)
    min_steps = min(min_steps, steps)  # a --reference-steps cap below MIN_REFERENCE_STEPS is never raised
    fams, fins = _prior_order(families, lead and lead[0]), list(finals)
    keep_final = lead[1] if lead is not None and lead[1] in fins else PRIOR_FINAL
    state = [batch, holdout, steps, fams, fins, n_fitted]

    def noises(lo_cal, lo_hold):
        if state[0] <= lo_cal and state[1] <= lo_hold:
            return False
        state[0], state[1] = max(min(lo_cal, state[0]), int(state[0] * 0.7)), max(min(lo_hold, state[1]),
                                                                                 int(state[1] * 0.7))
        return True

    def keep(index, n):
        if len(state[index]) <= n:
            return False
        kept = [f for f in state[index] if f == keep_final] if index == 4 else state[index][:n]
        state[index] = kept or state[index][:n]
        return True

    def one_fit():
        if state[5] <= 1:
            return False
        state[5] = 1
        return True

    def shrink(index, lo):  # held-out noises or reference steps
        if state[index] <= lo:
            return False
        state[index] = max(lo, int(state[index] * 0.7))
        return True

    # the held-out noises above SEARCH_HOLDOUT_FLOOR only where all of it costs WIDE_HOLDOUT_SHARE of the budget
    # (a sharper choice among cheap fits: a network's fits keep their time), those above the floor
    # HOLDOUT_BONUS_SHARE; neither the fits' time
    wide = max(floor, SEARCH_HOLDOUT_FLOOR)
    while need(*state) > WIDE_HOLDOUT_SHARE * budget_s and shrink(1, wide):
        pass
    while need(*state) > HOLDOUT_BONUS_SHARE * budget_s and shrink(1, floor):
        pass
    ladder = (lambda: noises(64, 128), lambda: keep(3, len(PRIOR_FAMILIES)), lambda: noises(MIN_CALIB, MIN_HOLDOUT),
              lambda: keep(4, 1), lambda: keep(3, 1), one_fit, lambda: shrink(2, min_steps))
    for cut_more in ladder:
        while need(*state) > share and cut_more():
            pass
    new = state
    cut = _what_was_cut((batch, holdout, steps, families, finals, n_fitted), new)
    minimal = (MIN_CALIB, MIN_HOLDOUT, min_steps, fams[:1], [PRIOR_FINAL] if PRIOR_FINAL in fins else fins[:1],
               min(n_fitted, 1))
    afford = suggested_budget(need(*minimal) / FIXED_SHARE, spent_s)
    # everything asked: held-out noises above the floors must fit their shares (the smaller), the rest FIXED_SHARE
    asked_share = (WIDE_HOLDOUT_SHARE if holdout > wide else HOLDOUT_BONUS_SHARE if holdout > floor else FIXED_SHARE)
    full = suggested_budget(need(batch, holdout, steps, fams, fins) / asked_share, spent_s)
    fits = need(*new) <= share
    tiers = "" if new[1] == holdout else _caps_said(holdout, floor, wide, budget_s)
    lines = _plan_lines(need(*new), share, new, cut, fits, afford, full, tiers, min_steps)
    return ReferencePlan(new[0], new[1], new[2], ", ".join(cut), fits, afford, full, lines, tuple(new[3]),
                         tuple(new[4]), cost, fitted=new[5], holdout_floor=min(floor, new[1]))


def _caps_said(holdout: int, floor: int, wide: int, budget_s: float) -> str:
    """The plan line's caps on the held-out noises: shares of the budget, not costs; with equal floors (gmm: 1024)
    only the wide share holds, said once."""
    caps = ([(floor, HOLDOUT_BONUS_SHARE)] if floor < wide else []) + (
        [(wide, WIDE_HOLDOUT_SHARE)] if holdout > wide else [])
    return "" if not caps else (f" (the share{'s' * (len(caps) > 1)} with held-out noises "
                                + "; ".join(f"above {n}: {c * budget_s:.1f} s" for n, c in caps) + ")")


def prior_base(denoiser: Denoiser, nfe: int, families: list[str], finals: tuple[str, ...]) -> Candidate:
    """The unsearched base solver shipped when no references fit the budget (PRIOR_FAMILIES, PRIOR_FINAL;
    `families`: those that can spend `nfe`)."""
    fam = next(f for f in PRIOR_FAMILIES + tuple(families) if f in families)
    final = PRIOR_FINAL if PRIOR_FINAL in finals else finals[0]
    return Candidate(fam, final, "karras", "base", program_for(denoiser, fam, nfe, 1, "karras", final),
                     note="prior: no references fit the budget")


def _probe_bases(denoiser: Denoiser, nfe: int, families: list[str], finals: tuple[str, ...]) -> list[Program]:
    """The base solvers whose least error sets the reference's accuracy target: the prior base first."""
    first = prior_base(denoiser, nfe, families, finals)
    return [first.program] + [program_for(denoiser, f, nfe, 1, "karras", final) for f in _prior_order(families)
                              for final in finals if (f, final) != (first.family, first.final)]


def fits_seconds(n: int, nfe: int, opts: SearchOptions, cost: Callable[[int], float]) -> float:
    """Seconds the first round's fits take on `n` calibration noises by the timed step cost `cost(n)`: opts.top_k
    schedules at opts.max_evals evaluations and opts.global_fits global fits at ~GLOBAL_FIT_EVALS x opts.max_iter
    evaluations of BACKWARD_COST forward calls each."""
    evals = opts.top_k * opts.max_evals + opts.global_fits * GLOBAL_FIT_EVALS * opts.max_iter * BACKWARD_COST
    return nfe * evals * cost(n)


def grown_batch(batch: int, nfe: int, opts: SearchOptions, cost: Callable[[int], float], left: float) -> int:
    """`batch` doubled while `fits_seconds` at the doubled size is at most GROW_SHARE of `left` seconds, up to
    MAX_GROWN_CALIB (see there); `batch` itself for a model whose calls are not that cheap."""
    while 2 * batch <= MAX_GROWN_CALIB and fits_seconds(2 * batch, nfe, opts, cost) <= GROW_SHARE * left:
        batch *= 2
    return batch


def plan_references(denoiser: Denoiser, nfe: int, families: list[str], opts: SearchOptions, cal: CalibrationOptions,
          clock: Clock, log, reserve_s: float = 0.0, holdout_floor: int | None = None) -> ReferencePlan:
    """The call's timed cost, the reference steps the model needs (`references.choose_steps`), then the sizes the
    remaining budget less `reserve_s` affords (`reference_sizes`, held-out noises cut first down to
    `holdout_floor`); its plan block logged."""
    t0 = time.perf_counter()
    batch = opts.batch or (512 if denoiser.identity.get("kind") == "gmm" else 128)
    n_fitted = opts.top_k + opts.global_fits + int(opts.local)
    if opts.budget_s is None:
        steps, said, error = choose_steps(denoiser, _probe_bases(denoiser, nfe, families, opts.finals), cal.seed,
                                          0.0, None, cal.reference_steps)
        clock.lap("references", t0)
        log(f"  plan: reference {said}")
        return ReferencePlan(batch, cal.holdout, steps, "", families=tuple(families), finals=opts.finals,
                             accuracy=error, lines=(f"  plan: reference {said}",), holdout_floor=cal.holdout)
    log(f"  plan: timing the denoiser's calls (at most ~{PRECISE_TIMING_SHARE:.0%} of the "
        f"{max(clock.remaining() - reserve_s, 0.0):.0f} s left, after one first call)")
    cost, rate, how = call_cost(denoiser, max(clock.remaining() - reserve_s, 0.0))
    # the clock started at the search (the model was loaded before): what is gone is the timing and the reserve
    log(f"  plan: {max(clock.remaining() - reserve_s, 0.0):.3g} s of the budget left after timing "
        f"({time.perf_counter() - clock.started:.3g} s since the search started"
        + (f", {reserve_s:g} s kept for loading the optimisers" if reserve_s else "")
        + f"); {rate:.3g} s per image-call (timed by {how})")
    left = max(clock.remaining() - reserve_s, 0.0)
    if reference_sizes(nfe, tuple(families), opts.finals, n_fitted, batch, cal.holdout, MIN_REFERENCE_STEPS,
                       left * (1 - PROBE_SHARE), cost, holdout_floor=holdout_floor).fits:
        steps, said, error = choose_steps(denoiser, _probe_bases(denoiser, nfe, families, opts.finals), cal.seed,
                                          rate, PROBE_SHARE * clock.remaining(), cal.reference_steps)
    else:  # not even the smallest search fits: spend nothing on measuring its reference
        said = f"{INTEGRATOR}: accuracy not measured (not even the smallest search fits the budget)"
        steps, error = MIN_REFERENCE_STEPS, None
    log(f"  plan: reference {said}")
    left = max(clock.remaining() - reserve_s, 0.0)
    if opts.batch is None:
        grown = grown_batch(batch, nfe, opts, cost, left)
        if grown > batch:
            log(f"  plan: {grown} calibration noises, not {batch}: the first fits at that size take ~"
                f"{fits_seconds(grown, nfe, opts, cost):.0f} s of the {left:.0f} s left (a cheap model's fits see "
                f"its rare noises; --calib-batch sets it)")
            batch = grown
    lead = tuple(error.best.split("/")) if error is not None and error.best else None
    plan = reference_sizes(nfe, tuple(families), opts.finals, n_fitted, batch, cal.holdout, steps, left, cost,
                           opts.budget_s - left, holdout_floor, lead, resolving_steps(error, steps))
    plan.rate, plan.accuracy = rate, error
    plan.lines = (f"  plan: {rate:.3g} s per image-call (timed by {how}); reference {said}",) + plan.lines
    clock.lap("references", t0)  # the timing and the accuracy probe are part of what the references cost
    for line in plan.lines[1:]:
        log(line)
    if plan.cut and plan.fits:
        log(f"  references cut to fit --budget {opts.budget_s:g} s: {plan.cut}")
    return plan
