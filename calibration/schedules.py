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


SCHEDULES = {"karras": karras_sigmas}
