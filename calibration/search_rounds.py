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

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from iia.cli import Ticker
from iia.models.base import Denoiser

from .evalset import EvalSet, draw_noise
from .fit import CalibrationOptions
from .references import INTEGRATOR, compute, reference_batch
from .sampling import reference_calls
from .search_fits import FitProgress, fit_global, global_candidate, lbfgs_evals, schedule_candidate
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
    noise, labels, refs, _ = _referenced(denoiser, n, round_seed(cal, n, k), plan, cache, log, f"round {k} references")
    es = EvalSet(denoiser, noise, labels, plan.steps, INTEGRATOR)
    es.set_reference(None, refs)
    return es


def _referenced(denoiser: Denoiser, n: int, seed: int, plan: ReferencePlan, cache: Path | None, log, what: str):
    """(noise, labels, references, compute's info) of images seed .. seed + n - 1 on the plan's steps
    (`references.compute`, in batches as the first round's: cached like them; progress as `what`)."""
    noise, labels = draw_noise(denoiser, n, seed)
    refs, info = compute(denoiser, noise, labels, seed, plan.steps, cache, log,
                         reference_batch(plan.rate, reference_calls(INTEGRATOR, plan.steps), n,
                                         math.prod(denoiser.shape)), None,
                         Ticker(what, log))
    return noise, labels, refs, info


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
    Without a time bound all rounds run; with one, a round starts only while what the first round's lead fits
    took, its references and the held-out scoring of its candidates fit `clock` (its fits stop at ROUND_SLACK x
    those times or at the clock's deadline), whose reserve then keeps that scoring's time. Returns the rounds'
    candidates."""
    fitted = (lead.schedule == "learned") + len(lead_fits)
    limits = [ROUND_SLACK * f.seconds for f in lead_fits]
    # what the round is expected to take: the first round's times (its fits stop at ROUND_SLACK x those, or at the
    # clock's deadline, which keeps the held-out scoring's time: a round started on this never overruns the budget)
    cost = (pace.predict(n, reference_calls(INTEGRATOR, plan.steps)) + sum(f.seconds for f in lead_fits)
            + fitted * per_holdout + (lead.seconds if lead.schedule == "learned" else 0.0))
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


# A global fit on the first round's calibration noises (128 for a network) overfits them; continued on 4x as many
# (the same first ones and the next images) for REFINE_ITER L-BFGS iterations it generalises: digits NFE 9, iPNDM
# learned schedule, 2000 test noises: 0.0239 fitted on 128 -> 0.0194 (8 iterations, 11 s) / 0.0174 (16, 19 s) on
# 512, where a fit from scratch on 512 took 64 s for 0.0180
REFINE_FACTORS, REFINE_ITER, MAX_REFINE_NOISES = (4, 2), 16, 4096
# ... and once more, before any fit round, where the time affords it (`search._refine_best`), on 8x: digits NFE 5,
# UniPC-3 learned schedule, 2000 test noises: 0.0516 refined on 512, then 0.0484 on 1024 (16 iterations, 19 s; 8
# more on 2048: 0.0484, at twice the time), where 16 more on the same 512 gave 0.0509
FURTHER_FACTORS = (8,)


def larger_calibration(denoiser: Denoiser, calib: EvalSet, cal: CalibrationOptions, n: int, plan: ReferencePlan,
                       cache: Path | None, log) -> EvalSet:
    """`calib` (images seed .. seed + len - 1) and the next n - len images, with their references (computed for
    the new ones only, cached like the first round's)."""
    have = len(calib)
    noise, labels, refs, info = _referenced(denoiser, n - have, cal.seed + have, plan, cache, log,
                                            f"references of {n - have} more calibration noises")
    log(f"  references of {n - have} more calibration noises ({info['cached']} from the cache, {info['computed']} "
        f"computed)")
    es = EvalSet(denoiser, torch.cat([calib.noise, noise]),
                 None if labels is None else torch.cat([calib.labels, labels]), plan.steps, INTEGRATOR)
    es.set_reference(None, torch.cat([calib.reference, refs]))
    return es


def refine_fits(denoiser: Denoiser, fits: list[Candidate], calib: EvalSet, opts: SearchOptions,
                cal: CalibrationOptions, plan: ReferencePlan, clock: Clock, pace: Pace, cache: Path | None,
                log, kept: dict | None = None, factors: tuple[int, ...] = REFINE_FACTORS) -> list[Candidate]:
    """`fits` (the first round's global fits, the lead first), each continued from its coefficients for
    REFINE_ITER L-BFGS iterations (at most opts.max_iter, a fit's own) on `factors` x the calibration noises
    (the largest the time left affords, at most MAX_REFINE_NOISES; `larger_calibration`) in its place, while
    the clock affords it (its time scaled from what the fit took per evaluation); the others as they were. The
    refined fit starts where the fit ended and keeps its best iterate on the larger set, which holds the first:
    never worse there. `kept`: where the larger set is kept for the next call (its references computed once; a
    later call with larger `factors` extends it)."""
    kept = {} if kept is None else kept
    out, big = [], kept.get("calibration")
    for c in fits:
        per_eval, iters = c.seconds / max(c.evals, 1), min(REFINE_ITER, opts.max_iter)  # at len(calib) noises
        sizes = [f * len(calib) for f in factors if f * len(calib) <= MAX_REFINE_NOISES]
        have = len(calib) if big is None else len(big)
        need = {m: pace.predict(max(m - have, 0), reference_calls(INTEGRATOR, plan.steps))
                + 1.25 * iters * per_eval * m / len(calib) for m in sizes}
        m = next((m for m in sizes if clock.deadline is None or need[m] <= clock.remaining()), None)
        if m is None or c.evals == 0:
            if sizes and c.evals:
                log(f"  {c.label} not refined on {sizes[-1]} calibration noises: ~{need[sizes[-1]]:.0f} s, "
                    f"{max(clock.remaining(), 0):.0f} s are left (raise --budget)")
            out.append(c)
            continue
        t0 = time.perf_counter()
        if big is None or len(big) < m:
            big = kept["calibration"] = larger_calibration(denoiser, big or calib, cal, m, plan, cache, log)
        data = big if len(big) == m else _first(big, m)
        deadline = _until(clock, 1.5 * need[m])
        program, info = fit_global(denoiser, c.program, data, opts.loss, max_iter=iters, deadline=deadline,
                                   on_eval=FitProgress(f"{c.label} refined on {m} noises", log, lbfgs_evals(iters),
                                                       deadline))
        out.append(replace(c, program=program, calib_loss=info["loss"], seconds=c.seconds + info["seconds"],
                           evals=c.evals + math.ceil(info["evals"] * m / len(calib)),
                           note=f"{c.note}, then {info['evals']} on {m} noises"))
        clock.lap("global fits", t0)
        log(f"  {c.label} refined on {m} calibration noises: loss {info['loss_base']:.4g} -> {info['loss']:.4g} "
            f"({info['evals']} evals, {time.perf_counter() - t0:.1f} s{', cut short by the budget' if info['cut'] else ''})")
    return out


def _first(es: EvalSet, m: int) -> EvalSet:
    """The first m noises of `es` with their references."""
    out = EvalSet(es.denoiser, es.noise[:m], None if es.labels is None else es.labels[:m], es.reference_steps,
                  es.integrator)
    out.set_reference(None, es.reference[:m])
    return out
