"""Are the artifacts of this checkout's compiler bit-identical to those of another commit's?

Compiles the bundled digits model at NFE 9 with `--solver iia-edm` and `--solver ipndm` (no engine, fresh
calibration caches) with THIS checkout and with BASE (a git commit, checked out into a temporary worktree,
or `--baseline-dir` holding artifacts made earlier with the same commands), then compares every file byte
for byte, less what differs between two runs of the SAME compiler: wall-clock fields (`timings_s`, `created`,
polygraphy's runner names and run times in the golden files), ONNX node metadata (the exporter's stack traces)
the file digests the manifest lists (each file is compared itself) `coefficients_source` and the listed `bytes` (the new
iia-edm artifact is built from the base's own coefficient file, see below).

    python scripts/identical_artifacts.py --base 9781dd3
    python scripts/identical_artifacts.py --baseline-dir /tmp/baseline   # dirs named digits-<solver>-nfe9

Exit status 0 when every file matches, 1 otherwise (the differing files are listed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
SOLVERS = ("iia-edm", "ipndm")
VOLATILE = ("timings_s", "created", "runtime", "sha256", "coefficients_sha256", "coefficients_source",
            "bytes")
RUNNER = re.compile(r"-runner-N\d+-[\d/]+-[\d:]+")


def compile_with(checkout: Path, out: Path, cache: Path, coefficients: Path | None = None) -> None:
    """Compile both solvers; iia-edm reuses `coefficients` (a coefficients.json) when given."""
    env = dict(os.environ, PYTHONPATH=str(checkout), IIA_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    for solver in SOLVERS:
        cmd = [sys.executable, "-m", "iia.compiler.cli", "digits", "--solver", solver, "--nfe", "9",
               "--out", str(out / f"digits-{solver}-nfe9"), "--force", "--no-engine"]
        if coefficients is not None and solver == "iia-edm":
            cmd += ["--coefficients", str(coefficients)]
        subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fit_difference(a: Path, b: Path) -> float:
    """Largest relative difference between two coefficient files' fitted coefficients."""
    ca, cb = (json.loads(p.read_text())["steps"] for p in (a, b))
    worst = 0.0
    for sa, sb in zip(ca, cb, strict=True):
        for x, y in zip(sa["coefficients"], sb["coefficients"], strict=True):
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1.0))
    return worst


def _drop_volatile(value):
    if isinstance(value, dict):
        return {RUNNER.sub("-runner", k): _drop_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return RUNNER.sub("-runner", value) if isinstance(value, str) else value


def _strip_onnx(graph) -> None:
    for node in graph.node:
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_onnx(attr.g)
            for g in attr.graphs:
                _strip_onnx(g)


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(_drop_volatile(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".onnx":
        import onnx

        model = onnx.load_from_string(data)
        _strip_onnx(model.graph)
        data = model.SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest()


def compare(a: Path, b: Path) -> list[str]:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differing = []
    for n in names:
        if not ((a / n).is_file() and (b / n).is_file() and digest(a / n) == digest(b / n)):
            differing.append(n + _json_difference(a / n, b / n))
    return differing


def _json_difference(a: Path, b: Path) -> str:
    """' (keys k1, k2)' for two JSON objects' differing top-level keys; '' for anything else."""
    if a.suffix != ".json" or not (a.is_file() and b.is_file()):
        return ""
    x, y = (_drop_volatile(json.loads(p.read_text())) for p in (a, b))
    if not (isinstance(x, dict) and isinstance(y, dict)):
        return ""
    return " (keys " + ", ".join(sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))) + ")"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--base", help="git commit to compare against")
    group.add_argument("--baseline-dir", type=Path, help="artifacts made earlier by the base compiler")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.base:
            base = tmp / "base-src"
            subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=HERE, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                compile_with(base, tmp / "base", tmp / "base-cache")
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=HERE, check=False)
            baseline = tmp / "base"
        else:
            baseline = args.baseline_dir
        # The least-squares fit is not bit-reproducible run to run (float64 reductions, ~1e-11 relative), so
        # the compiler is judged on the SAME inputs: the fit is compared numerically, and the artifact built
        # from the base's coefficient file is compared byte for byte.
        fitted = baseline / "digits-iia-edm-nfe9" / "coefficients.json"
        compile_with(HERE, tmp / "fit", tmp / "new-cache")
        drift = fit_difference(fitted, tmp / "fit" / "digits-iia-edm-nfe9" / "coefficients.json")
        print(f"iia-edm fit vs base: max relative coefficient difference {drift:.1e} (tolerance 1e-6)")
        bad = int(drift > 1e-6)
        compile_with(HERE, tmp / "new", tmp / "new-cache", coefficients=fitted)
        for solver in SOLVERS:
            name = f"digits-{solver}-nfe9"
            differing = compare(baseline / name, tmp / "new" / name)
            print(f"{name}: " + ("identical" if not differing else "DIFFERENT: " + ", ".join(differing)))
            bad += bool(differing)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
