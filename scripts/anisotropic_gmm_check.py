"""Fresh-noise check of `auto` on a 192-d ANISOTROPIC Gaussian mixture (an exact denoiser, not the bundled gmm).

Issue 24 item 6: on such a model `auto`'s test RMSE rose with NFE past 7 and its NFE 10 choice was 1.17x its own
base on 500 test noises. This script builds a mixture of `--components` Gaussians in 3x8x8 = 192 dimensions,
each with its own DIAGONAL covariance (per-dimension std log-uniform in [--std-lo, --std-hi]), runs the `auto`
search at each NFE with `--budget` seconds, and prints, on `--n-test` test noises (the stream iia-accuracy uses),
auto's RMSE and median beside its own base candidate's (same family and final step, Karras, base coefficients).

    python scripts/anisotropic_gmm_check.py --nfe 4,5,6,7,8,9,10 --budget 60 [--json out.json]

Exact denoiser: x0 ~ sum_k w_k N(mu_k, diag(s_k^2)); x = x0 + sigma n; x | k ~ N(mu_k, diag(s_k^2 + sigma^2)),
E[x0 | x, k] = mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k), posterior over k a softmax of the Gaussian
log-likelihoods (log-determinants included).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from iia.calibration.evalset import evaluation_set
from iia.calibration.fit import CalibrationOptions
from iia.calibration.sampling import sample
from iia.calibration.schedules import program_for
from iia.calibration.search import SearchOptions, auto_search, format_table
from iia.evaluation.accuracy import TEST_SEED_OFFSET
from iia.models.base import Denoiser

SHAPE = (3, 8, 8)


class AnisotropicMixtureNet(torch.nn.Module):
    """E[x0 | x, sigma] of a mixture of diagonal-covariance Gaussians (float32 in, float32 out; float64 inside)."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, log_weights: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.to(torch.float64))  # [K, D]
        self.register_buffer("var0", (stds**2).to(torch.float64))  # [K, D]
        self.register_buffer("log_weights", log_weights.to(torch.float64))  # [K]

    def forward(self, x, sigma):
        b = x.shape[0]
        flat = x.reshape(b, 1, -1).to(torch.float64)  # [B, 1, D]
        var = self.var0[None] + sigma.to(torch.float64).reshape(b, 1, 1) ** 2  # [B, K, D]
        diff = flat - self.means[None]
        loglik = self.log_weights - 0.5 * ((diff**2 / var) + var.log()).sum(-1)  # [B, K]
        resp = torch.softmax(loglik, 1)[..., None]
        post = self.means[None] + self.var0[None] / var * diff  # [B, K, D]
        return (resp * post).sum(1).reshape(x.shape).to(x.dtype)


def anisotropic_mixture(components: int = 8, std_lo: float = 0.05, std_hi: float = 1.0, seed: int = 0) -> Denoiser:
    gen = torch.Generator().manual_seed(seed)
    dim = math.prod(SHAPE)
    means = torch.randn(components, dim, generator=gen, dtype=torch.float64)
    u = torch.rand(components, dim, generator=gen, dtype=torch.float64)
    stds = torch.exp(math.log(std_lo) + u * (math.log(std_hi) - math.log(std_lo)))
    log_weights = torch.log_softmax(torch.randn(components, generator=gen, dtype=torch.float64) * 0.5, 0)
    name = f"gmm-aniso-{'x'.join(map(str, SHAPE))}-k{components}-std{std_lo:g}-{std_hi:g}-seed{seed}"
    # kind "gmm": the search treats it as the analytic mixture it is (512 calibration noises)
    return Denoiser(net=AnisotropicMixtureNet(means, stds, log_weights).eval(), shape=SHAPE, sigma_min=0.002,
                    sigma_max=80.0, analytic=True, identity={"kind": "gmm", "name": name})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="4,5,6,7,8,9,10")
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--std-lo", type=float, default=0.05)
    parser.add_argument("--std-hi", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tables", action="store_true", help="print each search's candidate table")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = anisotropic_mixture(args.components, args.std_lo, args.std_hi, args.seed)
    cal = CalibrationOptions().resolved(model)
    test = evaluation_set(model, args.n_test, cal.seed + TEST_SEED_OFFSET, cal.reference_steps)
    rows = []
    print(f"{model.identity['name']}, {args.n_test} test noises, --budget {args.budget:g} s per NFE")
    print(f"{'NFE':>3} {'auto rmse':>10} {'median':>9} {'base rmse':>10} {'base median':>11} {'rmse/base':>9} "
          f"{'search s':>8}  chosen")
    for nfe in [int(v) for v in args.nfe.split(",")]:
        t0 = time.perf_counter()
        res = auto_search(model, nfe, SearchOptions(budget_s=args.budget), CalibrationOptions(),  # as iia-compile
                          log=(lambda text: print(text, flush=True)) if args.tables else None)
        c = res.chosen
        base = program_for(model, c.family, nfe, final=c.final)
        errs = {}
        for what, prog in (("auto", res.program), ("base", base)):
            e = test.errors(prog, reference=test.reference_at(prog.sigmas[0]))  # float64 states, as iia-accuracy --peers
            errs[what] = (float(e.pow(2).mean().sqrt()), float(e.median()))
        row = {"nfe": nfe, "chosen": c.label, "rmse": errs["auto"][0], "median": errs["auto"][1],
               "base_rmse": errs["base"][0], "base_median": errs["base"][1],
               "search_s": round(time.perf_counter() - t0, 1), "references": res.references}
        rows.append(row)
        print(f"{nfe:>3} {row['rmse']:>10.5f} {row['median']:>9.5f} {row['base_rmse']:>10.5f} "
              f"{row['base_median']:>11.5f} {row['rmse'] / row['base_rmse']:>9.3f} {row['search_s']:>8.1f}  "
              f"{c.label} ({res.references.get('calibration')} calibration noises)", flush=True)
        if args.tables:
            print(format_table(res.table), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model.identity["name"], "budget_s": args.budget, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
