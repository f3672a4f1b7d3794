"""Effect of each ONNX Runtime setting on the one graph, against the loop users would otherwise write.

    python scripts/ort_session_variants.py ARTIFACT --threads 1 --batch 1,8,32 --iters 60 [--clock cpu]

Per batch size, times (interleaved rounds, medians; see iia.evaluation.bench.time_interleaved) the sampler graph
under each variant, the numpy loop around denoiser.onnx (iia.runtime.loop) and one denoiser call, and prints
`change -> loop/graph, overhead`:
  dynamic        the runtime's default session (all optimisations, memory pattern, arena)
  static         free dimension "batch" fixed (what --static-batch makes the runtime do)
  static+iobind  static, with inputs and a preallocated output bound once (I/O binding)
  no-mem-pattern memory pattern planning off
  extended       graph optimisation level EXTENDED instead of ALL (no NCHWc layout)
  no-nchwc       ALL but the NCHWc layout transformer disabled
  other:dynamic, other:static  the same for `--other DIR`'s sampler.onnx (an artifact of the same model and
                 solver in the other graph form, e.g. `iia-compile ... --graph unrolled`)
Run from the repository root (imports this checkout's iia).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iia.evaluation.bench import CLOCKS, time_interleaved  # noqa: E402
from iia.runtime.contract import (DENOISED, DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, IMAGES, LABELS,  # noqa: E402
                                  NOISE, draw_noise, read_manifest)
from iia.runtime.program import read_program  # noqa: E402
from iia.runtime.loop import DenoiserLoop  # noqa: E402
from iia.runtime.onnx_backend import OrtSession, session_options  # noqa: E402


def session(path, threads, batch=None, mem_pattern=True, level=None, disabled=()):
    import onnxruntime as ort

    opts = session_options(threads, batch)
    opts.enable_mem_pattern = mem_pattern
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS))
    parser.add_argument("--other", default=None, help="another artifact of the same model and solver (other graph form)")
    args = parser.parse_args()
    root = Path(args.artifact)
    manifest = read_manifest(root)
    plan = read_program(root, manifest)
    label_dim, nfe = int(manifest["label_dim"]), int(manifest["nfe"])
    graph = root / "sampler.onnx"
    denoiser = OrtSession(root / "denoiser.onnx", "cpu", args.threads)
    loop = DenoiserLoop(denoiser, plan, label_dim > 0)
    for batch in [int(b) for b in args.batch.split(",")]:
        noise = draw_noise(0, batch, manifest["sample_shape"])
        labels = (np.arange(batch, dtype=np.int64) % label_dim) if label_dim else None
        feeds = {NOISE: noise} | ({LABELS: labels} if label_dim else {})
        dfeeds = {DENOISER_X: noise, DENOISER_SIGMA: np.ones(batch, np.float32)} | (
            {DENOISER_LABELS: labels} if label_dim else {})
        variants = {
            "dynamic": session(graph, args.threads),
            "static": session(graph, args.threads, batch),
            "no-mem-pattern": session(graph, args.threads, mem_pattern=False),
            "extended": session(graph, args.threads, level="ORT_ENABLE_EXTENDED"),
            "no-nchwc": session(graph, args.threads, disabled=["NchwcTransformer"]),
        }
        if args.other:
            variants["other:dynamic"] = session(Path(args.other) / "sampler.onnx", args.threads)
            variants["other:static"] = session(Path(args.other) / "sampler.onnx", args.threads, batch)
        calls = {name: (lambda s=s: s.run([IMAGES], feeds)) for name, s in variants.items()}
        binding = variants["static"].io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        out = np.empty_like(noise)
        binding.bind_output(IMAGES, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        calls["static+iobind"] = lambda: variants["static"].run_with_iobinding(binding)
        calls["loop"] = lambda: loop(noise, labels)
        calls["denoiser"] = lambda: denoiser.run(dfeeds, [DENOISED])
        reference = variants["dynamic"].run([IMAGES], feeds)[0]
        for name, s in variants.items():
            assert np.abs(s.run([IMAGES], feeds)[0] - reference).max() < 1e-3, name
        assert np.abs(loop(noise, labels) - reference).max() < 1e-3
        start = time.perf_counter()
        med = {k: float(np.median(v)) * 1e3 for k, v in
               time_interleaved(calls, 3, args.iters, clock=CLOCKS[args.clock]).items()}
        print(f"\n{root.name} batch {batch}, {args.threads} thread(s), {args.clock} clock, {args.iters} iters "
              f"({time.perf_counter() - start:.0f} s): loop {med['loop']:.3f} ms, denoiser {med['denoiser']:.4f} ms")
        print(f"| change | graph ms | loop/graph | overhead |\n|---|---|---|---|")
        for name in [*variants, "static+iobind"]:
            print(f"| {name} | {med[name]:.3f} | {med['loop'] / med[name]:.3f} | {med[name] / (nfe * med['denoiser']):.3f} |")
        print(f"| (loop) | {med['loop']:.3f} | 1.000 | {med['loop'] / (nfe * med['denoiser']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
