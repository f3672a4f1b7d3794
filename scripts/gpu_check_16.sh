#!/usr/bin/env bash
# GPU check for issue 16 (Triton export of a TensorRT plan); < 2 minutes on a GPU machine with tensorrt.
# Compiles digits (EDM solver, no calibration) with a TensorRT plan, exports it with iia-export-triton, and checks
# that the repository's model.plan IS the artifact's plan, deserializes on this GPU, and that its I/O tensors
# (names, dtypes, dims, batch profile) are exactly what config.pbtxt declares: what Triton's tensorrt_plan
# backend checks when it loads the model. Prints the numbers; exits non-zero on a mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import tensorrt" 2>/dev/null || { echo "gpu_check_16: tensorrt is not importable here: nothing to check"; exit 0; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
python -m iia.compiler.cli digits --solver edm --nfe 5 --max-batch 8 --out "$out/art" --force
python -m iia.compiler.triton "$out/art" --repo "$out/repo" --name digits --kind gpu --backend tensorrt,onnxruntime
python - "$out" <<'PY'
import sys
from pathlib import Path

import numpy as np
import tensorrt as trt

import iia.runtime
from iia.compiler.triton import check_config, parse_config
from iia.runtime.contract import read_manifest

out = Path(sys.argv[1])
manifest = read_manifest(out / "art")
config = parse_config((out / "repo/digits_tensorrt/config.pbtxt").read_text())
check_config(config, manifest)
plan = (out / "repo/digits_tensorrt/1/model.plan").read_bytes()
assert plan == (out / "art/sampler.plan").read_bytes(), "model.plan differs from the artifact's plan"
engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
assert engine is not None, "the exported plan does not deserialize on this GPU"
declared = {t.name: t for t in [*config.input, *config.output]}
names = {"TYPE_FP32": trt.float32, "TYPE_INT64": trt.int64, "TYPE_UINT8": trt.uint8}
from tritonclient.grpc import model_config_pb2 as pb2
for i in range(engine.num_io_tensors):
    name = engine.get_tensor_name(i)
    shape, dtype = list(engine.get_tensor_shape(name)), engine.get_tensor_dtype(name)
    t = declared.pop(name)
    dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
    ok = shape[0] == -1 and shape[1:] == dims and names[pb2.DataType.Name(t.data_type)] == dtype
    if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
        lo, _, hi = engine.get_tensor_profile_shape(name, 0)
        ok = ok and lo[0] == 1 and hi[0] == config.max_batch_size
    print(f"{name}: engine {shape} {dtype}, config dims {list(t.dims)} (model side {dims}): {'ok' if ok else 'MISMATCH'}")
    assert ok
assert not declared, f"config declares tensors the engine lacks: {sorted(declared)}"
trt_sampler = iia.runtime.load(out / "art", "tensorrt")
cpu = iia.runtime.load(out / "art", "onnxruntime-cpu")
x = trt_sampler(seed=0, batch_size=8, class_labels=np.arange(8))
y = cpu(seed=0, batch_size=8, class_labels=np.arange(8))
print(f"gpu_check_16: ok; TensorRT vs ONNX Runtime CPU max abs {np.abs(x - y).max():.3g}")
PY
