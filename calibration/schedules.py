"""Noise schedules: pure functions returning float64 sigmas that end in 0; `schedule_for` picks a model's, and
`program_for` builds a solver's base program on it."""

from __future__ import annotations

import math
from typing import Callable

import torch

from iia.models.base import Denoiser

from .solvers import Program, build_program, get_solver


def karras_sigmas(
    n_steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """EDM's schedule: n_steps sigmas from sigma_max to sigma_min spaced in sigma^(1/rho), then 0.

    Rounded through the model's `round_sigma` (identity for most models) as EDM's sampler does.
    """
    if n_steps < 2:
        raise ValueError(f"the Karras schedule needs at least 2 steps, got {n_steps}")
    i = torch.arange(n_steps, dtype=torch.float64)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + i / (n_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    if round_sigma is not None:
        sigmas = torch.as_tensor(round_sigma(sigmas), dtype=torch.float64)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def fine_grid(sigma_from: float, sigma_to: float, substeps: int) -> torch.Tensor:
    """Uniform-in-t sub-grid of one step (t = sigma): the camera-ready's fine-grained timesteps."""
    m = torch.arange(substeps + 1, dtype=torch.float64) / substeps
    return sigma_from + (sigma_to - sigma_from) * m


def exponential_sigmas(n_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n_steps sigmas uniform in log-sigma from sigma_max to sigma_min, then 0 (k-diffusion's / diffusers'
    EDM "exponential" schedule; the geometric sigmas of the VE score-SDE sampler)."""
    if n_steps < 2:
        raise ValueError(f"the exponential schedule needs at least 2 steps, got {n_steps}")
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n_steps, dtype=torch.float64).exp()
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def timestep_selection(T: int, n_steps: int, kind: str = "uniform", steps_offset: int = 0) -> list[int]:
    """Training timesteps a discrete sampler visits, ascending (pure integers, no model needed).

    uniform: 0, skip, 2 skip, ... with skip = T // n (the DDIM paper's code);
    quadratic: floor(linspace(0, sqrt(0.8 T), n)^2) (the DDIM paper's code);
    leading / trailing / linspace: diffusers' `timestep_spacing` as its DDIM/DDPM/PNDM `set_timesteps` computes it
    (Lin et al. 2023, Table 2): leading = arange(n) * (T // n) + steps_offset; trailing = round(arange(T, 0, -T / n)) - 1;
    linspace = round(linspace(0, T - 1, n)).
    """
    import numpy as np

    if not 2 <= n_steps <= T:
        raise ValueError(f"the {kind} schedule needs 2 <= steps <= {T}, got {n_steps}")
    if kind == "uniform":
        steps = np.arange(0, T, T // n_steps)[:n_steps]
    elif kind == "quadratic":
        steps = (np.linspace(0, (0.8 * T) ** 0.5, n_steps) ** 2).astype(np.int64)
    elif kind == "leading":
        steps = (np.arange(0, n_steps) * (T // n_steps)).round().astype(np.int64) + steps_offset
    elif kind == "trailing":
        steps = np.round(np.arange(T, 0, -T / n_steps)).astype(np.int64)[::-1] - 1
    elif kind == "linspace":
        steps = np.linspace(0, T - 1, n_steps).round().astype(np.int64)
    else:
        raise ValueError(f"unknown discrete schedule {kind!r}: one of {', '.join(DISCRETE_SCHEDULES)}")
    steps = sorted(int(t) for t in steps)
    if len(set(steps)) != n_steps:
        raise ValueError(f"the {kind} schedule repeats a timestep at {n_steps} steps")
    if steps[0] < 0 or steps[-1] >= T:
        raise ValueError(f"the {kind} schedule (steps_offset {steps_offset}) selects timestep {steps[-1]} "
                         f"outside [0, {T - 1}] at {n_steps} steps")
    return steps


def discrete_sigmas(sigma_table: torch.Tensor, n_steps: int, kind: str = "uniform", steps_offset: int = 0) -> torch.Tensor:
    """A discrete model's sigmas at `timestep_selection(len(table), n_steps, kind, steps_offset)`.

    `sigma_table` holds sigma per training timestep, ascending. Sampling runs from the largest selected t down
    to the smallest, then to sigma = 0.
    """
    steps = timestep_selection(len(sigma_table), n_steps, kind, steps_offset)
    sigmas = torch.as_tensor(sigma_table, dtype=torch.float64)[torch.tensor(steps[::-1])]
    if len(set(sigmas.tolist())) != n_steps:
        raise ValueError(f"the {kind} schedule repeats a sigma at {n_steps} steps (a capped sigma_max)")
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


DISCRETE_SCHEDULES = ("uniform", "quadratic", "leading", "trailing", "linspace")
# "default": the model's own choice (Denoiser.default_schedule: karras, or a diffusers folder's spacing)
SCHEDULES = ("default", "karras", "exponential") + DISCRETE_SCHEDULES


# ---- a model's schedule and a solver's base program on it -------------------------------------------------
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
