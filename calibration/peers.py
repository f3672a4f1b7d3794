"""The samplers users pick instead, run with their OWN code (diffusers' schedulers) on our denoiser and grid.

Every peer calls the same `Denoiser` on the same sigmas (Karras rho = 7 over the model's sigma range, then 0)
and the same standard-normal noise as our samplers, so errors are comparable sample by sample.

Conventions (diffusers' VP form vs our x-space, EDM form x = x0 + sigma n):
  alpha = 1 / sqrt(1 + sigma^2), x_vp = alpha x; the scheduler's model output is epsilon = (x - D(x)) / sigma.
  The VP schedulers (DPM-Solver, UniPC, DEIS) start from x_vp = alpha_0 sigma_0 noise; the VE ones (Heun, LMS)
  from x = sigma_0 noise. We overwrite the scheduler's `sigmas` (and give it unique timesteps) after
  `set_timesteps`, which is all their `step` reads; Heun's grid interleaves the repeated inner sigmas it expects.

`diffusers` is an optional extra (`pip install iia[diffusers]`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from iia.models.base import Denoiser

# name -> (diffusers class, config overrides, kind): kind "vp" multistep, "heun" or "lms" (VE).
# diffusers' DEIS cannot step to sigma = 0 (its update is 0 * inf there; with Karras sigmas it repeats sigma_min
# and wastes its last call), so DEIS runs on the grid that stops at sigma_min: NFE steps over NFE + 1 sigmas.
PEERS: dict[str, tuple[str, dict, str]] = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}, "vp"),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"}, "vp"),
    "unipc-bh1": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh1"}, "vp"),
    "unipc-bh2": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, "vp"),
    "unipc-bh2-3": ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}, "vp"),
    "deis-2": ("DEISMultistepScheduler", {"solver_order": 2}, "vp"),
    "deis-3": ("DEISMultistepScheduler", {"solver_order": 3}, "vp"),
    "heun": ("HeunDiscreteScheduler", {}, "heun"),
    "lms": ("LMSDiscreteScheduler", {}, "lms"),
}
STOPS_AT_SIGMA_MIN = ("deis-2", "deis-3")
DEFAULT_PEERS = ("dpm++2m", "dpm++3m", "unipc-bh1", "unipc-bh2", "deis-2", "deis-3", "heun", "lms")


class PeerError(ValueError):
    pass


def peer_steps(name: str, nfe: int) -> int | None:
    """Grid steps N for `nfe` calls (None if the peer cannot spend exactly `nfe`): Heun 2N - 1, others N."""
    if PEERS[name][2] == "heun":
        return (nfe + 1) // 2 if nfe % 2 == 1 and nfe >= 3 else None
    return nfe if nfe >= 2 else None


def make_scheduler(name: str, sigmas: Sequence[float]):
    """A diffusers scheduler set to run exactly over `sigmas` (descending, ending in 0)."""
    try:
        import diffusers
    except ImportError:
        raise PeerError("the peers benchmark runs diffusers' schedulers: pip install 'iia[diffusers]'") from None
    if name not in PEERS:
        raise PeerError(f"unknown peer '{name}': choose from {', '.join(PEERS)}")
    cls_name, config, kind = PEERS[name]
    # VP schedulers take the denoised value itself ("sample"): reconstructing it from epsilon in their float32
    # arithmetic, (x_vp - sigma_t eps) / alpha_t, cancels catastrophically at sigma_max (alpha = 0.0125).
    prediction = "sample" if kind == "vp" else "epsilon"
    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, prediction_type=prediction, **config)
    s = torch.as_tensor(list(sigmas), dtype=torch.float64)
    n = len(s) - 1
    if kind == "heun":
        grid = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
    else:
        grid = s
    sched.set_timesteps(n)
    sched.sigmas = grid
    sched.timesteps = torch.arange(len(grid) - 1, 0, -1, dtype=torch.float64) if kind != "vp" else \
        torch.arange(len(grid) - 1, 0, -1, dtype=torch.int64)
    sched.num_inference_steps = n
    if hasattr(sched, "_step_index"):
        sched._step_index = None
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    return sched, kind


def run_peer(name: str, denoiser: Denoiser, sigmas: Sequence[float], noise: torch.Tensor,
             class_labels: torch.Tensor | None = None, callback: Callable[[float], None] | None = None) -> torch.Tensor:
    """Final samples (float64, x-space) of peer `name` over `sigmas` from standard-normal `noise`."""
    sched, kind = make_scheduler(name, sigmas)
    s0 = float(sigmas[0])
    if kind == "vp":
        sample = noise.to(torch.float64) * (s0 / (1 + s0 * s0) ** 0.5)
    else:
        sample = noise.to(torch.float64) * s0
    for k, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[k])
        x = sample * (1 + sigma * sigma) ** 0.5 if kind == "vp" else sample
        denoised = denoiser(x, sigma, class_labels).to(torch.float64)
        if callback is not None:
            callback(sigma)
        output = denoised if kind == "vp" else (x - denoised) / sigma
        sample = sched.step(output, t, sample).prev_sample.to(torch.float64)
    last = float(sched.sigmas[-1])
    return sample * (1 + last * last) ** 0.5 if kind == "vp" else sample
