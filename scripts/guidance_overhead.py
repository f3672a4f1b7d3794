"""The overhead floor of a guidance range (issue 25): iia-bench's overhead ratio (sampler p50 / (NFE x one guided
denoiser call)) of a range artifact against the single-scale artifact compiled at the same g, in interleaved
repetitions (one iia-bench process per artifact per repetition, alternating), one thread; prints per batch
the median and spread (min..max) of each artifact's ratio and of the range / single quotient, and the load
average before each repetition (the machine may be shared).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/guidance_overhead.py SINGLE_DIR RANGE_DIR --guidance 2.2 \
        [--reps 7] [--batch 1,8] [--iters 100] [--clock cpu]

Both artifacts compiled with `iia-compile --with-denoiser` (the one-call timing reads their denoiser.onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def bench(artifact: str, batches: str, iters: int, guidance: float | None, out: str, clock: str) -> list[dict]:
    cmd = [sys.executable, "-c", "from iia.evaluation.cli import bench_main; bench_main()", artifact, "--batch", batches,
           "--threads", "1", "--no-loop", "--no-eager", "--iters", str(iters), "--clock", clock, "--json", out]
    if guidance is not None:
        cmd += ["--guidance", str(guidance)]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("single")
    parser.add_argument("range")
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="iia-bench --clock (cpu: a shared "
                        "machine's preemptions do not count)")
    args = parser.parse_args()
    ratios: dict[tuple[str, int], list[float]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            loads.append(os.getloadavg()[0])
            order = [("single", args.single, None), ("range", args.range, args.guidance)]
            for name, path, g in order if rep % 2 == 0 else order[::-1]:
                for row in bench(path, args.batch, args.iters, g, os.path.join(tmp, f"{name}.json"), args.clock):
                    ratios.setdefault((name, row["batch"]), []).append(row["overhead_ratio"])
                    ratios.setdefault((name + " p50 ms", row["batch"]), []).append(row["p50_ms"])
                    ratios.setdefault((name + " den ms", row["batch"]), []).append(row["denoiser_p50_ms"])
    print(f"iia-bench --clock {args.clock}, --threads 1, --iters {args.iters}, {args.reps} repetitions interleaved")
    print(f"load average (1 min) before each repetition: {', '.join(f'{x:.2f}' for x in loads)}")
    for b in sorted({b for _, b in ratios}):
        s, r = np.array(ratios[("single", b)]), np.array(ratios[("range", b)])
        q = r / s
        for label, v in (("single", s), ("range", r), ("range/single", q)):
            print(f"batch {b:>3} {label:<13} overhead median {np.median(v):.3f}  spread {v.min():.3f}..{v.max():.3f}")
        for label in ("single p50 ms", "range p50 ms", "single den ms", "range den ms"):
            v = np.array(ratios[(label, b)])
            print(f"batch {b:>3} {label:<13} median {np.median(v):.4f}  spread {v.min():.4f}..{v.max():.4f}")


if __name__ == "__main__":
    main()
