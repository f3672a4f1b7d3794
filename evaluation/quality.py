"""`iia-quality`: sample quality of each solver and NFE on the bundled digits model, measured by FD-digits.

FD-digits is the Frechet distance between Gaussian fits of the bundled digit classifier's penultimate
features (`iia.models.zoo.fd`), generated samples vs all 1,797 real digits. It is the FID recipe with a small
digit CNN in place of Inception: it is NOT FID, and its numbers are not comparable to FID numbers.

For every solver and NFE the same `n` class-conditional samples are drawn from one fixed noise (a seeded
stream distinct from calibration's, the guard's and `iia-accuracy`'s) with balanced labels (seed + k) mod 10 (the contract's `draw_labels`).
Each row reports
  - fd_digits (samples clamped to [-1, 1], as written out as images) and a bootstrap standard error,
  - accuracy: the bundled classifier's agreement with the label the sample was conditioned on,
  - rmse: the error of the raw samples against a high-accuracy reference solution from the same noise
    (Heun on a fine Karras grid, computed once). That reference is also a sampler in its own right: its
    FD-digits is the model's own limit (what any ODE solver converges to), reported as the row
    `solver="reference"`, and every row carries fd_ratio_to_reference.
`--onnx-check NFE` compiles the iia-edm sampler at that NFE (from the coefficients calibrated here) into one
ONNX graph, runs it with ONNX Runtime on the same noise and labels, and compares: the graph is the sampler.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from iia.models.base import Denoiser

from iia.calibration.fit import CalibrationOptions, calibrate, draw_noise
from iia.calibration.evalset import rmse
from iia.calibration.sampling import reference_solution, sample
from iia.calibration.schedules import program_for
from iia.calibration.solvers import Program, check_user_solvers, get_solver, valid_nfe
from iia.cli import distinct_int_list, option, str_list, writing_output

from .quality_figures import GRID_SAMPLES, NUM_CLASSES, plot_quality, save_comparison_grid

METRIC = ("FD-digits: Frechet distance between Gaussian fits of the bundled digit classifier's 128-d "
          "penultimate features, samples vs all 1,797 real digits (not FID; not comparable to FID)")
# Default first image seed of the quality samples: far from calibration's (seed..), the guard's (seed + 10**6..)
# and iia-accuracy's; `iia-sample ARTIFACT --seed 15485863 --n N` draws the very same noise and labels.
QUALITY_SAMPLE_SEED = 15485863
BOOTSTRAP = 20  # resamples for the FD-digits standard error


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_digits_model(denoiser: Denoiser) -> None:
    if tuple(denoiser.shape) != (1, 8, 8) or denoiser.label_dim != NUM_CLASSES:
        raise ValueError(f"iia-quality measures FD-digits, which needs a class-conditional 8x8 digits model "
                         f"(shape [1, 8, 8], {NUM_CLASSES} classes) such as the bundled 'digits'; got "
                         f"shape {list(denoiser.shape)} with label_dim {denoiser.label_dim}")


def quality_noise(denoiser: Denoiser, n: int, seed: int = QUALITY_SAMPLE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation noise (float64) and labels of images seed..seed+n-1 by the contract's convention (labels
    (seed + k) mod 10: balanced): exactly what `iia-sample --seed SEED --n N` feeds the compiled sampler."""
    return draw_noise(denoiser, n, seed)


def sample_chunked(program: Program, denoiser: Denoiser, noise: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 500) -> torch.Tensor:
    """`sample` over `chunk` noises at a time (bounds memory); float32 [N, *shape]."""
    outs = [sample(program, denoiser, noise[s:s + chunk], labels[s:s + chunk]).to(torch.float32)
            for s in range(0, noise.shape[0], chunk)]
    return torch.cat(outs)


def fd_bootstrap_se(samples: torch.Tensor, resamples: int = BOOTSTRAP, seed: int = 0) -> float:
    """Bootstrap standard error of FD-digits (resampling the generated set; real statistics fixed)."""
    from iia.models.zoo.classifier import features
    from iia.models.zoo.fd import frechet_distance, real_stats

    feats = features(samples.clamp(-1.0, 1.0)).to(torch.float64).numpy()
    mu_r, cov_r = real_stats()
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        f = feats[rng.integers(0, len(feats), len(feats))]
        values.append(frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu_r, cov_r))
    return float(np.std(values, ddof=1))


