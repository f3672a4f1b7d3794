"""IIA calibration: fit each step's coefficients by least squares against an M-sub-step fine target.

Beyond the paper (see shared/notes/method.md):
  - the basis is scaled to unit norm and the fit is ridge-regularised toward the base coefficients, so
    ill-conditioned late steps cannot run off to 1e4 x their Heun values;
  - a held-out guard measures the END-TO-END error of the final samples against a high-accuracy reference
    and never returns coefficients that lose to the base solver: it keeps the fitted coefficients of the
    first k fittable steps and the base coefficients after, choosing k (0 = the base solver) by held-out error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from iia.cli import check_options, option
from iia.models.base import Denoiser

from iia.runtime.contract import draw_noise as contract_noise

from .sampling import (combine, finish_step, integrate, live_after, program_for, reference_solution, run_calls,
                       sample, start)
from .schedules import SCHEDULES, fine_grid
from .solvers import SOLVERS, Program, get_solver


# Held-out noises are images seed + HOLDOUT_SEED_OFFSET + k: disjoint from calibration's seed + k for any batch
# below the offset (the evaluation tools use their own offsets above it).
HOLDOUT_SEED_OFFSET = 10**6
# Bumped when what the guard measures changes, so cached calibrations decided by the old guard are redone
# (2: the reference starts at the program's sigmas[0], not sigma_max).
GUARD_VERSION = 2


class CalibrationError(ValueError):
    """Bad calibration options."""


@dataclass
class CalibrationOptions:
    """Calibration settings, each declared once with its command-line flag and bounds (see iia.cli.option).
    Roles: "steps" (the time steps: every solver), "fit" (an IIA fit), "seed" (the seed of the drawn noises),
    "guard" (the held-out guard), "reference" (the reference solution's steps), "research" (the fit's research
    switches: iia-calibrate offers them, iia-compile keeps their defaults)."""

    M: int = option(3, "fine sub-steps per step for the least-squares target", lo=1, hi=64, role="fit")
    r: int = option(1, "history length of the IIA basis", lo=0, hi=8, role="fit")
    batch: int = option(200, "calibration noises", flag="--calib-batch", aliases=("--batch",), lo=2, hi=100_000,
                    role="fit")
    seed: int = option(0, "seed of the calibration noises (images seed..seed+batch-1)", lo=0, hi=2**62,
                    role="seed")
    first_step: int = option(0, "first fitted step: 0 (paper text Alg. 1) or 1 (camera-ready: step 0 stays base)",
                             choices=(0, 1), role="research")
    fine_solver: str = option("base", "integrator of the fine target: the base solver (paper) or heun",
                              choices=("base", "heun"), role="research")
    ridge: float = option(1e-6, "relative ridge weight toward the base coefficients (unit-scaled basis)", lo=0.0, hi=1e6,
                          role="research")
    # Held-out noises for the end-to-end guard (256: fewer cannot tell a real 20% gain from chance on
    # heavy-tailed per-sample errors) and Heun steps of their reference solution. Each held-out noise costs
    # 2 x reference_steps denoiser calls, so None means 256 for an analytic model, 128 for networks.
    holdout: int | None = option(None, "held-out noises of the end-to-end guard (default 256)", lo=2, hi=100_000,
                                role="guard")
    reference_steps: int | None = option(None, "Heun steps of the guard's reference solution (default 256 analytic "
                                               "models, 128 networks)", lo=2, hi=100_000,
                                        role="reference")
    guard: bool = option(True, "ship the raw fit even if it loses end to end on held-out noise", flag="--no-guard",
                         role="research")
    guard_z: float = option(2.0, "standard errors by which a fit must beat the base on held-out noise", cli=False,
                             role="guard")
    guard_candidates: int = option(8, "fitted prefixes the guard tries", cli=False, lo=1, hi=1000,
                                   role="guard")
    chunk: int = option(100, "denoiser batch size during calibration (bounds memory)", cli=False, lo=1, hi=100_000,
                   role="fit")
    schedule: str = option("default", "time steps: the model's own (karras rho 7; a diffusers folder's timestep_spacing), "
                                      "karras, exponential, or for beta-table models the timestep selections uniform/"
                                      "quadratic (DDIM paper), leading/trailing/linspace (diffusers)", choices=SCHEDULES,
                           role="steps")

    def resolved(self, denoiser: Denoiser) -> "CalibrationOptions":
        """A copy with the model-dependent defaults filled in."""
        holdout = 256 if self.holdout is None else self.holdout
        steps = self.reference_steps if self.reference_steps is not None else (256 if denoiser.analytic else 128)
        schedule = denoiser.default_schedule if self.schedule == "default" else self.schedule
        return replace(self, schedule=schedule, holdout=holdout, reference_steps=steps)

    def validate(self) -> None:
        check_options(self, CalibrationError)


@dataclass
class CalibrationResult:
    program: Program  # the chosen coefficients (fitted, partly fitted, or base)
    fitted_program: Program  # the full least-squares fit, before the guard
    base_program: Program
    options: CalibrationOptions
    steps: list[dict] = field(default_factory=list)  # per-step local residuals
    guard: dict = field(default_factory=dict)  # held-out end-to-end errors and the decision
    seconds: float = 0.0
    search: dict = field(default_factory=dict)  # `auto`: the candidate table (iia.calibration.search)


def draw_noise(denoiser: Denoiser, n: int, seed: int, labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise float64 [n, *shape] and class labels int64 [n] (None for unconditional models) for images
    seed .. seed + n - 1, by the artifact contract's convention (`iia.runtime.contract.draw_noise`/`draw_labels`),
    so the same seed gives the same noise here, in iia-sample and in the parity check. Labels given are
    repeated to n; else drawn per image."""
    from iia.runtime.contract import draw_labels

    noise = torch.from_numpy(contract_noise(seed, n, denoiser.shape)).to(torch.float64)
    if not denoiser.conditional:
        return noise, None
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        return noise, labels.repeat((n + labels.numel() - 1) // labels.numel())[:n]
    return noise, torch.from_numpy(draw_labels(seed, n, denoiser.label_dim))


def solve_scaled_ridge(gram: torch.Tensor, rhs: torch.Tensor, base: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_c ||A + B c - T||^2 + ridge ||S (c - base)||^2 with S the basis norms, from B^T B and B^T (T - A)."""
    scale = torch.sqrt(torch.clamp(torch.diagonal(gram), min=1e-300))
    gram_s = gram / scale[:, None] / scale[None, :]
    rhs_s = rhs / scale
    base_s = base * scale
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    u = torch.linalg.lstsq(gram_s + ridge * eye, (rhs_s + ridge * base_s)[:, None]).solution[:, 0]
    return u / scale


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def calibrate(
    denoiser: Denoiser,
    solver: str,
    nfe: int,
    options: CalibrationOptions | None = None,
    labels=None,
    progress: Callable | None = None,
    reference: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
    **overrides,
) -> CalibrationResult:
    """Fit the IIA coefficients of `solver` at `nfe` for `denoiser` (sequential least squares, float64).

    `progress(done, total, text)` observes the work (the CLI draws a bar with it). `reference` may pass
    a precomputed held-out (noise, labels, reference solution) triple; that solution must start where the
    program does (`reference_solution(..., sigma_start=program.sigmas[0])`).
    """
    options = options or CalibrationOptions()
    unknown = [key for key in overrides if not hasattr(options, key)]
    if unknown:
        raise CalibrationError(f"unknown calibration option(s) {', '.join(unknown)}")
    options = replace(options, **overrides)  # the caller's options are never modified
    options.validate()
    options = options.resolved(denoiser)
    spec = get_solver(solver)
    if not spec.fitted:
        raise CalibrationError(f"solver '{solver}' has nothing to fit: use an IIA variant "
                               f"({', '.join(n for n, s in SOLVERS.items() if s.fitted)})")
    started = time.perf_counter()
    base = program_for(denoiser, solver, nfe, options.r, options.schedule)
    fine_family = spec.fine if options.fine_solver == "base" else "edm"
    noise, labels = draw_noise(denoiser, options.batch, options.seed, labels)
    chunks = _chunks(options.batch, options.chunk)
    values = [start(base, noise[c]) for c in chunks]
    chunk_labels = [None if labels is None else labels[c] for c in chunks]
    live = live_after(base)
    total_work = len(base.steps) * len(chunks)
    steps, report = [], []
    for step in base.steps:  # the interpreter's step-at-a-time executor, with the update fitted in between
        fit_this = step.fittable and step.index >= options.first_step and step.basis
        p = len(step.basis)
        gram = torch.zeros(p, p, dtype=torch.float64)
        rhs = torch.zeros(p, dtype=torch.float64)
        target_sq, n_elems, cached = 0.0, 0, []
        for ci, (vals, lab) in enumerate(zip(values, chunk_labels)):
            run_calls(step, vals, denoiser, lab)
            anchor = combine(step.anchor, vals)
            basis = torch.stack([combine(t, vals).reshape(-1) for _, t in step.basis], 1) if p else None
            if fit_this:
                target = integrate(fine_family, denoiser, vals[step.state],
                                   fine_grid(step.sigma_from, step.sigma_to, options.M), lab)
                resid = (target - anchor).reshape(-1)
                gram += basis.T @ basis
                rhs += basis.T @ resid
                target_sq += float(resid @ resid)
                n_elems += resid.numel()
            cached.append((anchor, basis))
            if progress:
                progress(step.index * len(chunks) + ci + 1, total_work, f"step {step.index + 1}/{len(base.steps)}")
        c_base = torch.tensor(step.coefficients, dtype=torch.float64)
        entry = {"step": step.index, "sigma_from": step.sigma_from, "sigma_to": step.sigma_to, "fitted": bool(fit_this)}
        if fit_this:
            c_fit = solve_scaled_ridge(gram, rhs, c_base, options.ridge)

            def local(c):
                return (max(target_sq - 2 * float(c @ rhs) + float(c @ gram @ c), 0.0) / n_elems) ** 0.5

            entry.update(local_rmse_base=local(c_base), local_rmse_fitted=local(c_fit))
            step = step.with_coefficients(c_fit.tolist())
        report.append(entry)
        steps.append(step)
        c_used = torch.tensor(step.coefficients, dtype=torch.float64)
        for vals, (anchor, basis) in zip(values, cached):
            finish_step(step, vals, anchor + (basis @ c_used).reshape(anchor.shape) if p else anchor, live[step.index])
    fitted = Program(base.solver, base.sigmas, tuple(steps), base.r)
    result = CalibrationResult(fitted, fitted, base, options, report)
    if options.guard:
        result.program, result.guard = guard_end_to_end(denoiser, base, fitted, options, reference, progress)
    result.seconds = time.perf_counter() - started
    return result


def holdout_set(denoiser: Denoiser, options: CalibrationOptions, labels=None, sigma_start: float | None = None,
                on_step: Callable[[int, int], None] | None = None):
    """Held-out noise (a different stream from the calibration batch) and its reference solution from
    sigma_start * noise (the judged program's sigmas[0]; default sigma_max); `on_step(done, total)` follows
    the reference integration."""
    noise, lab = draw_noise(denoiser, options.holdout, options.seed + HOLDOUT_SEED_OFFSET, labels)
    return noise, lab, reference_solution(denoiser, noise, lab, options.reference_steps, sigma_start=sigma_start,
                                          on_step=on_step)


def mixed_program(base: Program, fitted: Program, k: int) -> Program:
    """Fitted coefficients on steps < k, base coefficients from step k on."""
    return base.with_coefficients([f if s.index < k else b for s, f, b in
                                   zip(base.steps, fitted.coefficients(), base.coefficients())])


def per_sample_sq_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((x.to(torch.float64) - ref.to(torch.float64)) ** 2).reshape(x.shape[0], -1).mean(1)


def guard_end_to_end(denoiser, base: Program, fitted: Program, options, reference=None, progress=None):
    """Choose how many leading steps keep their fitted coefficients, by held-out end-to-end error.

    A candidate must beat the base solver by more than `guard_z` standard errors of the paired per-sample
    difference: a few held-out samples that happen to land better (multimodal data: trajectories near a
    basin boundary) must not decide, since the gain would not carry over to new noise.
    """
    say = progress or (lambda done, total, text: None)  # the guard is most of a calibration's time: show it
    noise, labels, ref = reference or holdout_set(
        denoiser, options, sigma_start=base.sigmas[0],
        on_step=lambda k, n: say(k, n, f"guard: reference on {options.holdout} held-out noises, step {k}/{n}"))
    fitted_steps = [s.index for s, b in zip(fitted.steps, base.steps) if s.coefficients != b.coefficients]
    boundaries = [i + 1 for i in fitted_steps]
    if len(boundaries) > options.guard_candidates:  # each candidate costs one held-out sampling run
        picks = torch.linspace(0, len(boundaries) - 1, options.guard_candidates).round().long().tolist()
        boundaries = [boundaries[i] for i in sorted(set(picks))]
    candidates = [0] + boundaries
    sq = {}
    for i, k in enumerate(candidates):
        say(i, len(candidates), f"guard: scoring {i + 1}/{len(candidates)} (fitted steps < {k})")
        sq[k] = per_sample_sq_error(sample(mixed_program(base, fitted, k), denoiser, noise, labels), ref)
    errors = {k: float(v.mean().sqrt()) for k, v in sq.items()}
    n = len(noise)

    def significant(k):
        diff = sq[k] - sq[0]
        return k == 0 or float(diff.mean()) + options.guard_z * float(diff.std()) / n**0.5 < 0

    accepted = [k for k in candidates if significant(k)]
    best = min(accepted, key=lambda k: (errors[k], -k))
    full = candidates[-1]
    if full == 0:  # no step has a basis term at this NFE: the "fit" is the base solver itself
        decision = "base: nothing to fit at this NFE"
    else:
        decision = "fitted" if best == full else ("base" if best == 0 else f"fitted steps < {best}, base after")
    guard = {
        "holdout": int(n),
        "reference_steps": options.reference_steps,
        "rmse_base": errors[0],
        "rmse_fitted": errors[full],
        "rmse_chosen": errors[best],
        "fitted_prefix": best,
        "decision": decision,
        "z": options.guard_z,
        "candidates": {str(k): v for k, v in errors.items()},
        "significant": [str(k) for k in accepted],
    }
    return mixed_program(base, fitted, best), guard
