"""The loop users would otherwise write: Python (numpy) driving `denoiser.onnx` one call at a time (an artifact
has that file when compiled with `iia-compile --with-denoiser`).

`DenoiserLoop` runs the artifact's `program.json` (the same ops, sigmas and coefficients the one graph was
emitted from) around a session of the once-exported denoiser: each `denoise` op is one `session.run`, each
`combine` op a numpy linear combination in float32. It is iia-bench's honest baseline (the pattern of
diffusers' ONNX pipelines, ONNX Runtime's Stable Diffusion tools and TensorRT's demo) and an executable
cross-check of the graph: the same noise and labels give the graph's `images` up to float32 rounding order.

A guidance-range artifact: its denoiser.onnx takes `guidance` [B] after its other inputs, so each call is fed the
images' scales; a plan with guidance nodes (program.json) gives a combine term one weight per node, and image b's
weight is the interpolant at its scale (`Plan.at`), as the graph's per-image coefficient rows.

Made a fair opponent on purpose: the one executor (`iia.runtime.program.execute` with `NumpyArrays`) frees
values after their last read and writes combinations into freed buffers (one multiply and one add per term: numpy
makes one temporary per product), sigma vectors are made once per batch size, and the denoiser session gets the
same backend, threads and session options as the sampler.
"""

from __future__ import annotations

import numpy as np

from .contract import DENOISED, DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, GUIDANCE
from .program import NumpyArrays, Plan, execute


class DenoiserLoop:
    """`loop(noise, labels, guidance)` -> float32 [B, *sample_shape]: the program plan run op by op in Python.

    session: any object with `run(feeds, outputs) -> [array]` for denoiser.onnx (x [B, ...] float32,
    sigma [B] float32, class_labels [B] int64 for conditional models, guidance [B] float32 when its
    `input_names` list it) -> denoised [B, ...] float32.
    plan: a checked program.json plan (`iia.runtime.program.read_program`), run by `program.execute`.
    guidance: float32 scales [B], checked against the artifact's range (Sampler.check_guidance); needed when the
    denoiser takes them or the plan has guidance nodes.
    """

    def __init__(self, session, plan: Plan, conditional: bool):
        self.session, self.plan, self.conditional = session, plan, conditional
        self._sigmas: dict[tuple[int, float], np.ndarray] = {}
        self.takes_guidance = GUIDANCE in getattr(session, "input_names", ())

    def _sigma(self, batch: int, sigma: float) -> np.ndarray:
        key = (batch, sigma)
        if key not in self._sigmas:
            self._sigmas[key] = np.full(batch, sigma, dtype=np.float32)
        return self._sigmas[key]

    def _denoise(self, x: np.ndarray, sigma: float, labels: np.ndarray | None, guidance=None) -> np.ndarray:
        feeds = {DENOISER_X: x, DENOISER_SIGMA: self._sigma(x.shape[0], sigma)}
        if labels is not None:
            feeds[DENOISER_LABELS] = labels
        if self.takes_guidance:
            feeds[GUIDANCE] = guidance
        return self.session.run(feeds, [DENOISED])[0]

    def __call__(self, noise: np.ndarray, labels: np.ndarray | None = None,
                 guidance: np.ndarray | None = None) -> np.ndarray:
        if self.conditional != (labels is not None):
            raise ValueError("class labels must be given exactly when the model is conditional")
        if (self.takes_guidance or self.plan.nodes) and guidance is None:
            raise ValueError("guidance must be given: this loop's denoiser or plan takes one scale per image")
        noise = np.ascontiguousarray(noise, dtype=np.float32)
        denoise = self._denoise if guidance is None else (
            lambda x, sigma, labels: self._denoise(x, sigma, labels, guidance))
        return execute(self.plan.at(guidance, noise.ndim) if self.plan.nodes else self.plan, denoise, noise, labels,
                       arrays=NumpyArrays())


__all__ = ["DenoiserLoop"]
