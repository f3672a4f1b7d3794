"""`iia-compile MODEL --nfe N`: the whole sampler as one ONNX graph (+ TensorRT engine) in an artifact dir."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iia.calibration.cli import PICKLE_NOTE, add_model_argument, options_from_args
from iia.calibration.solvers import SOLVERS
from iia.cli import ProgressBar, run_cli


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="iia-compile",
        description="Compile a diffusion model's fixed-NFE sampler into one ONNX graph (and a TensorRT engine "
                    "where TensorRT and a GPU exist). " + PICKLE_NOTE)
    add_model_argument(parser, default=None)
    parser.add_argument("--nfe", type=int, default=9)
    parser.add_argument("--solver", default="iia-edm", choices=sorted(SOLVERS), help="default iia-edm")
    parser.add_argument("--M", type=int, default=3)
    parser.add_argument("--r", type=int, default=1)
    parser.add_argument("--calib-batch", dest="batch", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=int, default=None, help="guard noises (default 256)")
    parser.add_argument("--reference-steps", type=int, default=None, help="default 256 analytic, 128 networks")
    parser.add_argument("--schedule", default="karras", choices=("karras", "uniform", "quadratic"),
                        help="karras (default) or, for discrete DDPMs, DDIM's uniform/quadratic timesteps")
    parser.add_argument("--coefficients", default=None, help="reuse a coefficient JSON instead of calibrating")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="TensorRT engine precision (the ONNX graph is always fp32)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--out", default=None, help="artifact directory (default: <model>-<solver>-nfe<N>)")
    parser.add_argument("--force", action="store_true", help="replace an existing artifact directory")
    parser.add_argument("--no-engine", action="store_true", help="skip the TensorRT engine")
    args = parser.parse_args(argv)
    # flags iia-calibrate has that compile keeps at their defaults
    args.first_step, args.fine_solver, args.ridge, args.no_guard = 0, "base", 1e-6, False
    from .build import CompileOptions, compile_model

    options = CompileOptions(nfe=args.nfe, solver=args.solver, calibration=options_from_args(args),
                             coefficients=args.coefficients, precision=args.precision, max_batch=args.max_batch,
                             force=args.force, engine=not args.no_engine)
    out = Path(args.out or f"{Path(str(args.model)).stem.split(':')[0]}-{args.solver}-nfe{args.nfe}")
    bar = ProgressBar("calibrating")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    manifest = compile_model(args.model, out, options, log=log, progress=bar)
    bar.close()
    total = sum(manifest["timings_s"].values())
    print(f"wrote {out}/ ({', '.join(manifest['files'])}, manifest.json) in {total:.1f} s")
    print(f"sample from it: iia-sample {out} --n 64 --seed 0 --out grid.png")
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
