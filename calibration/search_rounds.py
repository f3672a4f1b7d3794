"""Further rounds of the `auto` search's fits on FRESH calibration noises, while the budget lasts.

What a learned schedule or a global fit makes of a solver depends on WHICH calibration noises it was fitted to
far more than on its evaluation counts: the error a sampler makes is dominated by the few noises it sends to
another mode of the data than the exact ODE does, and a fit to one draw of noises moves those boundaries for the
noises it holds, not for fresh ones. On gmm at NFE 4-9, refitting iPNDM's schedule and global coefficients on six
fresh draws of 512 noises gave held-out RMSEs 1.35-2.8x apart (docs/accuracy.md, "rounds"), where more evaluations
on one draw changed little. So where the first round leaves time (a model whose calls are cheap), each further
round refits the LEAD (the first round's best learned schedule by calibration loss, its family and final step)
on the next noises of a stream of its own, distinct from the held-out and test noises, with a global fit on it
when the first round had global fits. Every fit is a candidate like the first round's: judged by the same
shipping rule against its own base on the same held-out noises, which choose among the draws.

`SearchOptions.rounds` bounds the rounds (the first included), the same on every machine; the budget cuts them:
a round starts only when what the first round's lead fits took, its references and its held-out scoring fit the
time left.
"""

from __future__ import annotations

import time
from pathlib import Path

from iia.cli import Ticker
from iia.models.base import Denoiser

from .evalset import EvalSet, draw_noise
from .fit import CalibrationOptions
from .references import INTEGRATOR, compute, reference_batch
from .sampling import reference_calls
from .search_fits import global_candidate, schedule_candidate
from .search_plan import Clock, ReferencePlan
from .search_timing import Pace
from .search_space import Candidate, SearchOptions

# round k's calibration noises are images seed + ROUND_SEED_OFFSET + (k - 2) n .. + n - 1 (n: the first round's
# count): one stream past the held-out noises (seed + 10^6 ..) and iia-accuracy's test noises (seed + 104729 ..)
ROUND_SEED_OFFSET = 2 * 10**6
ROUND_SLACK = 1.5  # a round's fit may take this times what the first round's same fit took (then it is stopped)


def round_seed(cal: CalibrationOptions, n: int, k: int) -> int:
    """The first image (noise seed) of round k's n calibration noises (k >= 2)."""
    return cal.seed + ROUND_SEED_OFFSET + (k - 2) * n


def round_calibration(denoiser: Denoiser, cal: CalibrationOptions, n: int, k: int, plan: ReferencePlan,
                      cache: Path | None, log) -> EvalSet:
    """Round k's n calibration noises with their references (`references.compute` on the plan's steps, in batches
    as the first round's: cached like them)."""
    seed, steps = round_seed(cal, n, k), plan.steps
    noise, labels = draw_noise(denoiser, n, seed)
    refs, _ = compute(denoiser, noise, labels, seed, steps, cache, log,
                      reference_batch(plan.rate, reference_calls(INTEGRATOR, steps), n), None,
                      Ticker(f"round {k} references", log))
    es = EvalSet(denoiser, noise, labels, steps, INTEGRATOR)
    es.set_reference(None, refs)
    return es


def _until(clock: Clock, seconds: float) -> float | None:
    """The deadline of a fit that may take `seconds`, within the clock's; None without a time bound (the fit's
    counts bound it)."""
    return None if clock.deadline is None else min(time.perf_counter() + seconds, clock.deadline)


def fit_rounds(denoiser: Denoiser, nfe: int, lead: Candidate, lead_fits: list[Candidate], opts: SearchOptions,
               cal: CalibrationOptions, n: int, plan: ReferencePlan, clock: Clock, pace: Pace, per_holdout: float,
               cache: Path | None, log) -> list[Candidate]:
    """Rounds 2 .. opts.rounds: `lead`'s schedule learned again (when `lead` is a learned schedule; its Karras
    sigmas otherwise) and the global fits the first round gave it (`lead_fits`: in its family's basis and/or the
    linear form) fitted on it again, each round on a fresh draw of n calibration noises (`round_calibration`).
    Without a time bound all rounds run; with one, a round starts only while the first round's lead fits (x
    ROUND_SLACK), its references and the held-out scoring of its candidates fit `clock`, whose reserve then keeps
    that scoring's time. Returns the rounds' candidates."""
    fitted = (lead.schedule == "learned") + len(lead_fits)
    limits = [ROUND_SLACK * f.seconds for f in lead_fits]
    cost = (pace.predict(n, reference_calls(INTEGRATOR, plan.steps)) + sum(limits) + fitted * per_holdout
            + (ROUND_SLACK * lead.seconds if lead.schedule == "learned" else 0.0))
    out: list[Candidate] = []
    for k in range(2, opts.rounds + 1):
        if clock.deadline is not None and clock.remaining() < cost:
            log(f"  rounds: {k - 1} of {opts.rounds}; another needs ~{cost:.0f} s, {max(clock.remaining(), 0):.0f} s "
                f"are left (raise --budget)")
            break
        clock.reserve(fitted * per_holdout)
        t0 = time.perf_counter()
        calib = round_calibration(denoiser, cal, n, k, plan, cache, log)
        on, what = lead, [f"round {k} ({n} noises from image {round_seed(cal, n, k)})"]
        if lead.schedule == "learned":
            on, info = schedule_candidate(denoiser, nfe, lead.family, lead.final, calib, opts,
                                          _until(clock, ROUND_SLACK * lead.seconds), log, round=k)
            out.append(on)
            what.append(f"schedule {info['loss_karras']:.4g} -> {info['loss']:.4g} ({info['evals']} evals)")
        for first, limit in zip(lead_fits, limits):
            fit, info = global_candidate(denoiser, on, calib, opts, _until(clock, limit), log, round=k,
                                         linear=first.coefficients == "linear")
            out.append(fit)
            what.append(f"{fit.coefficients} fit {info['loss_base']:.4g} -> {info['loss']:.4g} ({info['evals']} evals)")
        clock.lap("rounds", t0)
        log(f"  {', '.join(what)}, {time.perf_counter() - t0:.1f} s")
    else:
        log(f"  rounds: {opts.rounds} of {opts.rounds} (SearchOptions.rounds)")
    return out
