#!/usr/bin/env bash
# Triton serving tests (tests/test_triton.py, issue 16): the REAL tritonserver binary with its Python backend
# comes from the nvidia-pytriton wheel, installed WITHOUT its dependencies (its metadata pins numpy<2, which
# would replace the numpy that torch/onnx use here; only the server binary is used, never the pytriton package).
# The python-backend stub links the system libpython3.X of the Python that runs the tests. The stub's own small
# venv (numpy<2 + onnxruntime) is made by the test fixture (iia.evaluation.triton_server.stub_environment).
set -euo pipefail
pip install -q --no-deps "nvidia-pytriton==0.7.0"
stub="$(python - <<'PY'
from iia.evaluation.triton_server import wheel_paths
print(wheel_paths()["stub"])
PY
)"
libs="$(dirname "$stub")/../../../../nvidia_pytriton.libs"
if LD_LIBRARY_PATH="$libs" ldd "$stub" | grep -q "not found"; then
    pyver="$(python -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')"
    echo "install-triton: the python-backend stub needs libpython${pyver}: installing it" >&2
    apt-get update -qq && apt-get install -y -qq "libpython${pyver}"
fi
LD_LIBRARY_PATH="$libs" ldd "$stub" | grep -q "not found" && { echo "install-triton: $stub still lacks libraries" >&2; exit 1; }
exit 0
