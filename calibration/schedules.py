"""Noise schedules: pure functions returning float64 sigmas that end in 0."""

from __future__ import annotations

from typing import Callable

import torch


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


def discrete_sigmas(sigma_table: torch.Tensor, n_steps: int, kind: str = "uniform") -> torch.Tensor:
    """DDIM's time-step selections on a discrete model's table (sigma per training timestep, ascending).

    uniform: t = 0, skip, 2 skip, ... with skip = T // S; quadratic: t = floor(linspace(0, sqrt(0.8 T), S)^2)
    (the DDIM paper's code). Sampling runs from the largest selected t down to t = 0, then to sigma = 0.
    """
    T = len(sigma_table)
    if not 2 <= n_steps <= T:
        raise ValueError(f"the {kind} schedule needs 2 <= steps <= {T}, got {n_steps}")
    if kind == "uniform":
        steps = torch.arange(0, T, T // n_steps)[:n_steps]
    elif kind == "quadratic":
        steps = (torch.linspace(0, (0.8 * T) ** 0.5, n_steps, dtype=torch.float64) ** 2).long()
    else:
        raise ValueError(f"unknown discrete schedule {kind!r}: uniform or quadratic")
    if len(set(steps.tolist())) != n_steps:
        raise ValueError(f"the {kind} schedule repeats a timestep at {n_steps} steps")
    sigmas = torch.as_tensor(sigma_table, dtype=torch.float64)[steps.flip(0)]
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


SCHEDULES = ("karras", "uniform", "quadratic")
