"""Memory, time and disk of `iia-compile` on full-size fixtures, against issue 24's floors.

Builds EDM-format pickles of iia's own fixture networks at published sizes (cached in --cache: built once)
and compiles each under `/usr/bin/time -v`, sampling the compiler's resident memory every 0.2 s to attribute
the peak to the stage running at the time (the stages' `[name] ...` lines). Prints one table:

  fixture   parameters, float32 weight bytes (4 x parameters)
  stages    wall seconds per stage (the manifest's timings_s) and the peak RSS seen during each
  peak RSS  /usr/bin/time's maximum resident set size, and its ratio to the float32 weight bytes
  artifact  bytes of the artifact directory, and their ratio to the float32 weight bytes
  floors    cifar: peak RSS <= 4 x f32 weights + 1.5 GiB; edm2-s (--solver edm): peak RSS <= 6 GiB,
            wall <= 10 min, artifact <= 1.15 x f32 weights

    python scripts/real_size.py --cache /tmp/real-size                  # both fixtures
    python scripts/real_size.py --cache /tmp/real-size --fixture cifar --json cifar.json
    python scripts/real_size.py --cache /tmp/real-size --fixture cifar --args "--solver ipndm --nfe 9 --no-engine"

Big: the EDM2-S-size compile takes minutes and GBs; run one compile at a time on a shared machine.
Exit status 0 when every floor holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3
FIXTURES = {  # name: (builder keywords' name in tests/edm_fixtures.py, default iia-compile options)
    "cifar": ("CIFAR10_DDPMPP", "--solver ipndm --nfe 9 --no-engine"),
    "edm2-s": ("EDM2_IMG64_S", "--solver edm --nfe 9 --no-engine"),
}
BUILD = """
import json, sys
sys.path.insert(0, {tests!r})
import edm_fixtures as f
name, path = {name!r}, {path!r}
if name == "CIFAR10_DDPMPP":
    net = f.make_edm_pickle(path, **f.CIFAR10_DDPMPP)
else:
    net = f.make_edm2_pickle(path, **f.EDM2_IMG64_S)
print(json.dumps({{"parameters": sum(p.numel() for p in net.parameters()),
                  "stored_dtype": str(next(net.parameters()).dtype)}}))
"""
STAGE_LINE = re.compile(r"^\[([^\]]+)\] \.\.\.")


def fixture_pickle(cache: Path, name: str) -> tuple[Path, dict]:
    """The fixture's pickle in `cache` (built in a subprocess when absent) and its record (parameters, dtype)."""
    builder = FIXTURES[name][0]
    path, record = cache / f"{name}.pkl", cache / f"{name}.json"
    if not (path.exists() and record.exists()):
        code = BUILD.format(tests=str(HERE / "tests"), name=builder, path=str(path))
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(HERE)))
        record.write_text(out.stdout.strip().splitlines()[-1])
    return path, json.loads(record.read_text())


def rss_bytes(pid: int) -> int:
    """Resident bytes of `pid` and its children (0 once it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(rss_bytes(int(c)) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return total


def compile_fixture(model: Path, out: Path, args: list[str], env: dict) -> dict:
    """iia-compile under /usr/bin/time -v: wall seconds, max RSS (time -v), the peak RSS per stage, the log."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "iia.compiler.cli", str(model), "--out", str(out),
           "--force", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE)
    current, peaks, lines = ["start"], {}, []

    def sample():
        while proc.poll() is None:
            rss = rss_bytes(proc.pid)
            peaks[current[0]] = max(peaks.get(current[0], 0), rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        match = STAGE_LINE.match(line)
        if match:
            current[0] = match.group(1)
    proc.wait()
    sampler.join()
    wall = time.perf_counter() - start
    maxrss = next((int(m.group(1)) * 1024 for m in map(re.compile(r"Maximum resident set size \(kbytes\): (\d+)").search,
                                                        lines) if m), 0)
    return {"returncode": proc.returncode, "wall_s": round(wall, 1), "max_rss": maxrss, "stage_rss": peaks,
            "log_tail": lines[-40:] if proc.returncode else lines[-8:]}


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()} if path.is_dir() else {}


