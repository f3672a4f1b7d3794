"""`iia-bench`: latency of a compiled sampler, its overhead over NFE denoiser calls, and the PyTorch eager loop.

Per batch size, the sampler, ONE denoiser call (`denoiser.onnx`, sigma = 1, the same labels) and the eager
reference are timed in alternating rounds of a few calls each (see `time_interleaved`), so slow drifts of a
shared machine hit all three alike:

* p50/p90/p99 latency of `sampler(noise, class_labels=...)` (wall clock; ONNX Runtime and TensorRT return
  host arrays, so every call is synchronised), images/s = batch / mean latency;
* overhead ratio = sampler p50 / (NFE x denoiser p50) on the same backend, batch and threads: 1.0 is the
  floor of running the NFE denoiser calls back to back. Each timed denoiser call also pays its own
  host<->device copies, so on a GPU this ratio errs low;
* eager: `iia.calibration.sampling.sample` (same solver and coefficients, float32 states by default, as a
  service would run) with the denoiser rebuilt from the manifest's model identity, on the same device with
  `torch.set_num_threads(threads)`; speed-up = eager p50 / sampler p50.

Only this module imports torch / iia.models / iia.calibration, lazily, for the eager reference.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import read_verified
from .loader import describe, load
from .onnx_backend import CUDA, OrtSession
from .contract import draw_noise
from .sampler import BackendUnavailable, Sampler
from .trt_backend import TENSORRT

DENOISER = "denoiser.onnx"
SIGMA = 1.0
KEYS = ("backend", "batch", "threads", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "denoiser_p50_ms",
        "overhead_ratio", "eager_p50_ms", "speedup_vs_eager")


class EagerUnavailable(RuntimeError):
    """The eager reference cannot run (model not rebuildable, torch without CUDA...); the message says why."""


@dataclass
class BenchOptions:
    backend: str = "auto"
    batches: tuple[int, ...] = (1, 8, 32)
    warmup: int = 5
    iters: int = 50
    threads: int | None = None  # None: the CPUs this process may use
    eager: bool = True
    eager_dtype: str = "float32"
    model: str | None = None  # where to load the model for eager (default: rebuilt from the manifest)
    seed: int = 0

    def validate(self) -> None:
        if self.warmup < 0 or self.iters < 1:
            raise ValueError(f"need --warmup >= 0 and --iters >= 1, got {self.warmup} and {self.iters}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.eager_dtype not in ("float32", "float64"):
            raise ValueError(f"eager dtype must be float32 or float64, got {self.eager_dtype!r}")


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _device(sampler: Sampler) -> str:
    return "cuda" if sampler.backend in (TENSORRT, CUDA) else "cpu"


# ---- the single denoiser call -------------------------------------------------------------------
def denoiser_runner(sampler: Sampler, threads: int):
    """A `run(feeds, outputs)` object for denoiser.onnx on the sampler's backend."""
    root, manifest = Path(sampler.root), sampler.manifest
    if DENOISER not in manifest["files"]:
        raise BackendUnavailable(f"the artifact has no {DENOISER}")
    model = read_verified(root, manifest, DENOISER)
    if sampler.backend == TENSORRT:
        return _trt_denoiser(root, sampler, model)
    return OrtSession(model, _device(sampler), threads)


def _trt_denoiser(root: Path, sampler: Sampler, model: bytes):
    """The artifact ships no denoiser plan: build one here with the sampler's profile, precision and fp32
    layers, through the same builder as the compiler's sampler.plan."""
    from .engine import EnginePlan, build_engine, denoiser_inputs, fp32_layer_names
    from .trt_backend import TrtEngine

    top = sampler.max_batch
    precision = (sampler.manifest.get("engine") or {}).get("precision", "fp32")
    path = str(root / DENOISER)
    plan = EnginePlan(denoiser_inputs(sampler.sample_shape, sampler.conditional), precision=precision,
                      opt_batch=min(8, top), max_batch=top,
                      fp32_layers=fp32_layer_names(path) if precision != "fp32" else [])
    data, _ = build_engine(path, plan)
    return TrtEngine(data, top)