def metrics(samples: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None) -> dict:
    """fd_digits (clamped to [-1, 1]), its bootstrap s.e., classifier accuracy vs labels, rmse vs ref."""
    from iia.models.zoo import fd_digits, predict

    images = samples.clamp(-1.0, 1.0)
    return {
        "fd_digits": fd_digits(images),
        "fd_digits_se": fd_bootstrap_se(samples),
        "accuracy": float((predict(images) == labels).to(torch.float64).mean()),
        "rmse": rmse(samples, ref) if ref is not None else 0.0,
    }


@dataclass
class QualityOptions:
    """`iia-quality`'s own options (its calibration options are CalibrationOptions), declared once."""

    solvers: list[str] = option(["edm", "biia-edm", "iia-edm", "ddim", "iia-ddim"], "solvers, comma-separated",
                                parse=str_list)
    nfe: list[int] = option([5, 7, 9, 11, 15, 19, 35], "NFE values, comma-separated (EDM-family solvers use the odd "
                            "ones, DDIM-family all of them)", parse=distinct_int_list, lo=1, hi=1000)
    n: int = option(2000, "samples per solver and NFE (>= 2: FD-digits needs a covariance)", lo=2, hi=1_000_000)
    chunk: int = option(500, "samples per sampling batch", lo=1, hi=100_000)
    onnx_check: int = option(9, "compile iia-edm at this NFE to ONNX and compare its samples (0 skips)", lo=0, hi=1000)
    sample_seed: int = option(QUALITY_SAMPLE_SEED, "first image seed of the samples (iia-sample --seed S draws the "
                                                   "same noise)", lo=0, hi=2**62)


def validate_request(solvers: list[str], nfes: list[int], n: int, chunk: int = 500,
                     onnx_check: int | None = None) -> list[tuple[str, int]]:
    """The (solver, NFE) combinations to run, or ValueError for bad input (before anything is loaded)."""
    check_user_solvers(solvers, "--solvers")
    if n < 2:
        raise ValueError(f"--n must be >= 2 (FD-digits needs a covariance), got {n}")
    if chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {chunk}")
    combos = [(s, nfe) for s in solvers for nfe in nfes if valid_nfe(s, nfe)]
    if not combos:
        raise ValueError(f"no valid solver/NFE combination among solvers {','.join(solvers)} and NFE "
                         f"{','.join(map(str, nfes))} (EDM-family solvers need odd NFE >= 3)")
    if onnx_check:
        get_solver("iia-edm").steps_for_nfe(onnx_check)
    return combos


def _reference(denoiser: Denoiser, noise: torch.Tensor, labels: torch.Tensor, steps: int, chunk: int,
               say) -> tuple[torch.Tensor, dict]:
    """The reference solution float32 [N, 1, 8, 8] (Heun on `steps` Karras steps) and its row: a sampler in its
    own right, whose FD-digits is the model's own limit."""
    say(f"reference: Heun, {steps} Karras steps ({2 * steps - 1} NFE), {noise.shape[0]} samples")
    t0 = time.perf_counter()
    ref = reference_solution(denoiser, noise, labels, steps=steps, chunk=chunk).to(torch.float32)
    row = {"solver": "reference", "nfe": 2 * steps - 1, "base": "edm", **metrics(ref, labels, None),
           "sample_s": round(time.perf_counter() - t0, 2)}
    row.update(base_fd_digits=row["fd_digits"], fd_ratio_to_reference=1.0)
    say(f"  reference FD-digits {row['fd_digits']:.4f}")
    return ref, row


