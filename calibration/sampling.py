"""The PyTorch side of the one executor (`iia.runtime.program.execute`): torch array operations, plain
sampling, ODE integration on a grid and the high-accuracy reference solution."""

from __future__ import annotations

from typing import Callable

import torch

from iia.models.base import DenoiserError
from iia.runtime.program import Denoise, Plan, Terms, execute

from .schedules import karras_sigmas
from .solvers import Program, base_program_for_grid, build_program

# Reference integrators: Heun (EDM's 2nd-order sampler, 2 calls per step) or a one-call-per-step multistep
# family on the same fine grid. Measured against Heun at 1024 steps on 8 noises: UniPC-3 at 64 steps (64 calls)
# is 5x more accurate than Heun at 128 steps (255 calls) on digits, and 2x less on gmm (whose error falls slower
# on every integrator); the search measures what each model needs (`iia.calibration.references`).
REFERENCE_INTEGRATORS = ("heun", "unipc-3", "ipndm")


def reference_calls(integrator: str, steps: int) -> int:
    """Denoiser calls per noise of a reference of `steps` steps (Heun: 2 per step, 1 for the last)."""
    return 2 * steps - 1 if integrator == "heun" else steps


def combine(terms: Terms, values: dict[str, torch.Tensor]) -> torch.Tensor:
    out = None
    for name, weight in terms:
        out = values[name] * weight if out is None else out + values[name] * weight
    return out


class TorchArrays:
    """`iia.runtime.program.Arrays` over torch tensors (any dtype; coefficients may be tensors with gradients)."""

    def call(self, denoise: Callable, op: Denoise, x: torch.Tensor, labels) -> torch.Tensor:
        try:
            return denoise(x, op.sigma, labels)
        except DenoiserError as err:  # chained: IIA_DEBUG=1 shows the model's own frames
            if err.sigma is not None:  # the model's failure, said where it happened
                raise
            raise DenoiserError(f"the denoiser call at sigma={op.sigma:.6g}: {err}", sigma=op.sigma) from err

    def combine(self, terms: Terms, values: dict) -> torch.Tensor:
        return combine(terms, values)

    def mix(self, anchor: torch.Tensor, basis: list, coefficients) -> torch.Tensor:
        out = anchor
        for c, b in zip(coefficients, basis):
            out = out + c * b
        return out

    def release(self, name: str, value) -> None:
        pass


TORCH = TorchArrays()


def sample(
    program: Program,
    denoiser: Callable,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Run the sampler from standard-normal `noise` [B, *shape]; states in `dtype` (float64 by default, as
    EDM's generate.py steps). Returns [B, *shape] in `dtype`."""
    return execute(program.plan(), denoiser, noise.to(dtype), class_labels, arrays=TORCH)


def integrate(
    family: str, denoiser: Callable, z: torch.Tensor, sigmas, class_labels: torch.Tensor | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate the ODE from state `z` at sigmas[0] over `sigmas` with the family's base solver;
    `on_step(k + 1, n_steps)` after each step (progress of long integrations)."""
    return _run_from(base_program_for_grid(family, [float(s) for s in sigmas]), denoiser, z, class_labels, on_step)


def _run_from(program: Program, denoiser: Callable, z: torch.Tensor, class_labels, on_step) -> torch.Tensor:
    """`program` run from state `z` at its sigmas[0] (no prelude), `on_step(k + 1, n_steps)` after each step."""
    plan = program.plan()
    from_state = Plan(plan.ops[1:], plan.output, program.steps[0].state)  # no prelude: z is the first state
    n = len(program.steps)
    tick = None if on_step is None else (lambda k, view: on_step(k + 1, n))
    return execute(from_state, denoiser, z, class_labels, on_step=tick, arrays=TORCH)


def reference_solution(
    denoiser: Callable,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    steps: int = 512,
    chunk: int = 256,
    sigma_start: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
    integrator: str = "heun",
) -> torch.Tensor:
    """High-accuracy solution of the probability-flow ODE from the same noise: `integrator` (Heun, or a
    multistep family of REFERENCE_INTEGRATORS) on a fine Karras grid of `steps` steps.

    Starts where the sampler it judges starts, z0 = sigma_start * noise (`sigma_start` = that program's
    sigmas[0]; default sigma_max): DDIM's uniform/quadratic and diffusers' leading timesteps begin below
    sigma_max, and a reference from sigma_max * noise is another trajectory. Returns float64 [B, *shape].
    """
    if integrator not in REFERENCE_INTEGRATORS:
        raise ValueError(f"reference integrator must be one of {REFERENCE_INTEGRATORS}, got {integrator!r}")
    top = denoiser.sigma_max if sigma_start is None else float(sigma_start)
    sigmas = karras_sigmas(steps, denoiser.sigma_min, top, 7.0, denoiser.round_sigma)
    outs = []
    n_chunks = -(-noise.shape[0] // chunk)
    for start in range(0, noise.shape[0], chunk):
        part = slice(start, start + chunk)
        z0 = noise[part].to(torch.float64) * sigmas[0]
        labels = None if class_labels is None else class_labels[part]
        tick = None if on_step is None else (lambda k, n, i=start // chunk: on_step(i * n + k, n_chunks * n))
        if integrator == "heun":
            outs.append(integrate("edm", denoiser, z0, sigmas, labels, tick))
        else:
            # a discrete model's round_sigma repeats sigmas on a fine grid: a zero-length step is the identity, and
            # a multistep method's step ratios need distinct sigmas
            grid = [s for k, s in enumerate(sigmas.tolist()) if k == 0 or s != sigmas[k - 1]]
            outs.append(_run_from(build_program(integrator, grid), denoiser, z0, labels, tick))
    return torch.cat(outs)