def floors(name: str, f32: int, run: dict, artifact: int) -> dict[str, bool]:
    """Issue 24's floors for the fixture (see the module docstring)."""
    if name == "cifar":
        return {"rss <= 4 x f32 + 1.5 GiB": run["max_rss"] <= 4 * f32 + 1.5 * GIB}
    return {"rss <= 6 GiB": run["max_rss"] <= 6 * GIB, "wall <= 600 s": run["wall_s"] <= 600,
            "artifact <= 1.15 x f32": artifact <= 1.15 * f32}


def measure(name: str, cache: Path, args: list[str], warm: bool = False) -> dict:
    """One compile of the fixture; its compile cache emptied first (a user's first compile) unless `warm`."""
    model, record = fixture_pickle(cache, name)
    out = cache / f"{name}-artifact"
    if not warm:
        shutil.rmtree(cache / "iia-cache", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(HERE), IIA_CACHE_DIR=str(cache / "iia-cache"))
    run = compile_fixture(model, out, args, env)
    files = dir_bytes(out) if run["returncode"] == 0 else {}
    manifest = json.loads((out / "manifest.json").read_text()) if files else {}
    f32 = 4 * record["parameters"]
    artifact = sum(files.values())
    return {"fixture": name, "options": args, "parameters": record["parameters"], "stored_dtype": record["stored_dtype"],
            "f32_weight_bytes": f32, **run, "rss_ratio": round(run["max_rss"] / f32, 2), "artifact_bytes": artifact,
            "artifact_ratio": round(artifact / f32, 3), "files": files, "timings_s": manifest.get("timings_s", {}),
            "floors": floors(name, f32, run, artifact) if files else {"compiled": False},
            "load": os.getloadavg()}


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        rows.append(f"{r['fixture']}: {r['parameters'] / 1e6:.1f} M parameters ({r['stored_dtype']}), float32 weights "
                    f"{r['f32_weight_bytes'] / 1e6:.0f} MB; iia-compile {' '.join(r['options'])}")
        rows.append(f"  {'stage':28s} {'seconds':>8s} {'peak RSS MB':>12s}")
        for stage in dict.fromkeys([*r["timings_s"], *r["stage_rss"]]):
            seconds = r["timings_s"].get(stage)
            rows.append(f"  {stage:28s} {'' if seconds is None else f'{seconds:8.1f}':>8s} "
                        f"{r['stage_rss'].get(stage, 0) / 1e6:12.0f}")
        rows.append(f"  wall {r['wall_s']:.1f} s; peak RSS {r['max_rss'] / 1e6:.0f} MB = {r['rss_ratio']:.2f}x f32 "
                    f"weights; artifact {r['artifact_bytes'] / 1e6:.0f} MB = {r['artifact_ratio']:.3f}x f32 weights "
                    f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in r['files'].items() if v > 1e6)})")
        rows.append("  floors: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in r["floors"].items())
                    + f"; load average {r['load'][0]:.2f}")
        if r["returncode"]:
            rows.extend("  | " + line for line in r["log_tail"])
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, type=Path, help="folder for the pickles, compile cache, artifacts")
    parser.add_argument("--fixture", action="append", choices=sorted(FIXTURES), help="default: all")
    parser.add_argument("--args", help="iia-compile options instead of the fixture's default (one string)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--warm-cache", action="store_true", help="keep the compile cache (exports, coefficients) "
                                                                   "of earlier runs; default: a first compile")
    ns = parser.parse_args(argv)
    ns.cache.mkdir(parents=True, exist_ok=True)
    results = []
    for name in ns.fixture or sorted(FIXTURES):
        args = shlex.split(ns.args if ns.args is not None else FIXTURES[name][1])
        results.append(measure(name, ns.cache, args, ns.warm_cache))
        print(table(results[-1:]), flush=True)
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))
    return 0 if all(all(r["floors"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
