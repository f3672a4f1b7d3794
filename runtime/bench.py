"""`iia-bench`: latency of a compiled sampler, its overhead over NFE denoiser calls, and the PyTorch eager loop.

Per batch size, the sampler, ONE denoiser call (`denoiser.onnx`, sigma = 1, the same labels) and the eager
reference are timed in alternating rounds of a few calls each (see `time_interleaved`), so slow drifts of a
shared machine hit all three alike:

* p50/p90/p99 latency of `sampler(noise, class_labels=...)` (wall clock; ONNX Runtime and TensorRT return
  host arrays, so every call is synchronised), images/s = batch / mean latency;
* overhead ratio = sampler p50 / (NFE x denoiser p50 + decoder p50) on the same backend, batch and threads:
  1.0 is the floor of running the NFE denoiser calls (a guided denoiser.onnx holds both networks) and the one
  decode call (`decoder.onnx`, when the artifact decodes: the VAE decoder of a latent model) back to back.
  Each timed denoiser call also pays its own
  host<->device copies, so on a GPU this ratio errs low;
* loop: the loop users would otherwise write (`iia.runtime.loop.DenoiserLoop`): Python/numpy driving the SAME
  denoiser.onnx session one call at a time through the artifact's program.json (same solver, sigmas and
  coefficients); speed-up vs loop = loop p50 / sampler p50. Its output is checked against the sampler's
  (`loop_max_abs_diff`) before it is timed;
* eager: a baseline the CALLER passes in (`eager_factory`; `iia-bench` passes `iia.evaluation.eager`'s
  PyTorch loop with the same solver and coefficients, then the model's decode stage when the artifact
  decodes); speed-up = eager p50 / sampler p50.

torch-free like the rest of iia.runtime: the eager baseline is a callable, not an import.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from iia.cli import check_options, int_list, option

from .contract import (BACKENDS, DECODER_ONNX, DECODER_SAMPLES, DENOISED, DENOISER_LABELS, DENOISER_ONNX,
                       DENOISER_SIGMA, DENOISER_X, IMAGES_U8, MAX_BATCH, MAX_SEED, MAX_THREADS, ArtifactError,
                       draw_labels, draw_noise, read_program, read_verified)
from .loader import describe, load
from .loop import DenoiserLoop
from .onnx_backend import CUDA, OrtSession
from .sampler import BackendUnavailable, Sampler
from .trt_backend import TENSORRT

# "wall": elapsed time, what a caller waits (the default). "cpu": CPU seconds of this process (all its threads),
# for a SHARED machine where other jobs preempt long calls more often than short ones and so bias wall-clock
# ratios; with threads > 1 it measures work (spin-waiting included), not latency.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SIGMA = 1.0
LOOP_TOLERANCE = 1e-3  # loop vs graph, relative to the output's scale: float32 summation-order noise is ~1e-5
KEYS = ("backend", "batch", "threads", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "denoiser_p50_ms",
        "overhead_ratio", "loop_p50_ms", "speedup_vs_loop", "eager_p50_ms", "speedup_vs_eager")


class EagerUnavailable(RuntimeError):
    """The eager reference cannot run (model not rebuildable, torch without CUDA...); the message says why."""


class Eager(Protocol):
    """The eager baseline `run_bench` times beside the sampler: `eager(noise, labels)` -> float array
    [B, *sample_shape]; `check(noise, labels)` runs once (EagerUnavailable on failure); `close()` restores
    whatever it changed (e.g. torch's process-wide thread count). An optional `decoded(noise, labels)` (the
    samples, then the decode stage: what the graph computes) is what gets timed when present."""

    def __call__(self, noise: np.ndarray, labels: np.ndarray | None) -> np.ndarray: ...

    def check(self, noise: np.ndarray, labels: np.ndarray | None) -> None: ...

    def close(self) -> None: ...


# eager_factory(sampler, model_spec, dtype, threads, device) -> Eager (or raises EagerUnavailable)
EagerFactory = Callable[[Sampler, "str | None", str, int, str], Eager]


@dataclass
class RunOptions:
    """Options of every command that runs an artifact (iia-sample, iia-bench), declared once."""

    backend: str = option("auto", "auto: TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU, the first usable here",
                          choices=("auto", *BACKENDS))
    threads: int | None = option(None, "ONNX Runtime intra-op threads (default: the CPUs this process may use "
                                       "for iia-bench, ONNX Runtime's default for iia-sample)", lo=1, hi=MAX_THREADS)
    spin: bool = option(True, "idle ONNX Runtime threads sleep instead of spin-waiting (for a machine whose cores "
                              "are all busy, e.g. 2 threads on 2 shared cores: latency is otherwise bimodal)")


@dataclass
class BenchOptions(RunOptions):
    batches: tuple[int, ...] = option((1, 8, 32), "batch sizes, comma-separated", flag="--batch", parse=int_list,
                                      lo=1, hi=MAX_BATCH)
    warmup: int = option(5, "untimed calls first", lo=0, hi=10_000)
    iters: int = option(50, "timed calls per batch size", lo=1, hi=1_000_000)
    loop: bool = option(True, "skip the numpy loop around denoiser.onnx (the baseline users would otherwise run)")
    eager: bool = option(True, "skip the PyTorch eager reference")
    eager_dtype: str = option("float32", "state dtype of the eager loop (float32: what a service runs)",
                              choices=("float32", "float64"))
    model: str | None = option(None, "model file of the eager reference. Never read from the artifact: a model "
                                      "file (an EDM .pkl runs code when loaded) is loaded only when named here, "
                                      "and only after its sha256 matches the manifest's")
    seed: int = option(0, "noise seed", lo=0, hi=MAX_SEED)
    clock: str = option("wall", "wall: elapsed time; cpu: this process's CPU time, for a shared machine whose other "
                                "jobs preempt long calls (1 thread: latency; more: total work)", choices=tuple(CLOCKS))

    def validate(self) -> None:
        check_options(self)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _device(sampler: Sampler) -> str:
    return "cuda" if sampler.backend in (TENSORRT, CUDA) else "cpu"


# ---- the single denoiser call -------------------------------------------------------------------
def denoiser_runner(sampler: Sampler, threads: int, spin: bool = True):
    """A `run(feeds, outputs)` object for denoiser.onnx on the sampler's backend."""
    root, manifest = Path(sampler.root), sampler.manifest
    if DENOISER_ONNX not in manifest["files"]:
        raise BackendUnavailable(f"the artifact has no {DENOISER_ONNX}")
    model = read_verified(root, manifest, DENOISER_ONNX)
    if sampler.backend == TENSORRT:
        return _trt_denoiser(root, sampler, model)
    return OrtSession(model, _device(sampler), threads, spin=spin)


