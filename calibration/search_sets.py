"""The `auto` search's calibration and held-out sets (`calibration/search.py`): the references of the noises the
plan (`search_plan.plan_references`) sized, computed in batches and re-planned at the measured pace so that the
references and the scoring end within their share of --budget."""

from __future__ import annotations

import math
import time
from pathlib import Path

from iia.cli import Ticker
from iia.models.base import Denoiser

from .evalset import EvalSet, draw_noise
from .fit import HOLDOUT_SEED_OFFSET, CalibrationOptions
from .references import INTEGRATOR, compute, reference_batch, whole_granules
from .sampling import reference_calls
from .search_plan import MIN_CALIB, MIN_HOLDOUT, Clock, ReferencePlan, held_out_programs
from .search_timing import Pace, recheck_threads


def evaluation_sets(denoiser: Denoiser, plan: ReferencePlan, cal: CalibrationOptions, clock: Clock, pace: Pace,
                     fixed_until: float | None, nfe: int, n_fitted: int, cache: Path | None,
                     log) -> tuple[EvalSet, EvalSet]:
    """The calibration and held-out sets with their references (`references.compute`, cached under `cache`),
    computed in batches; after each, the remaining noises are re-planned at the measured pace so that the
    references and the scoring still end by `fixed_until` (a time.perf_counter() value; None: no bound)."""
    t0 = time.perf_counter()
    sizes = {"calibration": plan.batch, "held-out": plan.holdout}
    done = {"calibration": 0, "held-out": 0}
    n_bases = len(plan.families) * len(plan.finals)
    calls = reference_calls(INTEGRATOR, plan.steps)
    batch = reference_batch(plan.rate, calls, plan.batch + plan.holdout, math.prod(denoiser.shape))  # re-plans early

    def replan(which: str):
        def cut(n_done: int, seconds: float, image_calls: int) -> int:
            done[which] = n_done
            pace.observe(image_calls // calls, calls, seconds)
            if fixed_until is None:
                return sizes[which]
            if recheck_threads(denoiser, log, pace.slow):
                pace.restart()  # the next batch measures the pace on 1 thread
                return sizes[which]

            def need() -> float:
                refs = sum(pace.predict(sizes[w] - done[w], calls) for w in sizes)
                return refs + pace.predict(sizes["calibration"], nfe * n_bases) + pace.predict(
                    sizes["held-out"], nfe * held_out_programs(n_bases, n_fitted))
            before = dict(sizes)
            while time.perf_counter() + need() > fixed_until:
                # the held-out noises above the plan's floor first (as `reference_sizes` cuts them)
                bonus = sizes["held-out"] > max(plan.holdout_floor, done["held-out"])
                lo = {"calibration": sizes["calibration"] if bonus else MIN_CALIB,
                      "held-out": max(plan.holdout_floor, MIN_HOLDOUT) if bonus else MIN_HOLDOUT}
                # never above the size it had (a --holdout 2 below MIN_HOLDOUT was raised to 32 by a "cut")
                shrunk = {w: min(sizes[w], max(lo[w], done[w], whole_granules(int(sizes[w] * 0.8)))) for w in sizes}
                if shrunk == sizes:
                    break
                sizes.update(shrunk)
            if sizes != before:
                log(f"  references re-planned at {pace.slow:.2g}x the timed cost per call: "
                    + ", ".join(f"{w} noises {before[w]} -> {sizes[w]}" for w in sizes if sizes[w] != before[w]))
            return sizes[which]
        return cut

    sets = {}
    for which, seed in (("calibration", cal.seed), ("held-out", cal.seed + HOLDOUT_SEED_OFFSET)):
        noise, labels = draw_noise(denoiser, sizes[which], seed)
        refs, info = compute(denoiser, noise, labels, seed, plan.steps, cache, log, batch, replan(which),
                             Ticker(f"{which} references, denoiser calls", log))
        n = refs.shape[0]
        done[which] = sizes[which] = n  # finished: a later re-plan neither cuts nor reports it
        es = EvalSet(denoiser, noise[:n], None if labels is None else labels[:n], plan.steps, INTEGRATOR)
        es.set_reference(None, refs)
        sets[which] = es
        log(f"  {which} references: {n} noises ({info['cached']} from the cache, {info['computed']} computed)")
    calib, hold = sets["calibration"], sets["held-out"]
    clock.lap("references", t0)
    log(f"  references: {len(calib)} calibration + {len(hold)} held-out noises, {plan.steps} {INTEGRATOR} steps "
        f"({clock.timings['references']:.1f} s)")
    return calib, hold
