"""Reference solutions for the `auto` search, as cheap as their accuracy allows, cached on disk, computed in
batches that a caller may cut short.

- The integrator is UniPC-3 on a fine Karras grid (one call per step; `sampling.REFERENCE_INTEGRATORS` says what
  it was measured against). How many steps a model needs is MEASURED (`choose_steps`): on a few probe noises the
  reference at S steps is compared with one at 2S (their difference estimates the error at S), and S doubles
  from 16 until that error is <= ACCURACY_TARGET x the error of the prior base solver at the NFE (1/10 of the
  error of a candidate 5x better than that base: fits reach 0.1-0.3x their base), or until the probe's time
  share is spent.
- References are cached per GRANULE of 8 images through the one cache (`calibration.cache`), keyed by the model
  (weights' sha256, or an analytic model's config), the first image and count (the noise convention draws image
  k of seed s from seed s + k alone), labels, start sigma, integrator and steps: a compile at another NFE or
  solver reuses them, whatever number of noises its budget affords (and those of 2x or 4x the steps, made for
  an NFE that needed a finer reference).
- `compute` runs the granules missing from the cache in batches and asks `replan` after each how many noises
  it still wants (the caller's budget: a machine that got busier after the timing cuts the noises, not the
  budget).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from iia.models.base import Denoiser

from .artifact import model_identity
from .cache import lookup, store
from .evalset import draw_noise, rmse
from .sampling import reference_calls, reference_solution, sample
from .solvers import DEFINITION_VERSION, Program

INTEGRATOR = "unipc-3"
GRANULE = 8  # images per cache entry
ACCURACY_TARGET = 0.02  # reference error / the prior base's error, at most (see the module docstring)
PROBE_STEPS = (16, 32, 64, 128, 256)  # the grids the accuracy probe tries, in order
UNMEASURED_STEPS = 64  # when the budget cannot afford even the coarsest pair of the probe
# The error of the integrator (UniPC-3: 3rd order) falls with the steps S as S^-p, 2 <= p <= 3 on the probe's grids:
# from an error measured at S0, (S0 / S)^3 bounds it above below S0 and (S0 / S)^2 above S0
ORDER_BELOW, ORDER_ABOVE = 3, 2
STALL = 0.5  # a doubling that leaves more than this of the error has stalled (UniPC-3 should leave ~1/8)


def whole_granules(n: int) -> int:
    """n rounded up to whole granules: the noises `compute` really integrates when asked for n."""
    return -(-n // GRANULE) * GRANULE


# a batch of 64 noises that takes less than this is mostly per-call overhead (gmm: 64 noises of 32 UniPC-3 steps
# ran at 3.7x the timed cost per image-call, and the pace then cut the held-out noises): such a model's batches
# grow to ~CHEAP_BATCH_S, within BATCH_BYTES of float64 states
CHEAP_BATCH_S, BATCH_BYTES = 0.1, 1 << 26


def reference_batch(rate: float, calls: int, total: int, numel: int = 1) -> int:
    """Noises per `compute` batch for `total` noises of `calls` calls each at `rate` seconds per image-call (images
    of `numel` elements): ~10 s a batch (progress, and an early re-plan), <= 64 noises unless 64 take less than
    CHEAP_BATCH_S (then as many as take ~CHEAP_BATCH_S, within BATCH_BYTES of float64 states), <= 1/8 of the
    total, whole granules."""
    most = max(GRANULE, total // 8 // GRANULE * GRANULE)
    granule_s = max(calls * rate * GRANULE, 1e-12)
    if 8 * granule_s < CHEAP_BATCH_S:
        cheap = min(int(CHEAP_BATCH_S / granule_s), BATCH_BYTES // (8 * numel * GRANULE))
        return min(most, GRANULE * max(8, cheap))
    return min(most, GRANULE * max(1, min(8, int(10.0 / granule_s))))


@dataclass(frozen=True)
class Accuracy:
    """The reference's RMSE error `error` measured at `steps` steps (against twice as many, on the probe's noises);
    `best`: the probe's best base solver ("family/final"), whose error `base_error` set the target; `grids`: every
    (steps, error) the probe measured on its way (coarsest first), `steps` among them."""
    steps: int
    error: float
    best: str = ""
    grids: tuple[tuple[int, float], ...] = ()
    base_error: float = 0.0  # the best base's RMSE error on the probe's noises (0: not measured)

    def basis(self, steps: int) -> tuple[int, float]:
        """The measurement `at` estimates `steps` from: `steps` itself when measured (`self.steps` first), else the
        finest measured grid coarser than it, else the coarsest measured."""
        measured = dict(self.grids)
        measured[self.steps] = self.error
        if steps in measured:
            return steps, measured[steps]
        coarser = [s for s in measured if s < steps]
        s0 = max(coarser) if coarser else min(measured)
        return s0, measured[s0]

    def at(self, steps: int) -> tuple[float, bool]:
        """(the estimated error at `steps` steps, whether it is extrapolated): measured there, else from `basis` by
        the integrator's order: up from a coarser grid at ORDER_ABOVE (an upper bound), down only below every grid
        measured, at ORDER_BELOW. A 16x16 ADM pickle measured 5.1e-6 at 128 steps and 0.043 at 16, where 128's
        extrapolated down claimed 0.0026: the check then passed references coarser than the NFE-400 sampler."""
        s0, e0 = self.basis(steps)
        if steps == s0:
            return e0, False
        return e0 * (s0 / steps) ** (ORDER_BELOW if steps < s0 else ORDER_ABOVE), True


def choose_steps(denoiser: Denoiser, bases: list[Program], seed: int, rate_s: float, share_s: float | None,
                 max_steps: int) -> tuple[int, str, Accuracy | None]:
    """(steps, what was measured (one line for the plan), the reference's error as measured (`Accuracy`: at the
    coarser grid of the last pair compared; `Accuracy.at` estimates it at any steps), or None when not measured).

    `bases`: the base solvers at the NFE, the prior first; the least error of those the probe's time affords sets
    the target; `rate_s`: seconds per image-call; `share_s`: the probe's time (None: unbounded); probes 4 noises of
    `seed` (2 when 4 cost too much)."""
    n = 4 if share_s is None or 1.5 * 4 * rate_s * (PROBE_STEPS[0] + PROBE_STEPS[1]) <= share_s else 2
    noise, labels = draw_noise(denoiser, n, seed)
    started, refs, base_errors = time.perf_counter(), {}, {}

    def affordable(steps: int) -> bool:
        spent = time.perf_counter() - started
        return share_s is None or spent + 1.5 * n * rate_s * reference_calls(INTEGRATOR, steps) <= share_s

    # the probe's grids below the cap, then the cap itself; each measured against one twice as fine (the cap bounds
    # the references the search uses, not the 4-noise probe that judges them)
    grids = [s for s in PROBE_STEPS if s < max_steps] + [max_steps]
    if not affordable(3 * grids[0]):
        return (min(UNMEASURED_STEPS, max_steps), f"{INTEGRATOR}, {min(UNMEASURED_STEPS, max_steps)} steps: accuracy "
                f"not measured (the budget cannot afford {n} probe noises at {grids[0]} and {2 * grids[0]} steps)",
                None)
    seen: list[Accuracy] = []  # the earlier grids' measurements
    for k, coarse in enumerate(grids):
        fine = 2 * coarse
        for steps in (coarse, fine):
            if steps not in refs:
                refs[steps] = reference_solution(denoiser, noise, labels, steps, integrator=INTEGRATOR)
        error = rmse(refs[coarse], refs[fine])
        if not base_errors:  # the bases' errors, against the first fine reference, once: the best sets the target
            for j, base in enumerate(bases):
                if j and share_s is not None and (time.perf_counter() - started
                                                  + 1.5 * n * rate_s * base.nfe > share_s / 2):
                    break
                base_errors[f"{base.solver}/{'zero' if base.sigmas[-1] == 0 else 'sigma_min'}"] = rmse(
                    sample(base, denoiser, noise, labels), refs[fine])
        best = min(base_errors, key=base_errors.get)
        ratio = error / max(base_errors[best], 1e-300)
        said = (f"{INTEGRATOR}, {coarse} steps ({reference_calls(INTEGRATOR, coarse)} calls per noise): error "
                f"{error:.3g} vs {fine} steps on {n} noises = {ratio:.3g}x the error of the best of {len(base_errors)} "
                f"base solvers at NFE {bases[0].nfe} ({best}) (target <= {ACCURACY_TARGET:g}x)")
        on_the_way = tuple((a.steps, a.error) for a in seen) + ((coarse, error),)
        measured = Accuracy(coarse, error, best, on_the_way, base_errors[best])
        if ratio <= ACCURACY_TARGET:
            return coarse, said, measured
        if (len(seen) >= 2 and seen[-1].steps * 2 == coarse and seen[-2].steps * 2 == seen[-1].steps
                and seen[-1].error <= seen[-2].error / 4 and error > STALL * seen[-1].error):
            # converging, then more steps stop helping (a 16x16 DDPM++ pickle: 5.2e-3 at 32 steps, 5.9e-4 at 64,
            # 8.5e-4 at 128): the coarser grid, its error taken as the larger of the two, at half the references'
            # cost. Not before it converged: at 16 and 32 steps the same model's error fell only 1.85x
            last = seen[-1]
            return last.steps, (f"{said}; not met, and twice the steps cut the error less than {1 / STALL:g}x (from "
                                f"{last.error:.3g} at {last.steps}): the model's own floor, using {last.steps} steps"), \
                Accuracy(last.steps, max(error, last.error), best, on_the_way, base_errors[best])
        seen.append(measured)
        if coarse == max_steps:
            return coarse, f"{said}; not met, using {coarse} steps (the most --reference-steps allows)", measured
        nxt = grids[k + 1]
        if not affordable(nxt + 2 * nxt if nxt not in refs else 2 * nxt):
            # extrapolated: the error falls >= 4x per doubling (2nd order at least; UniPC-3 is 3rd)
            doublings = max(1, math.ceil(math.log(ratio / ACCURACY_TARGET, 4)))
            steps = min(coarse * 2**doublings, max_steps)
            return steps, (f"{said}; not met, the probe's time share is spent: using {steps} steps (the error "
                           f"extrapolated at >= 4x less per doubling)"), measured
    raise AssertionError("unreachable")


def granule_key(denoiser: Denoiser, first_image: int, count: int, labels: torch.Tensor | None, sigma_start: float,
                integrator: str, steps: int) -> str | None:
    """Cache file name of the reference of images first_image .. first_image + count - 1, or None for a model
    with nothing to key on (no weights' sha256 and not analytic: a Python callable)."""
    ident = {k: v for k, v in model_identity(denoiser).items() if k != "path"}
    if not ident.get("sha256") and not denoiser.analytic:
        return None
    payload = {"model": ident, "first_image": first_image, "count": count,
               "labels": None if labels is None else labels.tolist(), "sigma_start": sigma_start,
               "integrator": integrator, "steps": steps, "definition": DEFINITION_VERSION, "dtype": "float64"}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"reference-{integrator}-{steps}-{digest}.npy"


def _to_bytes(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.numpy(), allow_pickle=False)
    return buf.getvalue()


def _loader(shape: tuple[int, ...]):
    def load(data: bytes, path: Path) -> torch.Tensor:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.float64 or array.shape != shape or not np.isfinite(array).all():
            raise ValueError(f"holds {array.dtype} {list(array.shape)}, not finite float64 {list(shape)}")
        return torch.from_numpy(array)
    return load


def compute(denoiser: Denoiser, noise: torch.Tensor, labels: torch.Tensor | None, seed: int, steps: int,
            cache: Path | None, log: Callable[[str], None], batch: int,
            replan: Callable[[int, float, int], int] | None = None,
            on_step: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """References float64 [n', *shape] of the first n' of `noise` (images seed..), n' <= n as `replan` decides.

    Cached granules are read first (a bad one is dropped, named and remade); the missing ones run `batch`
    noises at a time, in order; after each batch `replan(done, seconds, image_calls)` (noises done so far; the
    seconds and image-calls the batch took) returns how many noises are still wanted (never fewer than done).
    Returns (references, {"cached": noises read from the cache, "computed": noises integrated})."""
    n = noise.shape[0]
    top = float(denoiser.sigma_max)
    granules = [slice(a, min(a + GRANULE, n)) for a in range(0, n, GRANULE)]
    # a reference on a finer grid (2x, 4x the steps: made for a higher NFE) is as good: reused too
    finer = [steps * 2**k for k in range(3)]
    keys = [None if cache is None else [granule_key(denoiser, seed + g.start, g.stop - g.start,
                                                    None if labels is None else labels[g], top, INTEGRATOR, s)
                                        for s in finer] for g in granules]
    per_image = int(np.prod(denoiser.shape)) * 8
    out: dict[int, torch.Tensor] = {}
    dropped: set[int] = set()  # granules with an unusable entry: recomputed only if still wanted (said below)
    for i, (g, options) in enumerate(zip(granules, keys)):
        shape = (g.stop - g.start, *denoiser.shape)

        def note(text: str, i=i) -> None:
            dropped.add(i)
            log(text)
        for key in options or ():
            got = None if key is None else lookup(cache / key, _loader(shape), note, limit=per_image * shape[0] + 1024,
                                                  what="cached reference", redo=None)
            if got is not None:
                out[i] = got
                break
    cached_granules = set(out)
    cached = sum(granules[i].stop - granules[i].start for i in out)
    wanted, done_calls = n, 0
    total_calls = planned = (n - cached) * reference_calls(INTEGRATOR, steps)
    i = 0
    while i < len(granules) and granules[i].start < wanted:
        if i in out:
            i += 1
            continue
        run = []  # consecutive missing granules, up to `batch` noises
        while (i < len(granules) and i not in out and granules[i].start < wanted
               and (not run or granules[i].stop - granules[run[0]].start <= batch)):
            run.append(i)
            i += 1
        part = slice(granules[run[0]].start, granules[run[-1]].stop)
        m = part.stop - part.start
        t0 = time.perf_counter()
        calls = m * reference_calls(INTEGRATOR, steps)
        tick = None if on_step is None else (
            lambda k, total, before=done_calls, calls=calls: on_step(before + calls * k // max(total, 1), total_calls))
        ref = reference_solution(denoiser, noise[part], None if labels is None else labels[part], steps,
                                 chunk=max(m, 1), on_step=tick, integrator=INTEGRATOR)
        seconds = time.perf_counter() - t0
        done_calls += calls
        for j in run:
            g = granules[j]
            out[j] = ref[g.start - part.start:g.stop - part.start]
            if keys[j] is not None and keys[j][0] is not None:
                store(cache / keys[j][0], _to_bytes(out[j]), log, limit=per_image * (g.stop - g.start) + 1024,
                      what="reference", made_from={"model_sha256": denoiser.identity.get("sha256"),
                                                   "first_image": seed + g.start, "integrator": INTEGRATOR,
                                                   "steps": steps})
        if replan is not None:
            wanted = max(min(replan(part.stop, seconds, calls), n), part.stop)
            # the progress total follows the re-plan: the calls still to make for the noises still wanted
            total_calls = done_calls + reference_calls(INTEGRATOR, steps) * sum(
                min(g.stop, wanted) - g.start for j, g in enumerate(granules)
                if j >= i and j not in out and g.start < wanted)
    # the noises wanted, from the first: every granule before `wanted` is present (cached or computed)
    last = next((j for j, g in enumerate(granules) if g.stop >= wanted), len(granules) - 1)
    remade = sorted(j for j in dropped if j <= last and j in out and j not in cached_granules)
    if remade:
        log(f"  recomputed {sum(granules[j].stop - granules[j].start for j in remade)} noises of the dropped cached "
            f"references (images {', '.join(f'{seed + granules[j].start}..{seed + granules[j].stop - 1}' for j in remade)})")
    refs = torch.cat([out[j] for j in range(last + 1)])[:wanted]
    return refs, {"cached": min(cached, wanted), "computed": wanted - min(cached, wanted), "calls": done_calls,
                  "planned_calls": planned}


def reference_check(accuracy: Accuracy | None, steps: int, rmse: float, base_rmse: float | None, max_steps: int,
                    default_cap: bool) -> tuple[str, dict]:
    """The references' own error (`accuracy` at `steps`) against the shipped candidate's held-out RMSE `rmse`:
    (the log line, the record). Within 0.1x of it: record {}. Over it, held-out RMSEs are resolved only to +-that
    error (a fit to the references learns their error too), and by the triangle inequality (RMSE over a set of
    noises is a norm) the true RMSE is at most rmse + error: {"reference_error", "rmse_chosen_upper"}, said with
    the bound on the ratio to the base (`base_rmse`; None: the shipped candidate is its base, no ratio) and what
    would allow finer references (`max_steps`, the --reference-steps cap, `default_cap` when not given). Not measured (None): {"reference_error": None}."""
    if accuracy is None:
        return ("  reference check: the references' error was not measured (the budget could not afford the probe): "
                "the held-out RMSEs are against references of unknown accuracy (raise --budget)",
                {"reference_error": None})
    error, extrapolated = accuracy.at(steps)
    s0, e0 = accuracy.basis(steps)
    how = f"extrapolated from {e0:.3g} measured at {s0} steps" if extrapolated else "measured"
    head = (f"  reference check: the estimated error of its {steps} {INTEGRATOR} steps, {error:.3g} ({how}), is "
            f"{error / rmse:.3g}x the shipped candidate's held-out RMSE")
    if error <= 0.1 * rmse:
        return f"{head} (within the 0.1x the references must reach)", {}
    upper = rmse + error
    more = (f"{max_steps} steps are --reference-steps' {'default ' if default_cap else ''}cap" if steps >= max_steps
            else "finer references need a larger --budget")
    bound = "" if base_rmse is None or base_rmse <= error else f", <= ~{upper / (base_rmse - error):.3g}x its base's"
    return (f"{head}, OVER the 0.1x the references must reach: held-out RMSEs are resolved to +-{error:.2g} only; the "
            f"shipped candidate's true RMSE is at most ~{upper:.3g} (its held-out RMSE + the references' estimated "
            f"error){bound} ({more})", {"reference_error": error, "rmse_chosen_upper": upper})
