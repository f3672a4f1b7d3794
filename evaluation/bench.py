"""`iia-bench`: latency of a compiled sampler, its overhead over NFE denoiser calls, and its baselines.

Per batch size, the runners of `iia.evaluation.runners` (the sampler graph, ONE denoiser call, one decoder call,
the numpy loop users would write, the PyTorch eager loop) are timed in alternating rounds of a few calls each
(see `time_interleaved`), so slow drifts of a shared machine hit all of them alike:

* p50/p90/p99 latency of `sampler(noise, class_labels=...)` (wall clock; ONNX Runtime and TensorRT return
  host arrays, so every call is synchronised), images/s = batch / mean latency;
* guidance-range artifacts: every call (graph, denoiser, loop) gets the --guidance scale, else the artifact's default;
* overhead ratio = sampler p50 / (NFE x denoiser p50 + decoder p50) on the same backend, batch and threads:
  1.0 is the floor of running the NFE denoiser calls (a guided denoiser.onnx holds both networks) and the one
  decode call (`decoder.onnx`, when the artifact decodes: the VAE decoder of a latent model) back to back.
  Each timed denoiser call also pays its own host<->device copies, so on a GPU this ratio errs low;
* loop: Python/numpy driving the SAME denoiser.onnx session one call at a time through the artifact's
  program.json; speed-up vs loop = loop p50 / sampler p50. Its output is checked against the sampler's
  (`loop_max_abs_diff`) before it is timed;
* eager: the PyTorch loop with the same solver and coefficients, then the model's decode stage when the artifact
  decodes; speed-up = eager p50 / sampler p50.

torch-free at import: without torch the eager runner is skipped with a note.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from iia.cli import Ticker, check_options, distinct_int_list, option
from iia.runtime.contract import MAX_BATCH, MAX_SEED, draw_labels, draw_noise
from iia.runtime.loader import describe, load
from iia.runtime.options import RunOptions
from iia.runtime.sampler import Sampler

from .runners import (LOOP_TOLERANCE, SIGMA, Batch, GraphRunner, Runner, Unavailable, device_of, eager_runner,
                      loop_runner, one_call_runners)

# "wall": elapsed time, what a caller waits (the default). "cpu": CPU seconds of this process (all its threads),
# for a SHARED machine where other jobs preempt long calls more often than short ones and so bias wall-clock
# ratios; with threads > 1 it measures work (spin-waiting included), not latency.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
KEYS = ("backend", "batch", "threads", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "denoiser_p50_ms",
        "overhead_ratio", "loop_p50_ms", "speedup_vs_loop", "eager_p50_ms", "speedup_vs_eager")

__all__ = ["BenchOptions", "CLOCKS", "KEYS", "LOOP_TOLERANCE", "SIGMA", "default_threads", "format_table",
           "make_runners", "run_bench", "time_interleaved"]


@dataclass
class BenchOptions(RunOptions):
    """`iia-bench`'s options; role "eager": read by the PyTorch eager loop only (refused with --no-eager)."""

    batches: tuple[int, ...] = option((1, 8, 32), "batch sizes, comma-separated", flag="--batch",
                                      parse=distinct_int_list, lo=1, hi=MAX_BATCH)
    warmup: int = option(5, "untimed calls first", lo=0, hi=10_000)
    iters: int = option(50, "timed calls per batch size", lo=1, hi=1_000_000)
    loop: bool = option(True, "skip the numpy loop around denoiser.onnx (the baseline users would otherwise run)")
    eager: bool = option(True, "skip the PyTorch eager reference")
    eager_dtype: str = option("float32", "state dtype of the eager loop (float32: what a service runs)",
                              choices=("float32", "float64"), role="eager")
    model: str | None = option(None, "model file of the eager reference. Never read from the artifact: a model "
                                      "file (an EDM .pkl runs code when loaded) is loaded only when named here, "
                                      "and only after its sha256 matches the manifest's", role="eager")
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


# ---- timing ---------------------------------------------------------------------------------------
def _ms(seconds: list[float]) -> np.ndarray:
    return np.asarray(seconds, dtype=np.float64) * 1e3


def _p50(times: dict[str, np.ndarray], name: str) -> float | None:
    return _percentiles(times[name])[0] if name in times else None


