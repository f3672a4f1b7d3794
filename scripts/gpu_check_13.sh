#!/usr/bin/env bash
# Issue 13 GPU check (< 2 min): the TensorRT backend applies the same load-time checks as ONNX Runtime.
# Compiles a tiny conditional gmm with a TensorRT engine, loads it with backend=tensorrt, samples, then
# forges the manifest's sample_shape (consistently) and expects an ArtifactError naming sampler.plan.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from iia.compiler.build import CompileOptions, compile_model
from iia.models import gaussian_mixture
from iia.runtime import ArtifactError, load

out = Path(sys.argv[1]) / "a"
m = compile_model(gaussian_mixture(shape=(1, 4, 4), components=3, conditional=True), out,
                  CompileOptions(nfe=5, solver="edm", max_batch=8), log=print)
print("engine:", m["engine"])
s = load(out, "tensorrt")
x = s(seed=0, batch_size=4, class_labels=[0, 1, 2, 0])
ref = load(out, "onnxruntime-cpu")(seed=0, batch_size=4, class_labels=[0, 1, 2, 0])
print("tensorrt vs ORT CPU max abs diff:", float(abs(x - ref).max()))
s.close()
path = out / "manifest.json"
data = json.loads(path.read_text())
data["sample_shape"] = [1, 2, 8]
data["inputs"][0]["shape"] = ["batch", 1, 2, 8]
path.write_text(json.dumps(data))
try:
    load(out, "tensorrt")
    print("FAIL: forged sample_shape loaded on TensorRT")
    sys.exit(1)
except ArtifactError as err:
    print("OK: refused:", err)
PY
