#!/usr/bin/env bash
# GPU check for issue 17 (loop-form sampler graph); < 2 minutes on a GPU machine with tensorrt.
# Compiles digits (EDM solver, NFE 9, no calibration) twice with a TensorRT plan, --graph loop (ONNX Loop around
# ONE denoiser copy: TensorRT's ILoop) and --graph unrolled, and times both on TensorRT against the numpy loop
# around denoiser.onnx (iia-bench checks each output against the loop's first). Prints the two tables: if the
# loop form builds but is slower on TensorRT than unrolled, the default (--graph loop) should depend on the target.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import tensorrt" 2>/dev/null || { echo "gpu_check_17: tensorrt is not importable here: nothing to check"; exit 0; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for form in loop unrolled; do
  python -m iia.compiler.cli digits --solver edm --nfe 9 --max-batch 32 --graph "$form" --out "$out/$form" --force
  python -c "import sys, iia.evaluation.cli as c; sys.exit(c.bench_main(sys.argv[1:]))" "$out/$form" --backend tensorrt --batch 1,8,32 --iters 50 --no-eager
done
