"""The PyTorch interpreter of a solver `Program`: plain reference sampling, and the engine of calibration."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from iia.models.base import Denoiser, DenoiserError

from .schedules import discrete_sigmas, karras_sigmas
from .solvers import Denoise, Op, Program, Terms, base_program_for_grid, build_program, get_solver


def combine(terms: Terms, values: dict[str, torch.Tensor]) -> torch.Tensor:
    out = None
    for name, weight in terms:
        out = values[name] * weight if out is None else out + values[name] * weight
    return out


def last_uses(ops: list[Op]) -> dict[str, int]:
    """Index of the op that reads each value last (so the interpreter can free history it no longer needs)."""
    last: dict[str, int] = {}
    for k, op in enumerate(ops):
        for name in ([op.state] if isinstance(op, Denoise) else [n for n, _ in op.terms]):
            last[name] = k
    return last


def run_ops(
    ops: list[Op],
    values: dict[str, torch.Tensor],
    denoiser: Denoiser,
    class_labels: torch.Tensor | None,
    keep: Iterable[str] = (),
    callback: Callable[[dict], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Execute ops in order on `values` (name -> tensor). Frees values no later op reads, except `keep`."""
    last = last_uses(ops)
    keep = set(keep)
    for k, op in enumerate(ops):
        if isinstance(op, Denoise):
            try:
                values[op.out] = denoiser(values[op.state], op.sigma, class_labels)
            except DenoiserError as err:
                raise DenoiserError(f"{op.out} (call on {op.state} at sigma={op.sigma:.6g}): {err}") from None
            if callback is not None:
                callback({"op": op, "denoised": values[op.out], "x": values[op.state]})
        else:
            values[op.out] = combine(op.terms, values)
        for name in list(values):
            if last.get(name, -1) <= k and name not in keep and last.get(name) is not None:
                del values[name]
    return values


def schedule_for(denoiser: Denoiser, n_steps: int, schedule: str = "karras", rho: float = 7.0) -> torch.Tensor:
    if schedule == "karras":
        return karras_sigmas(n_steps, denoiser.sigma_min, denoiser.sigma_max, rho, denoiser.round_sigma)
    if denoiser.sigma_table is None:
        raise ValueError(f"the {schedule!r} schedule selects training timesteps: it needs a discrete model "
                         f"(a diffusers DDPM); use 'karras' for this one")
    return discrete_sigmas(denoiser.sigma_table, n_steps, schedule)


def program_for(denoiser: Denoiser, solver: str, nfe: int, r: int = 1, schedule: str = "karras") -> Program:
    """The base program of `solver` at `nfe` on the model's schedule (Karras rho = 7 by default)."""
    spec = get_solver(solver)
    n_steps = spec.steps_for_nfe(nfe)
    sigmas = schedule_for(denoiser, n_steps, schedule)
    return build_program(solver, sigmas.tolist(), r)


def sample(
    program: Program,
    denoiser: Denoiser,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from standard-normal `noise`; states in float64 as EDM's generate.py does."""
    values = {"noise": noise.to(dtype)}
    ops = program.ops()
    run_ops(ops, values, denoiser, class_labels, keep=[program.output], callback=callback)
    return values[program.output]


def integrate(
    family: str, denoiser: Denoiser, z: torch.Tensor, sigmas, class_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Integrate the ODE from state `z` at sigmas[0] over `sigmas` with the family's base solver."""
    program = base_program_for_grid(family, [float(s) for s in sigmas])
    values = {"z0": z}
    ops = [op for step in program.steps for op in step.all_ops()]
    run_ops(ops, values, denoiser, class_labels, keep=[program.output])
    return values[program.output]


def reference_solution(
    denoiser: Denoiser,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    steps: int = 512,
    chunk: int = 256,
) -> torch.Tensor:
    """High-accuracy solution of the probability-flow ODE from the same noise: Heun on a fine Karras grid."""
    sigmas = karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max, 7.0, denoiser.round_sigma)
    outs = []
    for start in range(0, noise.shape[0], chunk):
        part = slice(start, start + chunk)
        z0 = noise[part].to(torch.float64) * sigmas[0]
        labels = None if class_labels is None else class_labels[part]
        outs.append(integrate("edm", denoiser, z0, sigmas, labels))
    return torch.cat(outs)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.to(torch.float64) - b.to(torch.float64)) ** 2)))
