"""What `iia-bench` times side by side, each behind one interface (after Polygraphy's runners).

A runner has a `name` (its timing column), `why_not` (None while it runs; else why it is skipped: the table's
note), `setup(batch)` (untimed, once per batch size: sessions fixed to the batch, a check of its output against
the graph's), `run(batch)` (the one call that is timed; returns its outputs) and `close()`. `setup` raises
`Unavailable` when the runner cannot run after all (the bench skips it from then on, saying why) and ValueError
when it computes something else than the graph (no baseline then: the bench stops).

* `GraphRunner` "sampler": the compiled sampler, `sampler(noise, class_labels=labels, guidance=scales)`;
* `DenoiserRunner` "denoiser": ONE call of denoiser.onnx (sigma = SIGMA, the same labels) on the sampler's backend,
  threads and session options; a batch the graph runs on a static-batch session gets a session fixed to that batch
  too, as a latency-minded user would give it (the comparison must not favour the graph); a guidance-range
  artifact's denoiser.onnx (the guided denoiser, both networks) takes the batch's scales too;
* `DecoderRunner` "decoder": one call of decoder.onnx (artifacts that decode: the VAE decoder of a latent model);
* `LoopRunner` "loop": the loop users would otherwise write (`iia.runtime.loop.DenoiserLoop`): numpy driving the
  denoiser runner's session one call at a time through the artifact's program.json (same solver, sigmas and
  coefficients), then one decoder call when the graph decodes; checked against the graph before it is timed;
* `EagerRunner` "eager": the PyTorch loop of `iia.evaluation.eager` (same solver and coefficients, then the model's
  decode stage when the artifact decodes).

torch-free at import: the eager runner imports torch when it is built (and is skipped, saying so, without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iia.runtime.contract import (DECODER_ONNX, DECODER_SAMPLES, DENOISED, DENOISER_LABELS, DENOISER_ONNX,
                                  DENOISER_SIGMA, DENOISER_X, GUIDANCE, IMAGES_U8, ArtifactError, read_verified)
from iia.runtime.program import read_program
from iia.runtime.loop import DenoiserLoop
from iia.runtime.contract import ORT_CUDA
from iia.runtime.onnx_backend import OrtSession
from iia.runtime.sampler import BackendUnavailable, Sampler
from iia.runtime.trt_backend import TENSORRT

SIGMA = 1.0  # the noise level of the one timed denoiser call
LOOP_TOLERANCE = 1e-3  # loop vs graph, relative to the output's scale: float32 summation-order noise is ~1e-5


class Unavailable(RuntimeError):
    """A runner cannot run here (torch missing, a model it may not rebuild...); the message says why."""


@dataclass(frozen=True)
class Batch:
    """One batch size's inputs: noise float32 [B, *sample_shape], labels int64 [B] (None: unconditional),
    guidance float32 [B] (None: an artifact compiled for one scale)."""

    noise: np.ndarray
    labels: np.ndarray | None
    guidance: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.noise.shape[0])


class Runner:
    """One timed thing; see the module docstring. `title` names it in "... skipped" messages."""

    name = ""
    title = ""
    why_not: str | None = None

    def setup(self, batch: Batch) -> None:
        """Untimed preparation for `batch` (Unavailable: skip from now on; ValueError: not a baseline)."""

    def run(self, batch: Batch):
        """The one timed call; returns its outputs (host arrays)."""
        raise NotImplementedError

    def close(self) -> None:
        """Give back what the runner changed or holds."""


class Skipped(Runner):
    """A runner that cannot run here; `why_not` says why."""

    def __init__(self, name: str, why_not: str):
        self.name, self.why_not = name, why_not


def device_of(sampler: Sampler) -> str:
    """"cuda" for the GPU backends (TensorRT, ONNX Runtime CUDA), else "cpu"."""
    return "cuda" if sampler.backend in (TENSORRT, ORT_CUDA) else "cpu"


class GraphRunner(Runner):
    """The compiled sampler: float32 samples [B, *sample_shape] (host arrays: every call is synchronised)."""

    name, title = "sampler", "sampler"

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def run(self, batch: Batch) -> np.ndarray:
        return self.sampler(batch.noise, class_labels=batch.labels, guidance=batch.guidance)

    def close(self) -> None:
        self.sampler.close()


def _session(sampler: Sampler, name: str, threads: int, spin: bool, trt_inputs=None):
    """A `run(feeds, outputs)` object for the artifact's `name` (denoiser.onnx, decoder.onnx) on the sampler's
    backend (ArtifactError if its sha256 does not match the manifest)."""
    root, manifest = Path(sampler.root), sampler.manifest
    model = read_verified(root, manifest, name)
    if sampler.backend == TENSORRT:
        return _trt_engine(root, sampler, model, name, trt_inputs)
    return OrtSession(model, device_of(sampler), threads, spin=spin)


def _trt_engine(root: Path, sampler: Sampler, model: bytes, name: str, inputs=None):
    """The artifact ships no plan for one call (denoiser, or decoder with `inputs`): build one here with the
    sampler's profile, precision and fp32 layers, through the same builder as the compiler's sampler.plan."""
    from iia.runtime.engine import EnginePlan, build_engine, denoiser_inputs, fp32_layer_names
    from iia.runtime.trt_backend import TrtEngine

    top = sampler.max_batch
    precision = (sampler.manifest.get("engine") or {}).get("precision", "fp32")
    path = str(root / name)
    inputs = inputs if inputs is not None else denoiser_inputs(sampler.sample_shape, sampler.conditional, sampler.guided)
    plan = EnginePlan(inputs, precision=precision,
                      opt_batch=min(8, top), max_batch=top,
                      fp32_layers=fp32_layer_names(path) if precision != "fp32" else [])
    data, _ = build_engine(path, plan)
    return TrtEngine(data, top)


class DenoiserRunner(Runner):
    """One denoiser.onnx call: denoised float32 [B, *sample_shape]. `session` is the one that runs this batch."""

    name, title = "denoiser", "denoiser timing"

    def __init__(self, sampler: Sampler, threads: int, spin: bool):
        if DENOISER_ONNX not in sampler.manifest["files"]:
            raise BackendUnavailable(f"the artifact has no {DENOISER_ONNX}: compile with --with-denoiser for the "
                                     f"one-call and numpy-loop baselines")
        self.sampler, self.threads, self.spin = sampler, threads, spin
        self.dynamic = self.session = _session(sampler, DENOISER_ONNX, threads, spin)
        self.static = set(getattr(sampler, "static_batches", ())) if sampler.backend != TENSORRT else set()
        self._model = read_verified(Path(sampler.root), sampler.manifest, DENOISER_ONNX) if self.static else None
        self.feeds: dict[str, np.ndarray] = {}

    def setup(self, batch: Batch) -> None:
        self.session = self.dynamic
        if batch.size in self.static:
            self.session = OrtSession(self._model, device_of(self.sampler), self.threads, static_batch=batch.size,
                                      spin=self.spin)
        self.feeds = {DENOISER_X: batch.noise * np.float32(SIGMA),
                      DENOISER_SIGMA: np.full(batch.size, SIGMA, dtype=np.float32)}
        if batch.labels is not None:
            self.feeds[DENOISER_LABELS] = batch.labels
        if GUIDANCE in getattr(self.session, "input_names", ()):  # a guidance range's denoiser: one scale per image
            self.feeds[GUIDANCE] = batch.guidance

    def run(self, batch: Batch) -> list[np.ndarray]:
        return self.session.run(self.feeds, [DENOISED])


class DecoderRunner(Runner):
    """One decoder.onnx call on a batch of samples (the noise stands in for them): uint8 images [B, H, W, C]."""

    name, title = "decoder", "decoder timing"

    def __init__(self, sampler: Sampler, threads: int, spin: bool):
        self.session = _session(sampler, DECODER_ONNX, threads, spin, {DECODER_SAMPLES: tuple(sampler.sample_shape)})

    def decode(self, samples: np.ndarray) -> list[np.ndarray]:
        return self.session.run({DECODER_SAMPLES: samples}, [IMAGES_U8])

    def run(self, batch: Batch) -> list[np.ndarray]:
        return self.decode(batch.noise)


def one_call_runners(sampler: Sampler, threads: int, spin: bool, log) -> tuple[Runner, Runner]:
    """(denoiser, decoder) runners; both Skipped when a denoiser session cannot be had (the decoder's timing only
    serves the overhead ratio, which needs the denoiser's)."""
    try:
        denoiser = DenoiserRunner(sampler, threads, spin)
        if DECODER_ONNX not in sampler.manifest["files"]:
            return denoiser, Skipped("decoder", f"the artifact has no {DECODER_ONNX}")
        return denoiser, DecoderRunner(sampler, threads, spin)
    except BackendUnavailable as err:
        log(f"denoiser timing skipped: {err}")
        return Skipped("denoiser", str(err)), Skipped("decoder", str(err))


class LoopRunner(Runner):
    """`DenoiserLoop` on the denoiser runner's session (set up before this one), then one decoder call when the
    artifact decodes: what a user's loop around the same files computes."""

    name, title = "loop", "loop baseline"

    def __init__(self, graph: GraphRunner, denoiser: DenoiserRunner, decoder: Runner):
        self.graph, self.denoiser = graph, denoiser
        self.decoder = decoder if isinstance(decoder, DecoderRunner) else None
        sampler = graph.sampler
        self.plan, self.conditional = read_program(Path(sampler.root), sampler.manifest), sampler.conditional
        self.dynamic = self.loop = DenoiserLoop(denoiser.dynamic, self.plan, self.conditional)
        self.diff: float | None = None  # max abs vs the graph's samples, this batch

    def setup(self, batch: Batch) -> None:
        session = self.denoiser.session
        self.loop = self.dynamic if session is self.denoiser.dynamic else DenoiserLoop(session, self.plan,
                                                                                       self.conditional)
        graph_out = self.graph.run(batch).astype(np.float64)
        looped = self.loop(batch.noise, batch.labels, batch.guidance).astype(np.float64)
        self.diff = float(np.abs(looped - graph_out).max())
        scale = max(1.0, float(np.abs(graph_out).max()))
        if not self.diff <= LOOP_TOLERANCE * scale:  # (NaN fails too) a loop computing something else is no baseline
            raise ValueError(f"the loop baseline (program.json) disagrees with the graph: max abs {self.diff:.3g} "
                             f"> {LOOP_TOLERANCE:g} x output scale {scale:.3g}; the artifact is inconsistent "
                             f"(recompile), or pass --no-loop")

    def run(self, batch: Batch):
        samples = self.loop(batch.noise, batch.labels, batch.guidance)
        return samples if self.decoder is None else self.decoder.decode(samples)


def loop_runner(graph: GraphRunner, denoiser: Runner, decoder: Runner, wanted: bool, log) -> Runner:
    """The loop baseline, or Skipped saying why (--no-loop, no denoiser session, no usable program.json)."""
    if not wanted:
        return Skipped("loop", "--no-loop")
    if not isinstance(denoiser, DenoiserRunner):
        return Skipped("loop", f"no denoiser session ({denoiser.why_not})")
    try:
        return LoopRunner(graph, denoiser, decoder)
    except ArtifactError as err:
        log(f"loop baseline skipped: {err}")
        return Skipped("loop", str(err))


class EagerRunner(Runner):
    """The PyTorch eager sampler (`EagerReference`), checked against the graph per batch; `diff` is the max abs
    difference of its samples from the graph's (float64)."""

    name, title = "eager", "eager reference"

    def __init__(self, graph: GraphRunner, reference):
        self.graph, self.reference = graph, reference
        self.diff: float | None = None

    def setup(self, batch: Batch) -> None:
        self.diff = None
        self.reference.check(batch.noise, batch.labels)
        samples = np.asarray(self.reference(batch.noise, batch.labels), dtype=np.float64)
        self.diff = float(np.abs(self.graph.run(batch).astype(np.float64) - samples).max())

    def run(self, batch: Batch) -> np.ndarray:
        return self.reference.decoded(batch.noise, batch.labels)  # what the graph computes: decoded if it decodes

    def close(self) -> None:
        self.reference.close()


def eager_runner(graph: GraphRunner, wanted: bool, model: str | None, dtype: str, threads: int, log) -> Runner:
    """The eager baseline, or Skipped saying why (--no-eager, no torch, a model it may not or cannot rebuild).
    ValueError (a --model that does not fit the artifact) propagates."""
    if not wanted:
        return Skipped("eager", "--no-eager")
    sampler = graph.sampler
    if sampler.guided:
        why = "a guidance-range artifact: the eager reference runs one scale's sampler, not per-image coefficients"
        log(f"eager reference skipped: {why}")
        return Skipped("eager", why)
    from .eager import EagerReference

    try:
        reference = EagerReference(Path(sampler.root), sampler.manifest, model, dtype, threads, device_of(sampler))
    except Unavailable as err:
        log(f"eager reference skipped: {err}")
        return Skipped("eager", str(err))
    return EagerRunner(graph, reference)
