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

from iia.cli import check_options, counted, option
from iia.models.base import Denoiser

from iia.runtime.program import StepView, execute

from .evalset import draw_noise, evaluation_set, sample_errors
from .sampling import TORCH, integrate, reference_calls, sample
from .schedules import SCHEDULES, fine_grid, program_for
from .shipping import TOLERANCE, judge, rule_text
from .solvers import Program, Step, base_program_for_grid, user_solver, user_solvers


# Held-out noises are images seed + HOLDOUT_SEED_OFFSET + k: disjoint from calibration's seed + k for any batch
# below the offset (the evaluation tools use their own offsets above it).
HOLDOUT_SEED_OFFSET = 10**6
# Bumped when what the guard measures changes, so cached calibrations decided by the old guard are redone
# (2: the reference starts at the program's sigmas[0], not sigma_max; 3: the shipping rule, a paired-bootstrap
# bound on the RMSE ratio, replaced the z test).
GUARD_VERSION = 3
ANALYTIC_HOLDOUT, NETWORK_HOLDOUT = 4096, 256  # default held-out noises (CalibrationOptions.holdout)


class CalibrationError(ValueError):
    """Bad calibration options."""


@dataclass
class CalibrationOptions:
    """Calibration settings, each declared once with its command-line flag and bounds (see iia.cli.option).
    Roles: "steps" (the time steps: every solver), "fit" (an IIA fit), "seed" (the seed of the drawn noises),
    "guard" (the held-out guard), "reference" (the reference solution's steps), "research" (the fit's research
    switches: iia-calibrate offers them, iia-compile keeps their defaults)."""

    M: int = option(3, "fine sub-steps per step for the least-squares target", lo=1, hi=64, role="fit")
    r: int = option(1, "history length of the IIA basis (default 1; iia-compile's --solver auto, unless given: global "
                          "fits with 3 history terms and in the linear form over all earlier values, the local fit 3)",
                    lo=0, hi=8,
                    role="fit")
    batch: int = option(200, "calibration noises (default 200; iia-compile's --solver auto, unless given: 512 analytic "
                                     "models, 128 networks)",
                        flag="--calib-batch", aliases=("--batch",), lo=2, hi=100_000, role="fit")
    seed: int = option(0, "seed of the calibration noises (images seed..seed+batch-1)", lo=0, hi=2**62,
                    role="seed")
    first_step: int = option(0, "first fitted step: 0 (paper text Alg. 1) or 1 (camera-ready: step 0 stays base)",
                             choices=(0, 1), role="research")
    fine_solver: str = option("base", "integrator of the fine target: the base solver (paper) or heun",
                              choices=("base", "heun"), role="research")
    ridge: float = option(1e-6, "relative ridge weight toward the base coefficients (unit-scaled basis)", lo=0.0, hi=1e6,
                          role="research")
    # Held-out noises for the end-to-end guard and the search, and Heun steps of their reference solution. Each
    # held-out noise costs 2 x reference_steps denoiser calls. None: ANALYTIC_HOLDOUT for an analytic model, whose
    # calls are nearly free and whose rare mode-switching trajectories (~1 noise in 100 on gmm, errors 10-100x the
    # median) decide the RMSE on fresh noise: 256 noises hold none of them and let fits ship that lose on fresh
    # noise (docs/accuracy.md); NETWORK_HOLDOUT for networks (fewer cannot tell a real 20% gain from chance).
    # Reference steps: None means 256 for an analytic model, 128 for networks.
    holdout: int | None = option(None, "held-out noises of the end-to-end guard (default 4096 analytic models, 256 "
                                       "networks) and of iia-compile's --solver auto (default 32768, fewer "
                                       "where their memory or --budget is short)", lo=2, hi=100_000, role="guard")
    reference_steps: int | None = option(None, "steps of the reference solution: Heun's for the guard (default 256 "
                                               "analytic models, 128 networks); for iia-compile's --solver auto the cap "
                                               "of its UniPC-3 references, whose steps the plan's probe measures",
                                         lo=2, hi=100_000, role="reference")
    guard: bool = option(True, "ship the raw fit even if it loses end to end on held-out noise", flag="--no-guard",
                         role="research")
    guard_level: float = option(0.95, "one-sided confidence with which a fit must not lose to its base in held-out "
                                      "RMSE (calibration/shipping.py)", cli=False, lo=0.5, hi=0.999, role="guard")
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
        holdout = (ANALYTIC_HOLDOUT if denoiser.analytic else NETWORK_HOLDOUT) if self.holdout is None else self.holdout
        steps = self.reference_steps if self.reference_steps is not None else (256 if denoiser.analytic else 128)
        schedule = denoiser.default_schedule if self.schedule == "default" else self.schedule
        return replace(self, schedule=schedule, holdout=holdout, reference_steps=steps)

    def validate(self) -> None:
        check_options(self, CalibrationError)


