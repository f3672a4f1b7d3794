"""The loop users would otherwise write: Python (numpy) driving `denoiser.onnx` one call at a time.

`DenoiserLoop` runs the artifact's `program.json` (the same ops, sigmas and coefficients the one graph was
emitted from) around a session of the once-exported denoiser: each `denoise` op is one `session.run`, each
`combine` op a numpy linear combination in float32. It is iia-bench's honest baseline (the pattern of
diffusers' ONNX pipelines, ONNX Runtime's Stable Diffusion tools and TensorRT's demo) and an executable
cross-check of the graph: the same noise and labels give the graph's `images` up to float32 rounding order.

Made a fair opponent on purpose: values are freed after their last read, combinations write into preallocated
buffers (one multiply and one add per term: numpy makes one temporary per product), sigma vectors are made once
per batch size, and the denoiser session gets the same backend, threads and session options as the sampler.
"""

from __future__ import annotations

import numpy as np

from .contract import DENOISED, DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, NOISE


def last_reads(ops: list[dict], output: str) -> dict[str, int]:
    """name -> index of the last op that reads it (the output: len(ops), never freed)."""
    last: dict[str, int] = {}
    for k, op in enumerate(ops):
        names = [op["state"]] if op["op"] == "denoise" else [name for name, _ in op["terms"]]
        for name in names:
            last[name] = k
    last[output] = len(ops)
    return last


class DenoiserLoop:
    """`loop(noise, labels)` -> float32 [B, *sample_shape]: the program plan run op by op in Python.

    session: any object with `run(feeds, outputs) -> [array]` for denoiser.onnx (x [B, ...] float32,
    sigma [B] float32, class_labels [B] int64 for conditional models) -> denoised [B, ...] float32.
    plan: a checked program.json document (contract.read_program).
    """

    def __init__(self, session, plan: dict, conditional: bool):
        self.session, self.plan, self.conditional = session, plan, conditional
        self.ops = plan["ops"]
        self.output = plan["output"]
        self.last = last_reads(self.ops, self.output)
        self._sigmas: dict[tuple[int, float], np.ndarray] = {}
        # float32 weights, as the graph bakes them
        self._weights = [None if op["op"] == "denoise" else [np.float32(w) for _, w in op["terms"]] for op in self.ops]

    def _sigma(self, batch: int, sigma: float) -> np.ndarray:
        key = (batch, sigma)
        if key not in self._sigmas:
            self._sigmas[key] = np.full(batch, sigma, dtype=np.float32)
        return self._sigmas[key]

    def __call__(self, noise: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        if self.conditional != (labels is not None):
            raise ValueError("class labels must be given exactly when the model is conditional")
        noise = np.ascontiguousarray(noise, dtype=np.float32)
        batch = noise.shape[0]
        values: dict[str, np.ndarray] = {NOISE: noise}
        spare: list[np.ndarray] = []  # freed buffers, reused by later combinations
        for k, op in enumerate(self.ops):
            if op["op"] == "denoise":
                feeds = {DENOISER_X: values[op["state"]], DENOISER_SIGMA: self._sigma(batch, op["sigma"])}
                if labels is not None:
                    feeds[DENOISER_LABELS] = labels
                values[op["out"]] = self.session.run(feeds, [DENOISED])[0]
            else:
                terms, weights = op["terms"], self._weights[k]
                out = spare.pop() if spare else np.empty_like(noise)
                np.multiply(values[terms[0][0]], weights[0], out=out)
                for (name, _), w in zip(terms[1:], weights[1:]):
                    out += values[name] * w if w != 1 else values[name]
                values[op["out"]] = out
            for name in _reads(op):
                if self.last.get(name) == k and name in values:
                    freed = values.pop(name)
                    if name != NOISE and freed.flags.writeable and freed.flags.owndata:
                        spare.append(freed)
        return values[self.output]


def _reads(op: dict) -> list[str]:
    return [op["state"]] if op["op"] == "denoise" else [name for name, _ in op["terms"]]


__all__ = ["DenoiserLoop", "last_reads"]
