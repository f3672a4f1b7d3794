"""Does `auto`, bounded by evaluation COUNTS, give the same candidate table as a base commit's search with a
budget so large that nothing is cut?

Runs the gmm search (NFE 5 and 8 by default; counts: Nelder-Mead `--max-evals` per schedule, 60 L-BFGS
iterations per global fit) in THIS checkout with `SearchOptions(budget_s=None)` and in BASE (a directory
holding an iia checkout, e.g. a worktree of 9781dd3) with `budget_s=1e9`, each in a fresh process, then
compares the tables row by row: the same candidates in the same order, the same chosen one, the same
evaluation counts, and held-out rmse/median/score and calibration losses equal to `--rtol` (the local IIA
fit's update now runs through the one executor, anchor + sum c_j basis_j: float64 rounding-level changes).

    python scripts/search_table_vs_base.py --base /work/base
Exit status 0 when the tables agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
RUN = """
import json, sys
from iia.models import load
from iia.calibration.fit import CalibrationOptions
from iia.calibration.search import SearchOptions, auto_search
nfe, budget, max_evals = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
opts = SearchOptions(budget_s=None if budget == "none" else float(budget), batch=128, max_evals=max_evals)
res = auto_search(load("gmm"), nfe, opts, CalibrationOptions(holdout=128, reference_steps=64))
print(json.dumps([{k: v for k, v in row.items() if k != "seconds"} for row in res.table]))
"""
NUMBERS = ("rmse", "median", "p90", "score", "calib_loss")


def table(checkout: Path, nfe: int, budget: str, max_evals: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", RUN, str(nfe), budget, str(max_evals)], cwd=checkout, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def differences(new: list[dict], old: list[dict], rtol: float) -> list[str]:
    if [r["candidate"] for r in new] != [r["candidate"] for r in old]:
        return [f"candidates differ: {[r['candidate'] for r in new]} vs {[r['candidate'] for r in old]}"]
    bad = []
    for a, b in zip(new, old):
        for key in ("chosen", "eligible", "note", "solver"):
            if a[key] != b[key]:
                bad.append(f"{a['candidate']}: {key} {a[key]!r} vs {b[key]!r}")
        for key in NUMBERS:
            x, y = a.get(key), b.get(key)
            if (x is None) != (y is None) or (x is not None and abs(x - y) > rtol * max(abs(x), abs(y), 1e-300)):
                bad.append(f"{a['candidate']}: {key} {x} vs {y}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="an iia checkout of the base commit")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 8])
    parser.add_argument("--max-evals", type=int, default=60)
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args()
    bad = 0
    for nfe in args.nfe:
        new = table(HERE, nfe, "none", args.max_evals)
        old = table(args.base, nfe, "1e9", args.max_evals)
        diff = differences(new, old, args.rtol)
        print(f"gmm NFE {nfe}: {len(new)} candidates, " + ("the same table" if not diff else "DIFFERENT:\n  "
                                                             + "\n  ".join(diff)))
        bad += bool(diff)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