def check_reference_steps(steps: int | None, nfe: int) -> None:
    """A given --reference-steps must be at least twice the judged sampler's NFE (the auto search's rule): a
    coarser reference errs as much as the sampler, so it cannot tell a fit from its base. CalibrationError."""
    if steps is not None and steps < 2 * nfe:
        raise CalibrationError(f"--reference-steps {steps}: a reference coarser than twice the sampler's NFE {nfe} "
                               f"cannot judge it; give at least {2 * nfe}, or leave the default")


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


def chunked(denoiser: Callable, size: int) -> Callable:
    """denoiser(x, sigma, labels) called on at most `size` rows at a time (bounds a network's memory)."""
    def call(x: torch.Tensor, sigma: float, labels):
        return torch.cat([denoiser(x[c], sigma, None if labels is None else labels[c])
                          for c in _chunks(x.shape[0], size)])
    return call


def fit_update(step: Step, view: StepView, denoiser: Denoiser, options: CalibrationOptions, fine_family: str,
               chunks: list[slice], labels: torch.Tensor | None) -> tuple[Step, dict]:
    """Step `step`'s coefficients by ridge least squares at its update (`view`: anchor, basis and the state it
    integrates from, all noises): the target is the family's fine integration of that state over `options.M`
    sub-steps, accumulated `chunks` at a time. Returns (the step with its coefficients, its report entry)."""
    fit_this = step.fittable and step.index >= options.first_step and step.basis
    p = len(step.basis)
    device = view.anchor.device  # accumulated where the trajectory is, solved on the CPU (a p x p system)
    gram = torch.zeros(p, p, dtype=torch.float64, device=device)
    rhs = torch.zeros(p, dtype=torch.float64, device=device)
    target_sq, n_elems = 0.0, 0
    for c in chunks:
        if fit_this:
            anchor = view.anchor[c]
            basis = torch.stack([b[c].reshape(-1) for b in view.basis], 1)
            target = integrate(fine_family, denoiser, view.values[step.state][c],
                               fine_grid(step.sigma_from, step.sigma_to, options.M), None if labels is None else labels[c])
            resid = (target - anchor).reshape(-1)
            gram += basis.T @ basis
            rhs += basis.T @ resid
            target_sq += float(resid @ resid)
            n_elems += resid.numel()
    gram, rhs = gram.cpu(), rhs.cpu()
    c_base = torch.tensor(step.coefficients, dtype=torch.float64)
    entry = {"step": step.index, "sigma_from": step.sigma_from, "sigma_to": step.sigma_to, "fitted": bool(fit_this)}
    if fit_this:
        c_fit = solve_scaled_ridge(gram, rhs, c_base, options.ridge)

        def local(c):
            return (max(target_sq - 2 * float(c @ rhs) + float(c @ gram @ c), 0.0) / n_elems) ** 0.5

        entry.update(local_rmse_base=local(c_base), local_rmse_fitted=local(c_fit))
        step = step.with_coefficients(c_fit.tolist())
    return step, entry


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
    try:
        spec = user_solver(solver)
    except ValueError as err:
        raise CalibrationError(str(err)) from None
    if not spec.fitted:
        raise CalibrationError(f"solver '{solver}' has nothing to fit: use an IIA variant "
                               f"({', '.join(user_solvers(fitted=True))})")
    started = time.perf_counter()
    base = program_for(denoiser, solver, nfe, options.r, options.schedule)
    fine_family = fine_target(spec, options)
    noise, labels = draw_noise(denoiser, options.batch, options.seed, labels)
    chunks = _chunks(options.batch, options.chunk)
    steps, report = [], []
    calls = calibration_calls(base, options, fine_family, reference is None)
    with counted(progress, sum(calls.values()), lambda: denoiser.image_calls) as phase:
        def fit_step(k: int, view: StepView) -> tuple[float, ...]:
            phase(f"fit, step {k + 1}/{len(base.steps)}")
            step, entry = fit_update(base.steps[k], view, denoiser, options, fine_family, chunks, labels)
            steps.append(step)
            report.append(entry)
            return step.coefficients  # the trajectory goes on with the fitted update

        # the one executor, the fit in its on_step; the denoiser sees `chunk` noises at a time (bounds memory)
        execute(base.plan(), chunked(denoiser, options.chunk), noise, labels, on_step=fit_step, arrays=TORCH)
        fitted = Program(base.solver, base.sigmas, tuple(steps), base.r)
        result = CalibrationResult(fitted, fitted, base, options, report)
        if options.guard:
            result.program, result.guard = guard_end_to_end(denoiser, base, fitted, options, reference, phase)
    result.seconds = time.perf_counter() - started
    return result


def fine_target(spec, options: CalibrationOptions) -> str:
    """The family whose integrator gives the fit's fine target: the solver's own (the paper) or Heun's."""
    return spec.fine if options.fine_solver == "base" else "edm"


