"""`iia-compile MODEL --nfe N`: the whole sampler as one ONNX graph (+ TensorRT engine) in an artifact dir."""

from __future__ import annotations

import sys
from pathlib import Path

from iia.calibration.cli import PICKLE_NOTE, add_model_argument
from iia.calibration.fit import CalibrationOptions
from iia.cli import (ProgressBar, add_options, cli_parser, default_output, given_options, options_from, run_cli,
                     with_role)


def _main(argv=None) -> int:
    from .build import CompileOptions, compile_model

    parser = cli_parser(
        prog="iia-compile",
        description="Compile a diffusion model's fixed-NFE sampler into one ONNX graph (and a TensorRT engine "
                    "where TensorRT and a GPU exist). " + PICKLE_NOTE)
    add_model_argument(parser, default=None)
    add_options(parser, CompileOptions)
    add_options(parser, CalibrationOptions, skip=with_role(CalibrationOptions, "research"))  # kept at defaults
    parser.add_argument("--out", default=None, help="artifact directory (default: <model>-<solver>-nfe<N>)")
    args = parser.parse_args(argv)
    options = options_from(CompileOptions, args, calibration=options_from(CalibrationOptions, args),
                           given=frozenset(given_options(parser, argv)))  # a flag typed at its default counts
    if args.out is not None and not args.out.strip():  # Path("") is ".": the refusal would name the wrong path
        raise ValueError(f"--out {args.out!r}: empty, expected a new artifact directory")
    out = default_output(args.model, args.solver, args.nfe) if args.out is None else Path(args.out)
    bar = ProgressBar("calibrating")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    manifest = compile_model(args.model, out, options, log=log, progress=bar)
    bar.close()
    total = sum(manifest["timings_s"].values())
    print(f"wrote {out}/ ({', '.join(manifest['files'])}, manifest.json) in {total:.1f} s")
    note = unsearched_note(manifest, options.budget_s)
    if note:
        print(note)
    print(f"sample from it: iia-sample {out} --n 64 --seed 0 --out grid.png")
    return 0


def unsearched_note(manifest: dict, budget_s: float | None) -> str | None:
    """The closing line's warning when --solver auto shipped the unsearched prior (tester-42: at CIFAR size the
    default compile ships plain iPNDM, said only in the plan block); None otherwise."""
    if not (manifest["coefficients_source"].startswith("auto:") and not manifest["guard"]):
        return None
    return (f"note: --solver auto searched nothing (the plan above: --budget {budget_s:g} s cannot afford this "
            f"model's references here); it is the base {manifest['solver']} sampler, no fit")


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
