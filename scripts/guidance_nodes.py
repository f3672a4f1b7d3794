"""How many calibration nodes a guidance range needs: held-out RMSE of the interpolated sampler (compiler/scales.py)
against the sampler fitted exactly at each tested scale, for 2..6 Chebyshev-Lobatto or uniform nodes.

    PYTHONPATH=$PWD:$PWD/tests python scripts/guidance_nodes.py [--kind guide|cfg] [--nfe 5] [--solver iia-edm]

Builds the test fixtures (tests/edm_fixtures.py: the EDM2-format pair, an EDM model trained with label dropout)
in a temporary folder; fits are cached under IIA_CACHE_DIR. Prints one row per node set: the worst and mean
ratio interpolated / exact over the tested scales, and whether any scale is worse than the base.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from iia.calibration.fit import CalibrationOptions
from iia.calibration.sampling import reference_solution, sample
from iia.compiler.build import CompileOptions
from iia.compiler.coefficients import obtain_coefficients
from iia.compiler.scales import base_of, chebyshev_nodes, scale_table
from iia.models import load
from iia.runtime.contract import draw_labels, draw_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("guide", "cfg"), default="guide")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--solver", default="iia-edm")
    parser.add_argument("--lo", type=float, default=1.0)
    parser.add_argument("--hi", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    from edm_fixtures import make_edm2_pickle, make_edm_pickle

    root = Path(tempfile.mkdtemp())
    if args.kind == "guide":
        make_edm2_pickle(root / "net.pkl", label_dim=10, seed=0)
        make_edm2_pickle(root / "guide.pkl", label_dim=0, model_channels=4, seed=1)
        model = load(root / "net.pkl", guide=root / "guide.pkl", guidance=(args.lo, args.hi))
    else:
        make_edm_pickle(root / "net.pkl", label_dropout=0.1, channels=8)
        model = load(root / "net.pkl", cfg=(args.lo, args.hi))
    scales = model.guidance_range
    cal = CalibrationOptions(batch=args.batch, holdout=args.batch, reference_steps=64)
    opts = CompileOptions(nfe=args.nfe, solver=args.solver, engine=False, calibration=cal)
    fits: dict[float, object] = {}

    def fit(g: float):
        if g not in fits:
            fits[g] = obtain_coefficients(scales.at(g), args.solver, opts, lambda s: None)[1]
        return fits[g]

    tested = [float(g) for g in np.linspace(args.lo, args.hi, 11)[1:-1]]  # 9 scales strictly inside
    noise = torch.from_numpy(draw_noise(99, args.batch, model.shape)).double()
    labels = torch.from_numpy(draw_labels(99, args.batch, model.label_dim)) if model.conditional else None
    judged = {}
    for g in tested:
        den = scales.at(g)
        start = fit(g).sigmas[0]
        ref = reference_solution(den, noise, labels, 64, sigma_start=start)
        judged[g] = (den, ref)

    def rmse(program, g):
        den, ref = judged[g]
        return float(((sample(program, den, noise, labels) - ref) ** 2).mean().sqrt())

    exact = {g: rmse(fit(g), g) for g in tested}
    base = {g: rmse(base_of(fit(g)), g) for g in tested}
    print(f"{args.kind} {args.solver} nfe {args.nfe} range {args.lo:g}:{args.hi:g}; exact-fit rmse "
          f"{min(exact.values()):.4g}..{max(exact.values()):.4g}, base {min(base.values()):.4g}..{max(base.values()):.4g}")
    print("nodes  placement   worst interp/exact  mean   worse than base")
    for n in (2, 3, 4, 5, 6):
        for placement in ("chebyshev", "uniform"):
            nodes = chebyshev_nodes(args.lo, args.hi, n) if placement == "chebyshev" else \
                [float(v) for v in np.linspace(args.lo, args.hi, n)]
            table = scale_table(nodes, [fit(g) for g in nodes])
            ratios = [rmse(table.program_at(g), g) / exact[g] for g in tested]
            worse = sum(rmse(table.program_at(g), g) > base[g] for g in tested)
            print(f"{n:5d}  {placement:10s}  {max(ratios):18.4f}  {np.mean(ratios):.4f}  {worse}")


if __name__ == "__main__":
    main()