def calibration_calls(base: Program, options: CalibrationOptions, fine_family: str,
                      reference: bool = True) -> dict[str, int]:
    """The denoiser image-calls a calibration of `base` makes (options resolved): "fit" (the calibration noises'
    trajectory and each fitted step's fine integration over M sub-steps), and with the guard "guard reference"
    (its Heun reference on the held-out noises; none when `reference` is False: given) and "guard scoring" (the
    base and up to guard_candidates fitted prefixes, each a run of the sampler on them)."""
    fitted = [s for s in base.steps if s.fittable and s.index >= options.first_step and s.basis]
    fine = sum(base_program_for_grid(fine_family, fine_grid(s.sigma_from, s.sigma_to, options.M).tolist()).nfe
               for s in fitted)
    calls = {"fit": options.batch * (base.nfe + fine)}
    if options.guard:
        calls["guard reference"] = options.holdout * reference_calls("heun", options.reference_steps) if reference \
            else 0
        calls["guard scoring"] = options.holdout * base.nfe * (1 + min(len(fitted), options.guard_candidates))
    return calls


def calibration_line(denoiser: Denoiser, solver: str, nfe: int, options: CalibrationOptions) -> str:
    """What a calibration will cost, in one log line: its denoiser image-calls by phase (`calibration_calls`)."""
    resolved = options.resolved(denoiser)
    spec = user_solver(solver)
    calls = calibration_calls(program_for(denoiser, solver, nfe, resolved.r, resolved.schedule), resolved,
                              fine_target(spec, resolved))
    parts = [f"fit {calls['fit']:,} on {resolved.batch} noises"] + (
        [f"guard {calls['guard reference'] + calls['guard scoring']:,} on {resolved.holdout} held-out noises (Heun "
         f"reference at {resolved.reference_steps} steps, then the base and fitted prefixes)"] if resolved.guard else [])
    return (f"calibrating {solver} NFE {nfe}: ~{sum(calls.values()):,} denoiser image-calls ({'; '.join(parts)}); "
            f"progress below counts them")


def mixed_program(base: Program, fitted: Program, k: int) -> Program:
    """Fitted coefficients on steps < k, base coefficients from step k on."""
    return base.with_coefficients([f if s.index < k else b for s, f, b in
                                   zip(base.steps, fitted.coefficients(), base.coefficients())])


def guard_end_to_end(denoiser, base: Program, fitted: Program, options, reference=None, phase=None):
    """Choose how many leading steps keep their fitted coefficients, by held-out end-to-end error.

    A candidate (fitted steps < k) must pass the shipping rule (`shipping.judge`) against the base solver: the
    one-sided `guard_level` paired-bootstrap upper bound of its held-out RMSE over the base's at most 1. A few
    held-out samples that happen to land better (multimodal data: trajectories near a basin boundary) must not
    decide, since the gain would not carry over to new noise. The lowest held-out RMSE among those that pass
    ships (the base always passes).
    """
    say = phase or (lambda text: None)  # the guard is most of a calibration's time: name what it is at
    if reference is None:
        hold = evaluation_set(denoiser, options.holdout, options.seed + HOLDOUT_SEED_OFFSET, options.reference_steps)
        reference = hold.noise, hold.labels, hold.reference_at(base.sigmas[0], on_step=lambda k, n: say(
            f"guard: reference on {options.holdout} held-out noises, step {k}/{n}"))
    noise, labels, ref = reference
    fitted_steps = [s.index for s, b in zip(fitted.steps, base.steps) if s.coefficients != b.coefficients]
    boundaries = [i + 1 for i in fitted_steps]
    if len(boundaries) > options.guard_candidates:  # each candidate costs one held-out sampling run
        picks = torch.linspace(0, len(boundaries) - 1, options.guard_candidates).round().long().tolist()
        boundaries = [boundaries[i] for i in sorted(set(picks))]
    candidates = [0] + boundaries
    sq = {}
    for i, k in enumerate(candidates):
        say(f"guard: scoring {i + 1}/{len(candidates)} (fitted steps < {k})")
        sq[k] = sample_errors(sample(mixed_program(base, fitted, k), denoiser, noise, labels), ref) ** 2
    errors = {k: float(v.mean().sqrt()) for k, v in sq.items()}
    verdicts = {k: judge(sq[k], sq[0], options.guard_level) for k in candidates}
    accepted = [k for k in candidates if verdicts[k].eligible]
    best = min(accepted, key=lambda k: (errors[k], -k))
    full = candidates[-1]
    if full == 0:  # no step has a basis term at this NFE: the "fit" is the base solver itself
        decision = "base: nothing to fit at this NFE"
    else:
        decision = "fitted" if best == full else ("base" if best == 0 else f"fitted steps < {best}, base after")
    guard = {
        "holdout": int(len(noise)),
        "reference_steps": options.reference_steps,
        "rmse_base": errors[0],
        "rmse_fitted": errors[full],
        "rmse_chosen": errors[best],
        "fitted_prefix": best,
        "decision": decision,
        "rule": rule_text(options.guard_level, TOLERANCE, "rmse_base") + "; the lowest held-out rmse ships",
        "level": options.guard_level,
        "candidates": {str(k): v for k, v in errors.items()},
        "ratio_upper": {str(k): verdicts[k].upper for k in candidates},
        "mean_gain": [str(k) for k in candidates if verdicts[k].mean_gain],
        "significant": [str(k) for k in accepted],
    }
    return mixed_program(base, fitted, best), guard
