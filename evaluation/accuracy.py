"""Accuracy benchmark: RMSE of final samples against a high-accuracy reference, per solver and NFE."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from iia.cli import distinct_int_list, option, str_list
from iia.runtime.contract import atomic_open

from iia.models.base import Denoiser
from iia.models.device import device_option

from iia.calibration.fit import CalibrationOptions, calibrate
from iia.calibration.evalset import evaluation_set, rmse
from iia.calibration.sampling import sample
from iia.calibration.schedules import program_for
from iia.calibration.solvers import get_solver, user_solver, valid_nfe

TEST_SEED_OFFSET = 104729  # the test noise is a stream distinct from calibration and guard noise


@dataclass
class AccuracyOptions:
    """`iia-accuracy`'s own options (its calibration options are CalibrationOptions), declared once."""

    solvers: list[str] = option(["edm", "biia-edm", "iia-edm", "ddim", "iia-ddim"], "solvers, comma-separated",
                                parse=str_list)
    nfe: list[int] = option([5, 7, 9, 11, 15, 19, 25, 35], "NFE values, comma-separated (EDM-family solvers use "
                            "the odd ones, DDIM-family all of them)", parse=distinct_int_list, lo=1, hi=1000)
    n_test: int = option(500, "fresh test noises", lo=2, hi=1_000_000)
    device: str = device_option()


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure written atomically (temp file + rename), format from the suffix (default png)."""
    path = Path(path)
    with atomic_open(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", dpi=120)


def accuracy_table(
    denoiser: Denoiser,
    solvers: list[str],
    nfes: list[int],
    options: CalibrationOptions | None = None,
    n_test: int = 500,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows {solver, nfe, rmse, base_rmse, ratio, guard_...} on fresh test noise (never seen by calibration).

    EDM-family solvers take odd NFE and DDIM-family any NFE >= 2; an NFE a solver cannot take is skipped.
    """
    options = (options or CalibrationOptions()).resolved(denoiser)
    for s in solvers:
        user_solver(s)
    test = evaluation_set(denoiser, n_test, options.seed + TEST_SEED_OFFSET, options.reference_steps)
    # each sampler judged from where it starts (its sigmas[0]: below sigma_max for some discrete schedules)
    noise, labels, reference_at = test.noise, test.labels, test.reference_at
    rows, base_cache = [], {}
    for solver in solvers:
        spec = get_solver(solver)
        for nfe in nfes:
            if not valid_nfe(solver, nfe):
                continue
            if progress:
                progress(f"{solver} NFE {nfe}")
            key = (spec.base, nfe)
            base_program = program_for(denoiser, spec.base, nfe, schedule=options.schedule)
            ref = reference_at(base_program.sigmas[0])
            if key not in base_cache:
                base_cache[key] = rmse(sample(base_program, denoiser, noise, labels), ref)
            base_rmse = base_cache[key]
            row = {"solver": solver, "nfe": nfe, "base": spec.base, "base_rmse": base_rmse}
            if spec.fitted:
                result = calibrate(denoiser, solver, nfe, CalibrationOptions(**vars(options)))
                row["rmse"] = rmse(sample(result.program, denoiser, noise, labels), ref)
                row["rmse_full_fit"] = rmse(sample(result.fitted_program, denoiser, noise, labels), ref)
                g = result.guard
                row.update(guard_decision=g.get("decision"), guard_rmse_base=g.get("rmse_base"),
                           guard_rmse_chosen=g.get("rmse_chosen"), calibration_s=round(result.seconds, 2))
            else:
                row["rmse"] = base_rmse
            row["ratio"] = row["rmse"] / base_rmse if base_rmse > 0 else float("nan")
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'solver':<10} {'NFE':>4} {'rmse':>10} {'base_rmse':>10} {'ratio':>7}  guard"]
    for r in rows:
        lines.append(f"{r['solver']:<10} {r['nfe']:>4} {r['rmse']:>10.5f} {r['base_rmse']:>10.5f} "
                     f"{r['ratio']:>7.3f}  {r.get('guard_decision', '')}")
    return "\n".join(lines)


def plot_table(rows: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for solver in dict.fromkeys(r["solver"] for r in rows):
        pts = [(r["nfe"], r["rmse"]) for r in rows if r["solver"] == solver]
        ax.plot(*zip(*pts), marker="o", label=solver)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMSE vs reference (held-out noise)")
    ax.set_title(title or "Sampler error vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