@dataclass
class _Rows:
    """What every row of one quality table shares: the model, the fixed noise and labels, the reference, and the
    caches (base solvers' metrics by (base, NFE), calibrations by (solver, NFE))."""

    denoiser: Denoiser
    noise: torch.Tensor
    labels: torch.Tensor
    ref: torch.Tensor
    ref_fd: float
    options: CalibrationOptions
    chunk: int
    say: Callable[[str], None]
    calibration_progress: Callable | None
    base: dict = field(default_factory=dict)
    calibrations: dict = field(default_factory=dict)

    def measure(self, program: Program) -> tuple[torch.Tensor, dict]:
        t = time.perf_counter()
        x = sample_chunked(program, self.denoiser, self.noise, self.labels, self.chunk)
        m = metrics(x, self.labels, self.ref)
        m["sample_s"] = round(time.perf_counter() - t, 2)
        return x, m

    def row(self, solver: str, nfe: int) -> tuple[dict, torch.Tensor]:
        """(row, samples float32 [N, 1, 8, 8]) of `solver` at `nfe`, calibrating it first if it is fitted."""
        spec, options = get_solver(solver), self.options
        self.say(f"{solver} NFE {nfe}")
        key = (spec.base, nfe)
        row = {"solver": solver, "nfe": nfe, "base": spec.base}
        if spec.fitted:
            result = calibrate(self.denoiser, solver, nfe, CalibrationOptions(**vars(options)),
                               progress=self.calibration_progress)
            self.calibrations[(solver, nfe)] = result
            x, m = self.measure(result.program)
            row.update(m, guard_decision=result.guard.get("decision"), calibration_s=round(result.seconds, 2))
        else:
            x, m = self.measure(program_for(self.denoiser, solver, nfe, schedule=options.schedule))
            row.update(m)
            self.base[key] = m
        if key not in self.base:
            self.say(f"  base {spec.base} NFE {nfe}")
            self.base[key] = self.measure(program_for(self.denoiser, spec.base, nfe, schedule=options.schedule))[1]
        row["base_fd_digits"] = self.base[key]["fd_digits"]
        row["base_rmse"] = self.base[key]["rmse"]
        row["fd_ratio_to_reference"] = row["fd_digits"] / self.ref_fd if self.ref_fd > 0 else float("nan")
        self.say(f"  FD-digits {row['fd_digits']:.4f}  rmse {row['rmse']:.5f}  accuracy {row['accuracy']:.4f}")
        return row, x


def _save_grids(grid_samples: dict[int, list], ref: torch.Tensor, ref_nfe: int, grids_dir: str | Path) -> list[str]:
    """One comparison PNG per NFE (its solvers' panels, then the reference's) in `grids_dir`; their paths."""
    grids = []
    for nfe in sorted(grid_samples):
        panels = grid_samples[nfe] + [(f"reference ({ref_nfe} NFE)", ref[:GRID_SAMPLES])]
        panels = [(name if name.startswith("reference") else f"{name} NFE {nfe}", x) for name, x in panels]
        grids.append(str(save_comparison_grid(panels, Path(grids_dir) / f"quality_grid_nfe{nfe}.png")))
    return grids


