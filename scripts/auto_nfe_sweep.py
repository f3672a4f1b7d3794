"""`auto` at each NFE and every fitted candidate it scored, on iia-accuracy's 500 test noises: is the shipped
sampler's test RMSE non-increasing in NFE, and which candidate would have been better?

    python scripts/auto_nfe_sweep.py gmm [--nfe 4,5,6,7,8,9,10] [--budget 180] [--ridge R] [--loss mse|l2]
        [--basis both|linear|family] [--n-test 500]

Prints, per NFE, the shipped candidate's test RMSE and each fitted candidate's `held-out/test` RMSE (`*` marks
the shipped one), then the rises. `--ridge` replaces the global fit's ridge (search_fits.fit_global) for this run;
`--basis` what the global fits fit (SearchOptions.basis).
gmm's search is bounded by its evaluation counts (seconds of its budget), so its numbers do not depend on load;
a network's do.
"""

from __future__ import annotations

import argparse
import functools
import time

import iia.calibration.search as search
import iia.calibration.search_fits as search_fits
from iia.calibration.evalset import evaluation_set
from iia.calibration.fit import CalibrationOptions
from iia.calibration.sampling import sample
from iia.evaluation.accuracy import TEST_SEED_OFFSET
from iia.models import load


def test_rmse(program, denoiser, test, first: int | None = None) -> float:
    """RMSE on the test noises (the first `first` of them: iia-accuracy's 500 are the first 500 of any count)."""
    x = sample(program, denoiser, test.noise[:first], None if test.labels is None else test.labels[:first])
    return float(((x - test.reference_at(program.sigmas[0])[:first]) ** 2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--nfe", default="4,5,6,7,8,9,10")
    parser.add_argument("--budget", type=float, default=180.0)
    parser.add_argument("--ridge", type=float, default=None)
    parser.add_argument("--loss", default="mse", choices=("mse", "l2"))
    parser.add_argument("--basis", default=search.SearchOptions.basis, choices=("both", "linear", "family"))
    parser.add_argument("--n-test", type=int, default=500)
    args = parser.parse_args()
    if args.ridge is not None:
        search_fits.fit_global = functools.partial(search_fits.fit_global, ridge=args.ridge)
    denoiser, cal = load(args.model), CalibrationOptions()
    resolved = cal.resolved(denoiser)
    test = evaluation_set(denoiser, args.n_test, resolved.seed + TEST_SEED_OFFSET, resolved.reference_steps)
    shipped, first500 = [], []
    for nfe in map(int, args.nfe.split(",")):
        t0 = time.perf_counter()
        res = search.auto_search(denoiser, nfe, search.SearchOptions(budget_s=args.budget, loss=args.loss,
                                                                               basis=args.basis), cal)
        cells = []
        for c in res.candidates:
            if c.schedule == "karras" and c.coefficients == "base" and c is not res.chosen:
                continue
            rmse = test_rmse(c.program, denoiser, test)
            cells.append(f"{c.label}:{c.holdout['rmse']:.4f}/{rmse:.4f}{'*' if c is res.chosen else ''}")
            if c is res.chosen:
                shipped.append((nfe, rmse))
                if args.n_test > 500:
                    first500.append(test_rmse(c.program, denoiser, test, 500))
        print(f"NFE {nfe}: shipped test rmse {shipped[-1][1]:.5f} (search {time.perf_counter() - t0:.0f} s) "
              + " ".join(cells), flush=True)
    print("shipped test rmse by NFE:", ", ".join(f"{v:.4f}" for _, v in shipped))
    if first500:
        print("on the first 500 test noises:", ", ".join(f"{v:.4f}" for v in first500))
    rises = [f"NFE {b[0]} {b[1] / a[1] - 1:+.1%}" for a, b in zip(shipped, shipped[1:]) if b[1] > a[1]]
    print("rises:", ", ".join(rises) or "none")


if __name__ == "__main__":
    main()
