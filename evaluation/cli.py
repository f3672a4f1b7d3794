"""`iia-accuracy` and `iia-bench` (the latter: iia.runtime's benchmark plus the PyTorch eager reference)."""

from __future__ import annotations

import argparse
import sys

from iia.cli import add_options, check_options, check_output_file, options_from, run_cli, written

# torch-free at import: iia-bench (bench_main) must run where only the runtime's dependencies are installed


def _accuracy(argv=None) -> int:
    from iia.calibration.cli import PICKLE_NOTE, load_model_verbose
    from iia.calibration.fit import CalibrationOptions
    from iia.runtime.contract import write_json_atomic

    from .accuracy import AccuracyOptions, accuracy_table, format_table, plot_table

    parser = argparse.ArgumentParser(prog="iia-accuracy", description="Sampler RMSE vs a high-accuracy reference. "
                                     + PICKLE_NOTE)
    parser.add_argument("--model", default="gmm", help="gmm (default), digits, or a path")
    add_options(parser, AccuracyOptions)
    add_options(parser, CalibrationOptions)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    check_options(options_from(AccuracyOptions, args))
    options = options_from(CalibrationOptions, args)
    options.validate()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    denoiser = load_model_verbose(args.model)
    rows = accuracy_table(denoiser, args.solvers, args.nfe, options, args.n_test,
                          progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        write_json_atomic(args.json, {"model": denoiser.identity.get("name"), "rows": rows})
        written(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_table(rows, args.plot, f"{denoiser.identity.get('name')}")
        written(args.plot)
        print(f"wrote {args.plot}")
    return 0


def accuracy_main(argv=None) -> int:
    return run_cli(_accuracy, argv)


def bench_main(argv=None) -> int:
    """`iia-bench`: `iia.runtime.bench` with the eager PyTorch reference of `iia.evaluation.eager`."""
    from iia.runtime.cli import bench

    from .eager import eager_factory

    return run_cli(lambda a: bench(a, eager_factory), argv)