def quality_table(
    denoiser: Denoiser,
    solvers: list[str],
    nfes: list[int],
    n: int = 2000,
    options: CalibrationOptions | None = None,
    chunk: int = 500,
    grids_dir: str | Path | None = None,
    onnx_check: int | None = None,
    progress: Callable[[str], None] | None = _log,
    calibration_progress: Callable | None = None,
    sample_seed: int = QUALITY_SAMPLE_SEED,
) -> dict:
    """FD-digits, accuracy and RMSE per solver and NFE on fixed noise; see the module docstring.

    Returns {"metric", "model", "n", "noise_seed", "reference_steps", "rows", "grids", "onnx_check", "seconds"}.
    EDM-family solvers take odd NFE only; combinations a solver cannot take are skipped (as in iia-accuracy).
    """
    started = time.perf_counter()
    say = progress or (lambda text: None)
    check_digits_model(denoiser)
    options = (options or CalibrationOptions()).resolved(denoiser)
    options.validate()
    combos = validate_request(solvers, nfes, n, chunk, onnx_check)
    skipped = [(s, nfe) for s in solvers for nfe in nfes if not valid_nfe(s, nfe)]
    if skipped:
        say("skipping (NFE not valid for the solver): " + ", ".join(f"{s}@{nfe}" for s, nfe in skipped))

    noise, labels = quality_noise(denoiser, n, sample_seed)
    ref, ref_row = _reference(denoiser, noise, labels, options.reference_steps, chunk, say)
    table = _Rows(denoiser, noise, labels, ref, ref_row["fd_digits"], options, chunk, say, calibration_progress)
    grid_samples: dict[int, list[tuple[str, torch.Tensor]]] = {}
    rows, kept = [], None
    for solver, nfe in combos:
        row, x = table.row(solver, nfe)
        rows.append(row)
        grid_samples.setdefault(nfe, []).append((solver, x[:GRID_SAMPLES].clone()))
        if solver == "iia-edm" and nfe == onnx_check:
            kept = x
    rows.append(ref_row)
    grids = [] if grids_dir is None else _save_grids(grid_samples, ref, ref_row["nfe"], grids_dir)

    onnx = None
    if onnx_check:
        onnx = onnx_parity(denoiser, onnx_check, options, noise, labels, ref, ref_row["fd_digits"],
                           table.calibrations.get(("iia-edm", onnx_check)), kept, chunk, say, calibration_progress)
    return {
        "metric": METRIC,
        "model": denoiser.identity.get("name"),
        "sha256": denoiser.identity.get("sha256"),
        "n": n,
        "labels": "(noise_seed + k) mod 10",
        "noise_seed": sample_seed,
        "reference_steps": options.reference_steps,
        "calibration": {k: v for k, v in vars(options).items()},
        "versions": _versions(),
        "rows": rows,
        "grids": grids,
        "onnx_check": onnx,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _versions() -> dict:
    from iia.calibration import artifact

    return artifact.library_versions()


def onnx_parity(denoiser, nfe, options, noise, labels, ref, ref_fd, result, torch_samples, chunk, say,
                calibration_progress=None) -> dict:
    """Compile iia-edm at `nfe` to ONNX (coefficients from `result`), run it on the same noise, compare."""
    import iia.runtime
    from iia.compiler.build import CompileOptions, compile_model

    from iia.calibration import artifact

    say(f"ONNX check: iia-edm NFE {nfe}")
    if result is None:
        result = calibrate(denoiser, "iia-edm", nfe, CalibrationOptions(**vars(options)),
                           progress=calibration_progress)
    if torch_samples is None:
        torch_samples = sample_chunked(result.program, denoiser, noise, labels, chunk)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="iia-quality-") as tmp:
        coefficients = Path(tmp) / f"iia-edm-nfe{nfe}.json"
        artifact.save(result, denoiser, nfe, coefficients)
        compile_model(denoiser, Path(tmp) / "artifact",
                      CompileOptions(nfe=nfe, solver="iia-edm", force=True, engine=False,
                                     coefficients=str(coefficients)),
                      log=lambda text: say(f"  {text}"))
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        sampler = iia.runtime.load(Path(tmp) / "artifact", backend="onnxruntime-cpu", threads=torch.get_num_threads())
        try:
            noise32 = noise.to(torch.float32).numpy()
            lab = labels.numpy()
            step = sampler.max_batch
            outs = [sampler(noise32[s:s + step], class_labels=lab[s:s + step]) for s in range(0, len(noise32), step)]
        finally:
            sampler.close()
    onnx_samples = torch.from_numpy(np.concatenate(outs))
    run_s = time.perf_counter() - t
    m_torch = metrics(torch_samples, labels, ref)
    m_onnx = metrics(onnx_samples, labels, ref)
    diff = abs(m_onnx["fd_digits"] - m_torch["fd_digits"])
    check = {
        "solver": "iia-edm",
        "nfe": nfe,
        "backend": "onnxruntime-cpu",
        "fd_digits_pytorch": m_torch["fd_digits"],
        "fd_digits_onnx": m_onnx["fd_digits"],
        "fd_digits_abs_diff": diff,
        "fd_digits_se": m_torch["fd_digits_se"],
        "equal_within_noise": bool(diff <= m_torch["fd_digits_se"]),
        "max_abs_diff": float((onnx_samples - torch_samples).abs().max()),
        "rmse_onnx_vs_pytorch": rmse(onnx_samples, torch_samples),
        "accuracy_pytorch": m_torch["accuracy"],
        "accuracy_onnx": m_onnx["accuracy"],
        "rmse_pytorch": m_torch["rmse"],
        "rmse_onnx": m_onnx["rmse"],
        "fd_ratio_to_reference_onnx": m_onnx["fd_digits"] / ref_fd if ref_fd > 0 else float("nan"),
        "compile_s": round(compile_s, 2),
        "onnx_sample_s": round(run_s, 2),
    }
    say(f"  FD-digits PyTorch {check['fd_digits_pytorch']:.4f}, ONNX {check['fd_digits_onnx']:.4f}; "
        f"max abs diff {check['max_abs_diff']:.3g}")
    return check


