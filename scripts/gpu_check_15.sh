#!/usr/bin/env bash
# GPU check of the native runtime's GPU paths (issue 15), which the CPU-only development machine never built or
# ran: the TensorRT backend (nvinfer C++ API) and ONNX Runtime's CUDA provider through the C API.
# Needs: a CUDA GPU, the CUDA toolkit (nvcc / CUDAToolkit for CMake), TensorRT >= 10 headers + libnvinfer
# (TENSORRT_ROOT=... for a tar install), and in python: tensorrt, onnxruntime-gpu, and iia's requirements.
# Prints, per backend and batch: max |native - python| and whether they are bit-identical; then iia-run --bench.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build/native-gpu}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
runtime/native/fetch_ort_headers.sh build/deps/onnxruntime >/dev/null || true
cmake -S . -B "$BUILD" -DIIA_ORT_FROM_PYTHON=ON -DIIA_PYTHON="$(command -v python)" -DIIA_WITH_TENSORRT=ON \
      ${TENSORRT_ROOT:+-DTENSORRT_ROOT=$TENSORRT_ROOT} -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j "$(nproc)" >/dev/null
python -m iia.compiler.cli digits --nfe 9 --max-batch 8 --out "$WORK/digits" --force >/dev/null
python - "$BUILD" "$WORK" <<'PY'
import subprocess, sys
import numpy as np
import iia.runtime
build, work = sys.argv[1], sys.argv[2]
art = f"{work}/digits"
for backend in ("tensorrt", "onnxruntime-cuda"):
    try:
        py = iia.runtime.load(art, backend)
    except Exception as err:
        print(f"{backend}: python runtime cannot load it: {err}")
        continue
    for batch in (1, 3, 8):
        noise = iia.runtime.draw_noise(batch, batch, py.sample_shape)
        labels = np.arange(batch) % 10
        np.save(f"{work}/noise.npy", noise)
        proc = subprocess.run([f"{build}/runtime/native/iia-run", art, "--backend", backend, "--noise", f"{work}/noise.npy",
                               "--labels", ",".join(map(str, labels)), "--out", f"{work}/out.npy"], capture_output=True, text=True)
        if proc.returncode:
            print(f"{backend} batch {batch}: iia-run failed: {proc.stderr.strip()}")
            continue
        native, ref = np.load(f"{work}/out.npy"), py(noise, class_labels=labels)
        print(f"{backend} batch {batch}: max |native - python| {np.abs(native - ref).max():.3g}, "
              f"bit-identical {np.array_equal(native, ref)}")
    py.close()
    subprocess.run([f"{build}/runtime/native/iia-run", art, "--backend", backend, "--bench", "--batch", "1,8",
                    "--iters", "100"], check=False)
PY