def decoder_runner(sampler: Sampler, threads: int, spin: bool = True):
    """A `run(feeds, outputs)` object for decoder.onnx on the sampler's backend; None when the artifact has none."""
    root, manifest = Path(sampler.root), sampler.manifest
    if DECODER_ONNX not in manifest["files"]:
        return None
    model = read_verified(root, manifest, DECODER_ONNX)
    if sampler.backend == TENSORRT:
        return _trt_denoiser(root, sampler, model, DECODER_ONNX, {DECODER_SAMPLES: tuple(sampler.sample_shape)})
    return OrtSession(model, _device(sampler), threads, spin=spin)


def _trt_denoiser(root: Path, sampler: Sampler, model: bytes, name: str = DENOISER_ONNX, inputs=None):
    """The artifact ships no plan for one call (denoiser, or decoder with `inputs`): build one here with the
    sampler's profile, precision and fp32 layers, through the same builder as the compiler's sampler.plan."""
    from .engine import EnginePlan, build_engine, denoiser_inputs, fp32_layer_names
    from .trt_backend import TrtEngine

    top = sampler.max_batch
    precision = (sampler.manifest.get("engine") or {}).get("precision", "fp32")
    path = str(root / name)
    inputs = inputs if inputs is not None else denoiser_inputs(sampler.sample_shape, sampler.conditional)
    plan = EnginePlan(inputs, precision=precision,
                      opt_batch=min(8, top), max_batch=top,
                      fp32_layers=fp32_layer_names(path) if precision != "fp32" else [])
    data, _ = build_engine(path, plan)
    return TrtEngine(data, top)


# ---- timing ---------------------------------------------------------------------------------------
def _ms(seconds: list[float]) -> np.ndarray:
    return np.asarray(seconds, dtype=np.float64) * 1e3


