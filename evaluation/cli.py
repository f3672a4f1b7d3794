"""`iia-accuracy` and `iia-bench` (iia.evaluation.bench: the sampler graph beside its baselines)."""

from __future__ import annotations

import sys
from pathlib import Path

from iia.cli import (add_options, check_options, check_output_file, cli_parser, given_options, options_from,
                     run_cli, writing_output, written)

# torch-free at import: iia-bench (bench_main) must run where only the runtime's dependencies are installed


def _accuracy(argv=None) -> int:
    from iia.calibration.cli import PICKLE_NOTE, load_model_verbose
    from iia.calibration.fit import CalibrationOptions
    from iia.calibration.solvers import check_user_solvers
    from iia.runtime.contract import write_json_atomic

    from .accuracy import AccuracyOptions, accuracy_table, format_table, plot_table
    from iia.models.device import resolve_device

    parser = cli_parser(prog="iia-accuracy", description="Sampler RMSE vs a high-accuracy reference. "
                                     + PICKLE_NOTE)
    parser.add_argument("--model", default="gmm", help="gmm (default), digits, or a path")
    add_options(parser, AccuracyOptions)
    add_options(parser, CalibrationOptions)
    parser.add_argument("--json", default=None, metavar="FILE", help="write the table (the peer report) as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE",
                        help=f"plot the table; its format from the suffix ({', '.join(PLOT_FORMATS)})")
    parser.add_argument("--peers", nargs="?", const="default", default=None, metavar="LIST",
                        help="compare with diffusers' schedulers on the same denoiser and noise (default list: "
                             "dpm++2m,dpm++3m,unipc-bh1,unipc-bh2,deis-2,deis-3,heun,lms); --solvers then "
                             "defaults to auto,ipndm")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds per auto search (with --peers; default 180)")
    parser.add_argument("--fd", action="store_true", help="with --peers on the digits model: FD-digits too")
    args = parser.parse_args(argv)
    check_options(options_from(AccuracyOptions, args))
    resolve_device(args.device)  # before loading the model: a device torch cannot see is refused by name
    # before any work: a search-only or unknown solver was refused after the peers' runs, or dropped with --peers
    check_user_solvers(args.solvers, "--solvers", allow_auto=bool(args.peers))
    given = given_options(parser, argv)
    if args.peers:
        return _peers(args, given)
    peers_only = [flag for flag, dest in (("--budget", "budget"), ("--fd", "fd")) if dest in given]
    if peers_only:
        raise ValueError(f"{', '.join(peers_only)} {'applies' if len(peers_only) == 1 else 'apply'} with --peers only")
    options = options_from(CalibrationOptions, args)
    options.validate()
    _refuse_fit_flags_without_a_fit(parser, given, args.solvers)
    _check_nfes(args.solvers, args.nfe, options.reference_steps)
    check_json_file(args.json)
    check_plot_file(args.plot)
    denoiser = load_model_verbose(args.model, device=args.device)
    rows = accuracy_table(denoiser, args.solvers, args.nfe, options, args.n_test,
                          progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        with writing_output("--json", args.json):
            write_json_atomic(args.json, {"model": denoiser.identity.get("name"), "rows": rows})
        written(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_table(rows, args.plot, f"{denoiser.identity.get('name')}")
        written(args.plot)
        print(f"wrote {args.plot}")
    return 0


# Roles of CalibrationOptions only a fit reads (here --seed, role "seed", draws the test noise, and
# --reference-steps, role "reference", sets the test's reference: they serve base solvers too)
FIT_ONLY = ("fit", "research", "guard")


def _refuse_fit_flags_without_a_fit(parser, given: set[str], solvers) -> None:
    """--M and the like set IIA fits: with only base solvers listed they would be ignored, so refuse them
    (`given`: the dests the command line set, iia.cli.given_options)."""
    from iia.calibration.fit import CalibrationOptions
    from iia.calibration.solvers import get_solver
    from iia.cli import with_role

    if any(get_solver(s).fitted for s in solvers):
        return
    fit_only = with_role(CalibrationOptions, *FIT_ONLY)
    flags = [a.option_strings[0] for a in parser._actions if a.dest in fit_only and a.dest in given]
    if flags:
        raise ValueError(f"--solvers {','.join(solvers)} fits nothing: {', '.join(flags)} "
                         f"{'does' if len(flags) == 1 else 'do'} not apply (they set IIA fits)")


def _check_nfes(solvers: list[str], nfes: list[int], reference_steps: int | None) -> None:
    """Before any work: at least one listed solver can spend one of `nfes` (else the table would be empty), and a
    given --reference-steps can judge the largest NFE measured (`check_reference_steps`)."""
    from iia.calibration.fit import check_reference_steps
    from iia.calibration.solvers import get_solver, valid_nfe

    measured = [n for n in nfes if any(valid_nfe(s, n) for s in solvers)]
    if not measured:
        def why(solver):  # its rule, in its own words ("solver 'edm' needs an odd NFE >= 3 ..., got 4")
            try:
                get_solver(solver).steps_for_nfe(nfes[0])
            except ValueError as err:
                return str(err)

        raise ValueError(f"--solvers {','.join(solvers)} --nfe {','.join(map(str, nfes))}: no listed solver can "
                         f"spend any of these NFEs ({'; '.join(map(why, dict.fromkeys(solvers)))}); nothing to measure")
    check_reference_steps(reference_steps, max(measured))


def _peers(args, given: set[str]) -> int:
    from iia.calibration.cli import load_model_verbose
    from iia.calibration.fit import CalibrationOptions
    from iia.cli import str_list
    from iia.runtime.contract import write_json_atomic
    from iia.calibration.search import SearchOptions

    from .peers import (DEFAULT_PEERS, format_peer_table, markdown_peer_table, markdown_summary, peer_benchmark,
                        plot_peers)

    solvers = args.solvers if "solvers" in given else ["auto", "ipndm"]
    if "budget" in given and "auto" not in solvers:
        raise ValueError(f"--budget bounds the auto search; --solvers {','.join(solvers)} runs none (drop --budget, "
                         f"or list auto)")
    peers = list(DEFAULT_PEERS) if args.peers == "default" else str_list(args.peers)
    options = options_from(CalibrationOptions, args)
    options.validate()
    search = SearchOptions(budget_s=args.budget)
    search.validate()
    check_json_file(args.json)
    check_plot_file(args.plot)
    denoiser = load_model_verbose(args.model, device=args.device)
    report = peer_benchmark(denoiser, args.nfe, solvers, peers, args.n_test, options, search, fd=args.fd,
                            progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    print(format_peer_table(report))
    print(markdown_peer_table(report), file=sys.stderr)
    if "auto" in solvers:
        print(markdown_summary(report))
    if args.json:
        with writing_output("--json", args.json):
            write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    if args.plot:
        plot_peers(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg")


def check_json_file(path: str | None, flag: str = "--json") -> None:
    """A report file before any work: an output file (`check_output_file`) outside every iia artifact (an existing
    file is replaced, atomically: reports are not artifacts)."""
    from iia.runtime.contract import refuse_inside_artifact

    if check_output_file(path, flag) is not None:
        refuse_inside_artifact(path, flag)


def check_plot_file(path: str | None) -> None:
    """`--plot` before any work: a report file (`check_json_file`) whose suffix names a format it can write
    (matplotlib's error for `x.txt` came after the whole run)."""
    check_json_file(path, "--plot")
    if path is not None and Path(path).suffix.lower() not in PLOT_FORMATS:
        raise ValueError(f"--plot {path}: the plot's format comes from its suffix, one of {', '.join(PLOT_FORMATS)}")


def accuracy_main(argv=None) -> int:
    return run_cli(_accuracy, argv)


def _bench(argv=None) -> int:
    from dataclasses import fields

    from iia.cli import flag_of
    from iia.runtime.cli import outside_artifact
    from iia.runtime.contract import refuse_inside_artifact, write_json_atomic

    from .bench import BenchOptions, format_table, run_bench

    parser = cli_parser(
        prog="iia-bench",
        description="Latency of a compiled sampler per batch size: p50/p90/p99, images/s, the overhead ratio "
                    "sampler / (NFE x one denoiser call [+ one decoder call]) on the same backend (at most 1.0 "
                    "wanted; below 1 where the compiler folded per-call work away), and the speed-ups over "
                    "a numpy loop around the same denoiser.onnx and over the PyTorch eager sampler (same solver, "
                    "coefficients, device and threads).")
    parser.add_argument("artifact", metavar="DIR", help="artifact directory written by iia-compile")
    add_options(parser, BenchOptions)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    opts = options_from(BenchOptions, args)
    opts.batches = tuple(opts.batches)
    opts.validate()
    given = given_options(parser, argv)
    eager_only = [flag_of(f) for f in fields(BenchOptions) if f.metadata.get("role") == "eager" and f.name in given]
    if not opts.eager and eager_only:
        raise ValueError(f"--no-eager runs no PyTorch eager loop: {', '.join(eager_only)} "
                         f"{'does' if len(eager_only) == 1 else 'do'} not apply")
    outside_artifact(check_output_file(args.json, "--json"), args.artifact, "--json")  # the artifact read, as named
    if args.json is not None:
        refuse_inside_artifact(args.json, "--json")  # and any other
    rows = run_bench(args.artifact, opts, log=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        with writing_output("--json", args.json):
            write_json_atomic(Path(args.json), rows)
        written(args.json)
        print(f"wrote {args.json}")
    return 0


def bench_main(argv=None) -> int:
    """`iia-bench`: the sampler graph and its baselines (iia.evaluation.bench)."""
    return run_cli(_bench, argv)
