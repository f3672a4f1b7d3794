"""`iia-calibrate` and `iia-accuracy`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iia.cli import ProgressBar, int_list, run_cli, stage, str_list

PICKLE_NOTE = ("Loading an EDM .pkl executes code stored in the pickle (inherent to the format): "
               "load only checkpoints you trust. The sha256 of what was loaded is printed.")


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = "gmm") -> None:
    parser.add_argument("model", nargs="?" if default else None, default=default,
                        help="EDM .pkl, bundled 'digits', or 'gmm[:components=10,spread=0.5,seed=0,d=64]'"
                             + (f" (default {default})" if default else ""))


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--M", type=int, default=3, help="fine sub-steps per step for the target (default 3)")
    parser.add_argument("--r", type=int, default=1, help="history length (default 1)")
    parser.add_argument("--batch", "--calib-batch", dest="batch", type=int, default=200,
                        help="calibration noises (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-step", type=int, default=0, choices=(0, 1),
                        help="first fitted step: 0 (paper text, default) or 1 (camera-ready)")
    parser.add_argument("--fine-solver", default="base", choices=("base", "heun"),
                        help="integrator of the fine target (default: the base solver, as in the paper)")
    parser.add_argument("--ridge", type=float, default=1e-6, help="ridge toward the base coefficients")
    parser.add_argument("--holdout", type=int, default=None,
                        help="held-out noises for the end-to-end guard (default 256)")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="Heun steps of the reference solution (default 256 analytic model, 128 networks)")
    parser.add_argument("--schedule", default="karras", choices=("karras", "uniform", "quadratic"),
                        help="karras (rho = 7, default) or, for discrete DDPMs, DDIM's uniform/quadratic timesteps")
    parser.add_argument("--no-guard", action="store_true", help="ship the raw fit even if it loses end to end")


def options_from_args(args):
    from .fit import CalibrationOptions

    return CalibrationOptions(M=args.M, r=args.r, batch=args.batch, seed=args.seed, first_step=args.first_step,
                              fine_solver=args.fine_solver, ridge=args.ridge, holdout=args.holdout,
                              reference_steps=args.reference_steps, guard=not args.no_guard,
                              schedule=args.schedule)


def load_model_verbose(spec):
    from iia.models import load

    denoiser = load(spec)
    print(f"model: {denoiser.describe()}", file=sys.stderr)
    if denoiser.identity.get("sha256"):
        print(f"sha256: {denoiser.identity['sha256']}", file=sys.stderr)
    return denoiser


def _calibrate(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="iia-calibrate", description="Fit IIA coefficients. " + PICKLE_NOTE)
    add_model_argument(parser)
    parser.add_argument("--solver", default="iia-edm", help="iia-edm (default), biia-edm, iia-ddim, iia-ipndm, iia-spndm")
    parser.add_argument("--nfe", type=int, default=9)
    add_calibration_arguments(parser)
    parser.add_argument("--out", default=None, help="coefficient JSON (default: <solver>-nfe<N>.json)")
    args = parser.parse_args(argv)
    from . import artifact
    from .fit import calibrate
    from .sampling import program_for

    options = options_from_args(args)
    options.validate()
    program_for_check = args.solver, args.nfe
    denoiser = load_model_verbose(args.model)
    program_for(denoiser, *program_for_check)  # fail fast on an invalid NFE/solver
    bar = ProgressBar("calibrating")
    with stage(f"calibrate {args.solver} NFE {args.nfe}"):
        result = calibrate(denoiser, args.solver, args.nfe, options, progress=bar)
    bar.close()
    out = Path(args.out or f"{args.solver}-nfe{args.nfe}.json")
    artifact.save(result, denoiser, args.nfe, out)
    g = result.guard
    if g:
        print(f"held-out end-to-end rmse: base {g['rmse_base']:.5g}, full fit {g['rmse_fitted']:.5g}, "
              f"shipped {g['rmse_chosen']:.5g} ({g['decision']})")
    print(f"wrote {out}")
    return 0


def _accuracy(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="iia-accuracy", description="Sampler RMSE vs a high-accuracy reference. "
                                     + PICKLE_NOTE)
    parser.add_argument("--model", default="gmm", help="gmm (default), digits, or a path")
    parser.add_argument("--solvers", type=str_list, default=str_list("edm,biia-edm,iia-edm,ddim,iia-ddim"))
    parser.add_argument("--nfe", type=int_list, default=int_list("5,7,9,11,15,19,25,35"),
                        help="EDM-family solvers use the odd values, DDIM-family all of them")
    parser.add_argument("--n-test", type=int, default=500, help="fresh test noises (default 500)")
    add_calibration_arguments(parser)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    from .accuracy import accuracy_table, format_table, plot_table

    options = options_from_args(args)
    options.validate()
    denoiser = load_model_verbose(args.model)
    rows = accuracy_table(denoiser, args.solvers, args.nfe, options, args.n_test,
                          progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": denoiser.identity.get("name"), "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_table(rows, args.plot, f"{denoiser.identity.get('name')}")
        print(f"wrote {args.plot}")
    return 0


def calibrate_main(argv=None) -> int:
    return run_cli(_calibrate, argv)


def accuracy_main(argv=None) -> int:
    return run_cli(_accuracy, argv)


if __name__ == "__main__":
    sys.exit(calibrate_main())
