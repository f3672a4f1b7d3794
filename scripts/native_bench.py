"""Latency of the native runtime (`iia-run --bench`) against the Python runtime on the same artifact, backend,
threads, noise and labels, in alternating rounds (a shared machine's drift hits both alike).

    python scripts/native_bench.py ARTIFACT [--iia-run build/native/runtime/native/iia-run] [--batch 1,8]
        [--iters 200] [--rounds 5] [--threads 1] [--backend onnxruntime-cpu] [--json FILE]

Prints per batch: p50 of each (pooled over rounds), the ratio native / Python (floor target <= 1), and the
native time spent outside ONNX Runtime's Run per call (p50, target < 50 us).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iia.runtime  # noqa: E402  (a source checkout imports its own runtime)


def python_times(sampler, noise, labels, iters: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        sampler(noise, class_labels=labels)
    times = []
    gc.disable()
    try:
        for _ in range(iters):
            start = time.perf_counter()
            sampler(noise, class_labels=labels)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--iia-run", default="build/native/runtime/native/iia-run")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="onnxruntime-cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sampler = iia.runtime.load(args.artifact, args.backend, threads=args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batch.split(",")):
            noise = iia.runtime.draw_noise(0, batch, sampler.sample_shape)
            labels = (np.arange(batch, dtype=np.int64) % sampler.label_dim) if sampler.conditional else None
            np.save(Path(tmp) / "noise.npy", noise)
            py, native, outside, inside = [], [], [], []
            for _ in range(args.rounds):
                py += python_times(sampler, noise, labels, args.iters)
                out = Path(tmp) / "bench.json"
                subprocess.run([args.iia_run, args.artifact, "--bench", "--batch", str(batch), "--iters", str(args.iters),
                                "--warmup", "5", "--threads", str(args.threads), "--backend", args.backend,
                                "--noise", str(Path(tmp) / "noise.npy"), "--json", str(out)],
                               check=True, capture_output=True)
                row = json.loads(out.read_text())[0]
                native += row["times_ms"]
                outside.append(row["outside_run_p50_us"])
                inside.append(row["backend_run_p50_ms"])
            p_py, p_native = float(np.median(py)), float(np.median(native))
            rows.append({"artifact": args.artifact, "backend": sampler.backend, "batch": batch, "threads": args.threads,
                         "python_p50_ms": round(p_py, 4), "native_p50_ms": round(p_native, 4),
                         "ratio_native_to_python": round(p_native / p_py, 4),
                         "native_outside_run_p50_us": round(float(np.median(outside)), 2),
                         "native_run_p50_ms": round(float(np.median(inside)), 4),
                         "iters": args.iters * args.rounds})
            r = rows[-1]
            print(f"{Path(args.artifact).name:<12} batch {batch:>3}: python p50 {p_py:8.3f} ms, native p50 {p_native:8.3f} ms, "
                  f"ratio {r['ratio_native_to_python']:.3f}; native outside Run {r['native_outside_run_p50_us']:.1f} us/call",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