# ---- the eager PyTorch reference ----------------------------------------------------------------
def rebuild_denoiser(manifest: dict, spec: str | None):
    """The model behind the artifact, from `spec` or the manifest's identity (EagerUnavailable if impossible)."""
    from iia.models import load as load_model

    if spec is not None:
        return load_model(spec)
    ident = manifest.get("model") or {}
    kind, name = ident.get("kind"), ident.get("name")
    if ident.get("path"):
        return load_model(ident["path"])
    if kind == "gmm" and isinstance(ident.get("config"), dict):
        from iia.models import gaussian_mixture

        config = dict(ident["config"])
        config["shape"] = tuple(config.get("shape", ()))
        return gaussian_mixture(**config)
    if kind == "bundled":
        return load_model("digits")
    raise EagerUnavailable(f"cannot rebuild model {kind} '{name}' from the manifest (its identity records no path "
                           f"or config): pass --model PATH to time the eager reference")


class EagerReference:
    """`iia.calibration.sampling.sample` with the artifact's program, on `device` with `threads` threads."""

    def __init__(self, root: Path, manifest: dict, spec: str | None, dtype: str, threads: int, device: str):
        import torch

        from iia.calibration.artifact import ArtifactError, load_program
        from iia.calibration.sampling import sample

        try:
            denoiser = rebuild_denoiser(manifest, spec)
            program = load_program(root / "coefficients.json", denoiser, manifest["nfe"], manifest.get("solver"))
        except ArtifactError as err:
            if spec is not None:
                raise ValueError(f"--model {spec} does not fit this artifact: {err}") from None
            raise EagerUnavailable(f"the rebuilt model does not match the artifact ({err})") from None
        except (ValueError, OSError, ImportError) as err:
            if spec is not None:
                raise
            raise EagerUnavailable(f"could not rebuild the model ({type(err).__name__}: {err})") from None
        if device == "cuda":
            if not torch.cuda.is_available():
                raise EagerUnavailable("this torch build has no CUDA, so eager cannot run on the sampler's device")
            denoiser.net.to("cuda")
        self.torch, self.sample, self.program, self.denoiser = torch, sample, program, denoiser
        self.dtype = getattr(torch, dtype)
        self.dtype_name, self.device, self.threads = dtype, device, threads

    def __call__(self, noise: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(noise).to(self.device)
            y = None if labels is None else torch.from_numpy(labels).to(self.device)
            out = self.sample(self.program, self.denoiser, x, y, dtype=self.dtype)
            if self.device == "cuda":
                torch.cuda.synchronize()
        return out

    def check(self, noise, labels) -> None:
        """Run once; a failure (e.g. a model that cannot run on CUDA) becomes EagerUnavailable."""
        try:
            self(noise, labels)
        except Exception as err:
            raise EagerUnavailable(f"eager run failed on {self.device} ({type(err).__name__}: {err})") from None


# ---- timing ---------------------------------------------------------------------------------------
def _ms(seconds: list[float]) -> np.ndarray:
    return np.asarray(seconds, dtype=np.float64) * 1e3


def _percentiles(times: np.ndarray) -> tuple[float, float, float]:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def time_interleaved(calls: dict, warmup: int, iters: int, block: int = 5) -> dict[str, list[float]]:
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
                    start = time.perf_counter()
                    calls[name]()
                    times[name].append(time.perf_counter() - start)
            done, rnd = done + count, rnd + 1
    finally:
        if was_enabled:
            gc.enable()
    return times


def run_bench(artifact: str | Path, opts: BenchOptions, log=print) -> list[dict]:
    opts.validate()
    threads = opts.threads or default_threads()
    sampler = load(artifact, opts.backend, threads=threads)
    log(f"{sampler!r}: {describe(sampler)}")
    too_big = [b for b in opts.batches if b > sampler.max_batch]
    if too_big:
        raise ValueError(f"batch size(s) {too_big} exceed the artifact's maximum batch {sampler.max_batch}")
    device = _device(sampler)
    try:
        denoiser = denoiser_runner(sampler, threads)
        denoiser_note = None
    except BackendUnavailable as err:
        denoiser, denoiser_note = None, str(err)
        log(f"denoiser timing skipped: {err}")

    eager, eager_note, torch_mod, saved_threads = None, None, None, 0
    if not opts.eager:
        eager_note = "--no-eager"
    else:
        try:
            eager = EagerReference(Path(sampler.root), sampler.manifest, opts.model, opts.eager_dtype, threads, device)
            torch_mod, saved_threads = eager.torch, eager.torch.get_num_threads()
            torch_mod.set_num_threads(threads)
        except EagerUnavailable as err:
            eager_note = str(err)
            log(f"eager reference skipped: {err}")

    rows = []
    try:
        for batch in opts.batches:
            noise = draw_noise(opts.seed, batch, sampler.sample_shape)
            labels = (np.arange(batch, dtype=np.int64) % sampler.label_dim) if sampler.conditional else None
            feeds = {"x": noise * np.float32(SIGMA), "sigma": np.full(batch, SIGMA, dtype=np.float32)}
            if labels is not None:
                feeds["class_labels"] = labels
            calls = {"sampler": lambda: sampler(noise, class_labels=labels)}
            if denoiser is not None:
                calls["denoiser"] = lambda: denoiser.run(feeds, ["denoised"])
            max_abs = None
            if eager is not None:
                try:
                    eager.check(noise, labels)
                    reference = eager(noise, labels).to("cpu").double().numpy()
                    max_abs = float(np.abs(sampler(noise, class_labels=labels).astype(np.float64) - reference).max())
                    calls["eager"] = lambda: eager(noise, labels)
                except EagerUnavailable as err:
                    eager, eager_note = None, str(err)
                    log(f"eager reference skipped: {err}")
            times = {name: _ms(t) for name, t in time_interleaved(calls, opts.warmup, opts.iters).items()}
            p50, p90, p99 = _percentiles(times["sampler"])
            mean = float(times["sampler"].mean())
            d50 = _percentiles(times["denoiser"])[0] if "denoiser" in times else None
            e50 = _percentiles(times["eager"])[0] if "eager" in times else None
            rows.append({
                "backend": sampler.backend, "batch": batch, "threads": threads, "device": device,
                "p50_ms": round(p50, 4), "p90_ms": round(p90, 4), "p99_ms": round(p99, 4), "mean_ms": round(mean, 4),
                "images_per_s": round(batch / (mean / 1e3), 2),
                "denoiser_p50_ms": None if d50 is None else round(d50, 4),
                "overhead_ratio": None if d50 is None else round(p50 / (sampler.nfe * d50), 3),
                "eager_p50_ms": None if e50 is None else round(e50, 4),
                "speedup_vs_eager": None if e50 is None else round(e50 / p50, 2),
                "eager_dtype": opts.eager_dtype if e50 is not None else None,
                "eager_max_abs_diff": max_abs,
                "eager_note": eager_note, "denoiser_note": denoiser_note,
                "nfe": sampler.nfe, "solver": sampler.solver, "model": sampler.model_name,
                "warmup": opts.warmup, "iters": opts.iters, "artifact": str(Path(artifact)),
            })
    finally:
        if torch_mod is not None:  # torch's thread count is process-wide: give it back
            torch_mod.set_num_threads(saved_threads)
        sampler.close()
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    head = (f"{'backend':<16} {'batch':>5} {'thr':>3} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>10} "
            f"{'den p50 ms':>10} {'overhead':>8} {'eager p50 ms':>12} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:<16} {r['batch']:>5} {r['threads']:>3} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['images_per_s']:>10.1f} {_fmt(r['denoiser_p50_ms'], '.4f'):>10} "
                     f"{_fmt(r['overhead_ratio'], '.2f'):>8} {_fmt(r['eager_p50_ms'], '.3f'):>12} "
                     f"{_fmt(r['speedup_vs_eager'], '.2f'):>8}")
    if rows:
        r = rows[0]
        lines.append(f"NFE {r['nfe']} ({r['solver']}), model {r['model']}; overhead = p50 / (NFE x denoiser p50), "
                     f"floor 1.0; eager = PyTorch {r['eager_dtype'] or ''} loop on {r['device']}"
                     + (f" ({r['eager_note']})" if r["eager_note"] else ""))
    return "\n".join(lines)
