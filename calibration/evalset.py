"""The one evaluation set: noises, labels, their reference solutions and the per-sample error of a sampler.

The IIA guard, the `auto` search, iia-accuracy and the peers benchmark all judge samplers END TO END: the
final samples against a high-accuracy reference solution from the same noise. `evaluation_set` draws the
noises by the artifact contract's convention and memoises the set per (model, n, seed, reference steps) in
this process; each set computes its reference once per start sigma (`reference_at`), since a sampler is
judged on the trajectory it starts on. `sample_errors` is the one error measure.
"""

from __future__ import annotations

from typing import Callable

import torch

from iia.models.base import Denoiser
from iia.runtime.contract import draw_labels, draw_noise as contract_noise

from .sampling import reference_solution, sample
from .solvers import Program


def draw_noise(denoiser: Denoiser, n: int, seed: int, labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise float64 [n, *shape] and class labels int64 [n] (None for unconditional models) for images
    seed .. seed + n - 1, by the artifact contract's convention (`iia.runtime.contract.draw_noise`/`draw_labels`),
    so the same seed gives the same noise here, in iia-sample and in the parity check. Labels given are
    repeated to n; else drawn per image. Both on `denoiser.device` (drawn on the CPU: the same values anywhere)."""
    device = denoiser.device
    noise = torch.from_numpy(contract_noise(seed, n, denoiser.shape)).to(device, torch.float64)
    if not denoiser.conditional:
        return noise, None
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        return noise, labels.repeat((n + labels.numel() - 1) // labels.numel())[:n].to(device)
    return noise, torch.from_numpy(draw_labels(seed, n, denoiser.label_dim)).to(device)


def sample_errors(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[n] float64: the RMSE over each sample's elements against its reference (the one error measure)."""
    return ((x.to(torch.float64) - reference.to(torch.float64)) ** 2).reshape(x.shape[0], -1).mean(1).sqrt()


def rmse(x: torch.Tensor, reference: torch.Tensor) -> float:
    """The RMSE of all elements, from `sample_errors` (every sample has as many elements)."""
    return float(sample_errors(x, reference).pow(2).mean().sqrt())


class EvalSet:
    """Noises (float64 [n, *shape]), labels (int64 [n] or None) and, per start sigma, their reference solution
    (`reference_steps` steps of `integrator`, Heun by default, on a Karras grid from start * noise; computed once
    each, or given by `set_reference`)."""

    def __init__(self, denoiser: Denoiser, noise: torch.Tensor, labels: torch.Tensor | None, reference_steps: int,
                 integrator: str = "heun"):
        self.denoiser, self.noise, self.labels, self.reference_steps = denoiser, noise, labels, reference_steps
        self.integrator = integrator
        self._references: dict[float, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.noise.shape[0]

    def reference_at(self, sigma_start: float | None = None,
                     on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """float64 [n, *shape]: the reference from sigma_start * noise (None: sigma_max); `on_step(done, total)`
        follows the integration when it runs."""
        start = float(self.denoiser.sigma_max if sigma_start is None else sigma_start)
        if start not in self._references:
            self._references[start] = reference_solution(self.denoiser, self.noise, self.labels, self.reference_steps,
                                                         sigma_start=start, on_step=on_step,
                                                         integrator=self.integrator)
        return self._references[start]

    def set_reference(self, sigma_start: float | None, reference: torch.Tensor) -> None:
        """Use `reference` (float64 [n, *shape], computed elsewhere as this set's would be) from sigma_start."""
        if reference.shape != self.noise.shape:
            raise ValueError(f"reference of shape {list(reference.shape)} for {list(self.noise.shape)} noises")
        self._references[float(self.denoiser.sigma_max if sigma_start is None else sigma_start)] = reference

    @property
    def reference(self) -> torch.Tensor:
        """The reference from sigma_max * noise, where Karras and learned schedules start."""
        return self.reference_at(None)

    def errors(self, program: Program, chunk: int = 256, dtype: torch.dtype = torch.float64,
               reference: torch.Tensor | None = None) -> torch.Tensor:
        """[n] float64 `sample_errors` of `program` run from these noises (states in `dtype`, `chunk` at a
        time) against `reference` (default: the reference from the program's own sigmas[0])."""
        ref = self.reference_at(program.sigmas[0]) if reference is None else reference
        out = []
        for s in range(0, len(self), chunk):
            part = slice(s, s + chunk)
            labels = None if self.labels is None else self.labels[part]
            x = sample(program, self.denoiser, self.noise[part], labels, dtype=dtype)
            out.append(sample_errors(x, ref[part]))
        return torch.cat(out)


_SETS: dict = {}  # (model, n, seed, steps, labels) -> EvalSet: one process judging several NFEs pays once


def evaluation_set(denoiser: Denoiser, n: int, seed: int, reference_steps: int, labels=None) -> EvalSet:
    """The memoised evaluation set of images seed..seed+n-1 (labels drawn per image unless given)."""
    key = (id(denoiser.net), str(denoiser.device), repr(sorted(denoiser.identity.items())), n, seed, reference_steps,
           None if labels is None else tuple(torch.as_tensor(labels).reshape(-1).tolist()))
    if key not in _SETS:
        if len(_SETS) >= 8:
            _SETS.clear()
        noise, lab = draw_noise(denoiser, n, seed, labels)
        _SETS[key] = EvalSet(denoiser, noise, lab, reference_steps)
    return _SETS[key]
