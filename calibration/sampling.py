"""The PyTorch interpreter of a solver `Program`: plain reference sampling, and the engine of calibration."""

from __future__ import annotations

from typing import Callable

import torch

from iia.models.base import Denoiser, DenoiserError

from .schedules import DISCRETE_SCHEDULES, SCHEDULES, discrete_sigmas, exponential_sigmas, karras_sigmas
from .solvers import Denoise, Op, Program, Step, Terms, base_program_for_grid, build_program, get_solver


def combine(terms: Terms, values: dict[str, torch.Tensor]) -> torch.Tensor:
    out = None
    for name, weight in terms:
        out = values[name] * weight if out is None else out + values[name] * weight
    return out


def reads(op: Op) -> list[str]:
    return [op.state] if isinstance(op, Denoise) else [name for name, _ in op.terms]


def live_after(program: Program) -> list[set[str]]:
    """Per step k: the values steps after k read from before them (what the interpreter must keep)."""
    live: list[set[str]] = [set() for _ in program.steps]
    needed: set[str] = {program.output}
    for k in range(len(program.steps) - 1, -1, -1):
        live[k] = set(needed)
        step = program.steps[k]
        produced = {op.out for op in step.ops}
        # every basis term counts, also those whose base coefficient is 0 (a fitted one may read them)
        terms = [step.anchor, *(t for _, t in step.basis)]
        needed = (needed - {step.out}) | {n for t in terms for n, _ in t}
        needed = (needed - produced) | {n for op in step.ops for n in reads(op)}
    return live


def run_calls(step: Step, values: dict[str, torch.Tensor], denoiser: Denoiser,
              class_labels: torch.Tensor | None) -> None:
    """Execute a step's denoiser calls (and fixed combinations such as Heun's predictor) into `values`."""
    for op in step.ops:
        if isinstance(op, Denoise):
            try:
                values[op.out] = denoiser(values[op.state], op.sigma, class_labels)
            except DenoiserError as err:
                raise DenoiserError(f"{op.out} (call on {op.state} at sigma={op.sigma:.6g}): {err}") from None
        else:
            values[op.out] = combine(op.terms, values)


def finish_step(step: Step, values: dict[str, torch.Tensor], new_state: torch.Tensor, live: set[str]) -> None:
    """Store the step's new state and drop every value no later step reads."""
    values[step.out] = new_state
    for name in [n for n in values if n not in live and n != step.out]:
        del values[name]