def _percentiles(times: np.ndarray) -> tuple[float, float, float]:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def time_interleaved(calls: dict, warmup: int, iters: int, block: int = 5,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call for each named thunk: rounds of `block` back-to-back calls of each, in rotating order,
    GC paused while timing. Alternating rounds spread slow drifts of a shared machine over all thunks alike;
    short blocks (rather than one call each) keep one library's idle spinning thread pool (ONNX Runtime's,
    OpenMP's) from landing on every single call of the other."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        done, rnd = 0, 0
        while done < iters:
            count = min(block, iters - done)
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                for _ in range(count):
                    start = clock()
                    calls[name]()
                    times[name].append(clock() - start)
            done, rnd = done + count, rnd + 1
    finally:
        if was_enabled:
            gc.enable()
    return times


def run_bench(artifact: str | Path, opts: BenchOptions, log=print, eager_factory: EagerFactory | None = None) -> list[dict]:
    """Rows of KEYS (and more) per batch size; `eager_factory` builds the eager baseline (None: not timed)."""
    opts.validate()
    threads = opts.threads or default_threads()
    sampler = load(artifact, opts.backend, threads=threads, spin=opts.spin)
    log(f"{sampler!r}: {describe(sampler)}")
    too_big = [b for b in opts.batches if b > sampler.max_batch]
    if too_big:
        raise ValueError(f"batch size(s) {too_big} exceed the artifact's maximum batch {sampler.max_batch}")
    device = _device(sampler)
    try:
        denoiser = denoiser_runner(sampler, threads, opts.spin)
        decoder = decoder_runner(sampler, threads, opts.spin)
        denoiser_note = None
    except BackendUnavailable as err:
        denoiser, decoder, denoiser_note = None, None, str(err)
        log(f"denoiser timing skipped: {err}")
    loop, loop_note = None, None
    if not opts.loop:
        loop_note = "--no-loop"
    elif denoiser is None:
        loop_note = f"no denoiser session ({denoiser_note})"
    else:
        try:
            loop = DenoiserLoop(denoiser, read_program(Path(sampler.root), sampler.manifest), sampler.conditional)
        except ArtifactError as err:
            loop_note = str(err)
            log(f"loop baseline skipped: {err}")

    eager, eager_note = None, None
    if not opts.eager or eager_factory is None:
        eager_note = "--no-eager" if not opts.eager else "no eager baseline given"
    else:
        try:
            eager = eager_factory(sampler, opts.model, opts.eager_dtype, threads, device)
        except EagerUnavailable as err:
            eager_note = str(err)
            log(f"eager reference skipped: {err}")

    # a batch the graph runs on a static-batch session: the loop's (and the one-call) denoiser session gets the
    # same fixed batch, as a latency-minded user would give it (the comparison must not favour the graph)
    static = set(getattr(sampler, "static_batches", ())) if denoiser is not None and sampler.backend != TENSORRT else set()
    dynamic_denoiser, dynamic_loop = denoiser, loop
    denoiser_model = read_verified(Path(sampler.root), sampler.manifest, DENOISER_ONNX) if static else None  # read once
    rows = []
    try:
        for batch in opts.batches:
            denoiser, loop = dynamic_denoiser, dynamic_loop
            if batch in static:
                denoiser = OrtSession(denoiser_model, device, threads, static_batch=batch, spin=opts.spin)
                if loop is not None:
                    loop = DenoiserLoop(denoiser, loop.plan, sampler.conditional)
            noise = draw_noise(opts.seed, batch, sampler.sample_shape)
            labels = draw_labels(opts.seed, batch, sampler.label_dim) if sampler.conditional else None
            feeds = {DENOISER_X: noise * np.float32(SIGMA), DENOISER_SIGMA: np.full(batch, SIGMA, dtype=np.float32)}
            if labels is not None:
                feeds[DENOISER_LABELS] = labels
            calls = {"sampler": lambda: sampler(noise, class_labels=labels)}
            if denoiser is not None:
                calls["denoiser"] = lambda: denoiser.run(feeds, [DENOISED])
            if decoder is not None:
                calls["decoder"] = lambda: decoder.run({DECODER_SAMPLES: noise}, [IMAGES_U8])
            loop_abs = None
            if loop is not None:
                graph_out = sampler(noise, class_labels=labels).astype(np.float64)
                loop_abs = float(np.abs(loop(noise, labels).astype(np.float64) - graph_out).max())
                scale = max(1.0, float(np.abs(graph_out).max()))
                if not loop_abs <= LOOP_TOLERANCE * scale:  # (NaN fails too) a loop computing something else is no baseline
                    raise ValueError(f"the loop baseline (program.json) disagrees with the graph: max abs {loop_abs:.3g} "
                                     f"> {LOOP_TOLERANCE:g} x output scale {scale:.3g}; the artifact is inconsistent "
                                     f"(recompile), or pass --no-loop")
                if decoder is None:
                    calls["loop"] = lambda: loop(noise, labels)
                else:  # the graph decodes: so does the loop a user would write (one decoder.onnx call after it)
                    calls["loop"] = lambda: decoder.run({DECODER_SAMPLES: loop(noise, labels)}, [IMAGES_U8])
            max_abs = None
            if eager is not None:
                try:
                    eager.check(noise, labels)
                    reference = np.asarray(eager(noise, labels), dtype=np.float64)
                    max_abs = float(np.abs(sampler(noise, class_labels=labels).astype(np.float64) - reference).max())
                    timed = getattr(eager, "decoded", eager)
                    calls["eager"] = lambda: timed(noise, labels)
                except EagerUnavailable as err:
                    eager, eager_note = None, str(err)
                    log(f"eager reference skipped: {err}")
            times = {name: _ms(t) for name, t in time_interleaved(calls, opts.warmup, opts.iters,
                                                                              clock=CLOCKS[opts.clock]).items()}
            p50, p90, p99 = _percentiles(times["sampler"])
            mean = float(times["sampler"].mean())
            d50 = _percentiles(times["denoiser"])[0] if "denoiser" in times else None
            dec50 = _percentiles(times["decoder"])[0] if "decoder" in times else 0.0
            e50 = _percentiles(times["eager"])[0] if "eager" in times else None
            l50 = _percentiles(times["loop"])[0] if "loop" in times else None
            rows.append({
                "backend": sampler.backend, "batch": batch, "threads": threads, "spin": opts.spin, "device": device,
                "clock": opts.clock,
                "static_batch": batch in getattr(sampler, "static_batches", ()),
                "p50_ms": round(p50, 4), "p90_ms": round(p90, 4), "p99_ms": round(p99, 4), "mean_ms": round(mean, 4),
                "images_per_s": round(batch / (mean / 1e3), 2),
                "denoiser_p50_ms": None if d50 is None else round(d50, 4),
                "decoder_p50_ms": round(dec50, 4) if "decoder" in times else None,
                "overhead_ratio": None if d50 is None else round(p50 / (sampler.nfe * d50 + dec50), 3),
                "loop_p50_ms": None if l50 is None else round(l50, 4),
                "speedup_vs_loop": None if l50 is None else round(l50 / p50, 3),
                "loop_max_abs_diff": loop_abs, "loop_note": loop_note,
                "eager_p50_ms": None if e50 is None else round(e50, 4),
                "speedup_vs_eager": None if e50 is None else round(e50 / p50, 2),
                "eager_dtype": opts.eager_dtype if e50 is not None else None,
                "eager_max_abs_diff": max_abs,
                "eager_note": eager_note, "denoiser_note": denoiser_note,
                "nfe": sampler.nfe, "solver": sampler.solver, "model": sampler.model_name,
                "warmup": opts.warmup, "iters": opts.iters, "artifact": str(Path(artifact)),
            })
    finally:
        if eager is not None:
            eager.close()
        sampler.close()
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    head = (f"{'backend':<16} {'batch':>5} {'thr':>3} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>10} "
            f"{'den p50 ms':>10} {'overhead':>8} {'loop p50 ms':>11} {'vs loop':>7} {'eager p50 ms':>12} {'vs eager':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:<16} {r['batch']:>5} {r['threads']:>3} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['images_per_s']:>10.1f} {_fmt(r['denoiser_p50_ms'], '.4f'):>10} "
                     f"{_fmt(r['overhead_ratio'], '.2f'):>8} {_fmt(r['loop_p50_ms'], '.3f'):>11} "
                     f"{_fmt(r['speedup_vs_loop'], '.2f'):>7} {_fmt(r['eager_p50_ms'], '.3f'):>12} "
                     f"{_fmt(r['speedup_vs_eager'], '.2f'):>8}")
    if rows:
        r = rows[0]
        decode = " + decoder p50" if r.get("decoder_p50_ms") is not None else ""
        lines.append(f"NFE {r['nfe']} ({r['solver']}), model {r['model']}, {r['clock']} clock"
                     f"{'' if r.get('spin', True) else ', idle threads sleep (--no-spin)'}; overhead = p50 / (NFE x denoiser p50{decode}), "
                     f"<= 1.0 wanted (below 1: per-call work folded away); speed-ups = baseline p50 / sampler p50; loop = numpy loop around denoiser.onnx (program.json)"
                     + (f" ({r['loop_note']})" if r["loop_note"] else "")
                     + f"; eager = PyTorch {r['eager_dtype'] + ' ' if r['eager_dtype'] else ''}loop on {r['device']}"
                     + (f" ({r['eager_note']})" if r["eager_note"] else ""))
    return "\n".join(lines)
