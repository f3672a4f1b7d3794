"""`iia-calibrate`, and the model argument and pickle warning every CLI shares."""

from __future__ import annotations

import argparse
import sys

from dataclasses import dataclass, fields

from iia.cli import (ProgressBar, add_options, check_options, check_output_file, cli_parser, default_output,
                     flag_of, given_options, option, options_from, run_cli, stage, written)

from iia.models.device import describe_device, device_option, resolve_device
from iia.runtime.contract import refuse_inside_artifact

from .fit import CalibrationOptions, check_reference_steps
from .solvers import SOLVERS, check_history, user_solvers


@dataclass
class CalibrateTarget:
    """What `iia-calibrate` fits: solver and NFE (bounds as iia-compile's)."""

    solver: str = option("iia-edm", "an IIA variant: " + ", ".join(user_solvers(fitted=True)))
    nfe: int = option(9, "denoiser calls of the sampler", lo=1, hi=1000)
    device: str = device_option()

PICKLE_NOTE = ("Loading an EDM .pkl executes code stored in the pickle (inherent to the format): "
               "load only checkpoints you trust. The sha256 of what was loaded is printed.")


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = "gmm") -> None:
    parser.add_argument("model", nargs="?" if default else None, default=default,
                        help="EDM .pkl, diffusers folder, bundled 'digits', or "
                             "'gmm[:components=10,spread=0.5,seed=0,d=64]'" + (f" (default {default})" if default else ""))
    parser.add_argument("--x0-clipping", default=None, choices=("ignore", "clip"),
                        help="a diffusers scheduler with clip_sample/thresholding is refused unless told: 'ignore' "
                             "(sample without it) or 'clip' (clamp D, clip_sample only)")


def load_model_verbose(spec, x0_clipping=None, device: str = "cpu"):
    """The model (`spec`), its description on stderr, its network on `device` (--device: auto, cpu, cuda[:N])."""
    from iia.models import load

    device = resolve_device(device)
    denoiser = load(spec, x0_clipping).to(device)
    print(f"model: {denoiser.describe()}", file=sys.stderr)
    if device.type != "cpu":
        print(f"PyTorch work on {describe_device(device)}", file=sys.stderr)
    for line in denoiser.report:
        print(f"  {line}", file=sys.stderr)
    if denoiser.identity.get("sha256"):
        print(f"sha256: {denoiser.identity['sha256']}", file=sys.stderr)
    return denoiser


def _calibrate(argv=None) -> int:
    parser = cli_parser(prog="iia-calibrate", description="Fit IIA coefficients. " + PICKLE_NOTE)
    add_model_argument(parser)
    add_options(parser, CalibrateTarget)
    add_options(parser, CalibrationOptions)
    parser.add_argument("--out", default=None, help="coefficient JSON (default: <model>-<solver>-nfe<N>.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    from . import artifact
    from .fit import calibrate, calibration_line
    from .schedules import program_for

    check_options(options_from(CalibrateTarget, args))
    resolve_device(args.device)  # before any work: a device torch cannot see is refused by name
    options = options_from(CalibrationOptions, args)
    options.validate()
    given = given_options(parser, argv)
    guard_only = [flag_of(f) for f in fields(CalibrationOptions)  # the reference serves the guard only here
                  if f.metadata.get("role") in ("guard", "reference") and f.name in given]
    if not options.guard and guard_only:
        raise ValueError(f"--no-guard runs no held-out guard: {', '.join(guard_only)} "
                         f"{'does' if len(guard_only) == 1 else 'do'} not apply")
    out = check_output_file(default_output(args.model, args.solver, args.nfe, ".json") if args.out is None
                            else args.out, "--out")
    refuse_inside_artifact(out, "--out")  # cy/coefficients.json would replace an artifact's own, unlisted
    if out.exists() and not args.force:  # before any work, as iia-compile refuses an existing directory
        raise ValueError(f"--out {out}: exists: pass --force to replace it, or another --out")
    program_for_check = args.solver, args.nfe
    if args.solver not in user_solvers(fitted=True):  # before loading the model
        search_only = args.solver in SOLVERS and SOLVERS[args.solver].search_only
        raise ValueError(f"--solver {args.solver}: "
                         + ("a search-only solver (fitted by iia-compile's auto search); " if search_only else "")
                         + f"iia-calibrate fits an IIA variant: {', '.join(user_solvers(fitted=True))}")
    try:
        SOLVERS[args.solver].steps_for_nfe(args.nfe)
    except ValueError as err:
        raise ValueError(f"--nfe {args.nfe}: {err}") from None
    if "r" in given:
        check_history(args.solver, args.nfe, options.r)
    if options.guard:  # the guard's reference (--no-guard computes none)
        check_reference_steps(options.reference_steps, args.nfe)
    denoiser = load_model_verbose(args.model, args.x0_clipping, args.device)
    program_for(denoiser, *program_for_check)  # fail fast on an invalid NFE/solver
    bar = ProgressBar("calibrating")
    print(f"  {calibration_line(denoiser, args.solver, args.nfe, options)}", file=sys.stderr, flush=True)
    with stage(f"calibrate {args.solver} NFE {args.nfe}"):
        result = calibrate(denoiser, args.solver, args.nfe, options, progress=bar)
    bar.close()
    artifact.save(result, denoiser, args.nfe, out)
    written(out)
    g = result.guard
    if g:
        print(f"held-out end-to-end rmse: base {g['rmse_base']:.5g}, full fit {g['rmse_fitted']:.5g}, "
              f"shipped {g['rmse_chosen']:.5g} ({g['decision']})")
    else:
        print("no held-out guard (--no-guard): the raw fit is written unchecked against its base solver; "
              "iia-compile --coefficients will say so")
    print(f"wrote {out}")
    return 0


def calibrate_main(argv=None) -> int:
    return run_cli(_calibrate, argv)


if __name__ == "__main__":
    sys.exit(calibrate_main())