def format_table(report: dict) -> str:
    lines = [f"FD-digits (not FID), n = {report['n']}, reference = Heun {report['reference_steps']} steps",
             f"{'solver':<10} {'NFE':>4} {'FD-digits':>10} {'+-se':>7} {'x ref':>6} {'base FD':>9} "
             f"{'rmse':>9} {'base rmse':>9} {'accuracy':>8}  guard"]
    for r in report["rows"]:
        lines.append(f"{r['solver']:<10} {r['nfe']:>4} {r['fd_digits']:>10.4f} {r['fd_digits_se']:>7.4f} "
                     f"{r['fd_ratio_to_reference']:>6.2f} {r['base_fd_digits']:>9.4f} {r['rmse']:>9.5f} "
                     f"{r.get('base_rmse', 0.0):>9.5f} {r['accuracy']:>8.4f}  {r.get('guard_decision', '')}")
    c = report.get("onnx_check")
    if c:
        lines.append(f"ONNX check (iia-edm NFE {c['nfe']}, {c['backend']}): FD-digits PyTorch "
                     f"{c['fd_digits_pytorch']:.4f} vs ONNX {c['fd_digits_onnx']:.4f} (|diff| "
                     f"{c['fd_digits_abs_diff']:.2g}, se {c['fd_digits_se']:.2g}: "
                     f"{'equal within noise' if c['equal_within_noise'] else 'DIFFERENT'}); max abs sample diff "
                     f"{c['max_abs_diff']:.3g}; accuracy {c['accuracy_pytorch']:.4f} vs {c['accuracy_onnx']:.4f}")
    return "\n".join(lines)


def _main(argv=None) -> int:
    from iia.cli import ProgressBar, check_options, check_output_file, written

    from iia.calibration.cli import load_model_verbose
    from iia.cli import add_options, cli_parser, options_from
    from iia.runtime.contract import refuse_inside_artifact, write_json_atomic

    parser = cli_parser(
        prog="iia-quality",
        description="Sample quality per solver and NFE on the digits model: FD-digits (a Frechet distance in the "
                    "bundled digit classifier's features; not FID), classifier accuracy and RMSE vs a "
                    "high-accuracy reference.")  # digits or a .pt: no pickle note (tester-42)
    parser.add_argument("model", nargs="?", default="digits",
                        help="'digits' (bundled, default) or a retrained digits .pt checkpoint")
    add_options(parser, QualityOptions)
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--plot", default=None, help="FD-digits vs NFE plot (PNG)")
    parser.add_argument("--grids", default=None, metavar="DIR",
                        help="one PNG per NFE with side-by-side sample grids per solver and the reference")
    add_options(parser, CalibrationOptions)
    args = parser.parse_args(argv)

    check_options(options_from(QualityOptions, args))
    options = options_from(CalibrationOptions, args)
    options.validate()
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if check_output_file(path, flag) is not None:
            refuse_inside_artifact(path, flag)
    if args.grids is not None:
        refuse_inside_artifact(args.grids, "--grids", directory=True)
    validate_request(args.solvers, args.nfe, args.n, args.chunk, args.onnx_check)  # fail fast, before loading
    denoiser = load_model_verbose(args.model)
    if args.onnx_check:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # no "Removing initializer" warnings per session
    bar = ProgressBar("calibrating")

    def calibration_progress(done, total, text=""):
        bar(done, total, text)
        if done == total:
            bar.close()

    report = quality_table(denoiser, args.solvers, args.nfe, args.n, options, args.chunk, args.grids,
                           args.onnx_check or None, progress=_log, calibration_progress=calibration_progress,
                           sample_seed=args.sample_seed)
    bar.close()
    print(format_table(report))
    for path in report["grids"]:
        written(path)
        print(f"wrote {path}")
    if args.json:
        report["command"] = "iia-quality " + " ".join(sys.argv[1:] if argv is None else argv)
        with writing_output("--json", args.json):
            write_json_atomic(args.json, report)
        written(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_quality(report, args.plot)
        written(args.plot)
        print(f"wrote {args.plot}")
    print(f"total {report['seconds']:.0f} s")
    return 0


def main(argv=None) -> int:
    from iia.cli import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