def _percentiles(times: np.ndarray) -> tuple[float, float, float]:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def time_interleaved(calls: dict, warmup: int, iters: int, block: int = 5,
                     clock: Callable[[], float] = time.perf_counter,
                     tick: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call for each named thunk: rounds of `block` back-to-back calls of each, in rotating order,
    GC paused while timing. Alternating rounds spread slow drifts of a shared machine over all thunks alike;
    short blocks (rather than one call each) keep one library's idle spinning thread pool (ONNX Runtime's,
    OpenMP's) from landing on every single call of the other. `tick(done, total)` follows the calls (warm-up
    included), outside the timed spans."""
    names = list(calls)
    total, n = (warmup + iters) * len(names), 0
    tick = tick or (lambda done, total: None)
    for _ in range(warmup):
        for name in names:
            calls[name]()
            n += 1
            tick(n, total)
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
                    n += 1
                    tick(n, total)
            done, rnd = done + count, rnd + 1
    finally:
        if was_enabled:
            gc.enable()
    return times


# ---- the bench: a loop over runners ---------------------------------------------------------------
def make_runners(sampler: Sampler, opts: BenchOptions, threads: int, log=print) -> list[Runner]:
    """sampler, denoiser, decoder, loop, eager, in this order (the loop runs on the denoiser's session of the
    batch, so it is set up after it); a baseline that cannot run here is a `Skipped` runner saying why."""
    graph = GraphRunner(sampler)
    denoiser, decoder = one_call_runners(sampler, threads, opts.spin, log)
    loop = loop_runner(graph, denoiser, decoder, opts.loop, log)
    return [graph, denoiser, decoder, loop, eager_runner(graph, opts.eager, opts.model, opts.eager_dtype, threads, log)]


def time_batch(runners: list[Runner], batch: Batch, opts: BenchOptions, log=print) -> dict[str, np.ndarray]:
    """Milliseconds per call, by runner name, of every runner that runs: set up (a runner that turns out
    unavailable is skipped from now on, saying why), then timed interleaved; progress (`iia.cli.Ticker`) at
    least every ~10 s when it takes that long."""
    setup = Ticker(f"batch {batch.size}: setting up runners", log)
    for k, runner in enumerate(runners):
        setup(k, len(runners))
        if runner.why_not is None:
            try:
                runner.setup(batch)
            except Unavailable as err:
                runner.why_not = str(err)
                log(f"{runner.title} skipped: {err}")
    calls = {runner.name: partial(runner.run, batch) for runner in runners if runner.why_not is None}
    times = time_interleaved(calls, opts.warmup, opts.iters, clock=CLOCKS[opts.clock],
                             tick=Ticker(f"batch {batch.size}: calls of {', '.join(calls)}", log))
    return {name: _ms(t) for name, t in times.items()}


def bench_row(sampler: Sampler, batch: int, times: dict[str, np.ndarray], runners: dict[str, Runner],
              opts: BenchOptions, threads: int) -> dict:
    """One row of KEYS (and more) from the times of `time_batch` and the runners' notes and checks."""
    p50, p90, p99 = _percentiles(times["sampler"])
    mean = float(times["sampler"].mean())
    d50, e50, l50 = _p50(times, "denoiser"), _p50(times, "eager"), _p50(times, "loop")
    dec50 = _p50(times, "decoder") or 0.0
    loop, eager = runners["loop"], runners["eager"]
    return {
        "backend": sampler.backend, "batch": batch, "threads": threads, "spin": opts.spin,
        "device": device_of(sampler), "clock": opts.clock,
        "static_batch": batch in getattr(sampler, "static_batches", ()),
        "p50_ms": round(p50, 4), "p90_ms": round(p90, 4), "p99_ms": round(p99, 4), "mean_ms": round(mean, 4),
        "images_per_s": round(batch / (mean / 1e3), 2),
        "denoiser_p50_ms": None if d50 is None else round(d50, 4),
        "decoder_p50_ms": round(dec50, 4) if "decoder" in times else None,
        "overhead_ratio": None if d50 is None else round(p50 / (sampler.nfe * d50 + dec50), 3),
        "loop_p50_ms": None if l50 is None else round(l50, 4),
        "speedup_vs_loop": None if l50 is None else round(l50 / p50, 3),
        "loop_max_abs_diff": getattr(loop, "diff", None), "loop_note": loop.why_not,
        "eager_p50_ms": None if e50 is None else round(e50, 4),
        "speedup_vs_eager": None if e50 is None else round(e50 / p50, 2),
        "eager_dtype": opts.eager_dtype if e50 is not None else None,
        "eager_max_abs_diff": getattr(eager, "diff", None),
        "eager_note": eager.why_not, "denoiser_note": runners["denoiser"].why_not,
        "nfe": sampler.nfe, "solver": sampler.solver, "model": sampler.model_name,
        "warmup": opts.warmup, "iters": opts.iters,
    }


def run_bench(artifact: str | Path, opts: BenchOptions, log=print) -> list[dict]:
    """Rows of KEYS (and more) per batch size of `opts.batches` (ValueError for a batch over the artifact's
    maximum, or a loop baseline that disagrees with the graph)."""
    opts.validate()
    threads = opts.threads or default_threads()
    sampler = load(artifact, opts.backend, threads=threads, spin=opts.spin)
    log(f"{sampler!r}: {describe(sampler)}")
    if threads > default_threads():  # tester-42: --threads 999 on 2 cores, p50 9132 ms against 2.1 ms
        log(f"warning: --threads {threads} is more than the {default_threads()} cores this process may run on: the "
            f"timings measure the threads' contention, not the sampler")
    runners: list[Runner] = [GraphRunner(sampler)]
    try:
        too_big = [b for b in opts.batches if b > sampler.max_batch]
        if too_big:
            raise ValueError(f"batch size(s) {too_big} exceed the artifact's maximum batch {sampler.max_batch}")
        sampler.check_guidance(opts.guidance, 1)  # out of range, or an artifact of one scale: before any session
        runners = make_runners(sampler, opts, threads, log)
        rows = []
        for size in opts.batches:
            labels = draw_labels(opts.seed, size, sampler.label_dim) if sampler.conditional else None
            # the --guidance scale (or the artifact's default) for every image; None for one scale's artifact
            scales = sampler.check_guidance(opts.guidance, size)
            batch = Batch(draw_noise(opts.seed, size, sampler.sample_shape), labels, scales)
            times = time_batch(runners, batch, opts, log)
            row = bench_row(sampler, size, times, {r.name: r for r in runners}, opts, threads)
            rows.append({**row, "artifact": str(Path(artifact))})
        return rows
    finally:
        for runner in reversed(runners):
            runner.close()


# ---- the table -----------------------------------------------------------------------------------
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