def start(program: Program, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The interpreter's values before step 0: z0 = sigma_0 * noise."""
    return {program.prelude.out: combine(program.prelude.terms, {"noise": noise})}


def advance(program: Program, k: int, values: dict[str, torch.Tensor], denoiser: Denoiser,
            class_labels: torch.Tensor | None, live: list[set[str]]) -> None:
    """Execute step k of `program` on `values` (the step-at-a-time executor the fitter reuses)."""
    step = program.steps[k]
    run_calls(step, values, denoiser, class_labels)
    finish_step(step, values, combine(step.update().terms, values), live[k])


def run_program(program: Program, values: dict[str, torch.Tensor], denoiser: Denoiser,
                class_labels: torch.Tensor | None, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Execute every step on `values`; `on_step(k + 1, n_steps)` after each (progress of long integrations)."""
    live = live_after(program)
    for k in range(len(program.steps)):
        advance(program, k, values, denoiser, class_labels, live)
        if on_step is not None:
            on_step(k + 1, len(program.steps))
    return values[program.output]


def schedule_for(denoiser: Denoiser, n_steps: int, schedule: str = "default", rho: float | None = None) -> torch.Tensor:
    """The model's sigmas for `schedule` ("default": the model's own choice, `Denoiser.default_schedule`)."""
    if schedule == "default":
        schedule = denoiser.default_schedule
    if schedule == "karras":
        return karras_sigmas(n_steps, denoiser.sigma_min, denoiser.sigma_max, rho or denoiser.rho,
                             denoiser.round_sigma)
    if schedule == "exponential":
        return exponential_sigmas(n_steps, denoiser.sigma_min, denoiser.sigma_max)
    if schedule not in DISCRETE_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    if denoiser.sigma_table is None:
        raise ValueError(f"the {schedule!r} schedule selects training timesteps: it needs a discrete model "
                         f"(a diffusers beta-table folder); use 'karras' for this one")
    return discrete_sigmas(denoiser.sigma_table, n_steps, schedule, denoiser.steps_offset)


FINAL_STEPS = ("zero", "sigma_min")


def program_for(denoiser: Denoiser, solver: str, nfe: int, r: int = 1, schedule: str = "default",
                final: str = "zero") -> Program:
    """The base program of `solver` at `nfe` on the model's schedule (its own default: Karras rho = 7 for most).

    final: "zero" spends the last call denoising to sigma = 0; "sigma_min" (one-call-per-step solvers) puts
    all NFE calls on a grid one point finer that stops at sigma_min, returning the state there.
    """
    spec = get_solver(solver)
    n_steps = spec.steps_for_nfe(nfe)
    if final == "sigma_min":
        if spec.nfe_rule != "one":
            raise ValueError(f"final step 'sigma_min' needs a one-call-per-step solver, not '{solver}'")
        sigmas = schedule_for(denoiser, n_steps + 1, schedule)[:-1]
    elif final == "zero":
        sigmas = schedule_for(denoiser, n_steps, schedule)
    else:
        raise ValueError(f"final step must be one of {', '.join(FINAL_STEPS)}, got {final!r}")
    return build_program(solver, sigmas.tolist(), r)


def sample(
    program: Program,
    denoiser: Denoiser,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Run the sampler from standard-normal `noise` [B, *shape]; states in `dtype` (float64 by default, as
    EDM's generate.py steps). Returns [B, *shape] in `dtype`."""
    return run_program(program, start(program, noise.to(dtype)), denoiser, class_labels)


def integrate(
    family: str, denoiser: Denoiser, z: torch.Tensor, sigmas, class_labels: torch.Tensor | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate the ODE from state `z` at sigmas[0] over `sigmas` with the family's base solver."""
    program = base_program_for_grid(family, [float(s) for s in sigmas])
    return run_program(program, {program.steps[0].state: z}, denoiser, class_labels, on_step)


def reference_solution(
    denoiser: Denoiser,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    steps: int = 512,
    chunk: int = 256,
    sigma_start: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """High-accuracy solution of the probability-flow ODE from the same noise: Heun on a fine Karras grid.

    Starts where the sampler it judges starts, z0 = sigma_start * noise (`sigma_start` = that program's
    sigmas[0]; default sigma_max): DDIM's uniform/quadratic and diffusers' leading timesteps begin below
    sigma_max, and a reference from sigma_max * noise is another trajectory. Returns float64 [B, *shape].
    """
    top = denoiser.sigma_max if sigma_start is None else float(sigma_start)
    sigmas = karras_sigmas(steps, denoiser.sigma_min, top, 7.0, denoiser.round_sigma)
    outs = []
    n_chunks = -(-noise.shape[0] // chunk)
    for start in range(0, noise.shape[0], chunk):
        part = slice(start, start + chunk)
        z0 = noise[part].to(torch.float64) * sigmas[0]
        labels = None if class_labels is None else class_labels[part]
        tick = None if on_step is None else (lambda k, n, i=start // chunk: on_step(i * n + k, n_chunks * n))
        outs.append(integrate("edm", denoiser, z0, sigmas, labels, tick))
    return torch.cat(outs)


def references_by_start(denoiser: Denoiser, noise: torch.Tensor, class_labels: torch.Tensor | None,
                        steps: int) -> Callable[[float | None], torch.Tensor]:
    """`at(sigma_start)`: reference_solution of `noise` from sigma_start * noise (None: sigma_max), each start
    computed once: evaluations judge samplers that start at different sigmas[0] on the same noise."""
    cache: dict[float, torch.Tensor] = {}

    def at(sigma_start: float | None = None) -> torch.Tensor:
        start = float(denoiser.sigma_max if sigma_start is None else sigma_start)
        if start not in cache:
            cache[start] = reference_solution(denoiser, noise, class_labels, steps, sigma_start=start)
        return cache[start]

    return at


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.to(torch.float64) - b.to(torch.float64)) ** 2)))
