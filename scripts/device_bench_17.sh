#!/usr/bin/env bash
# Issue 17 speed floors on a quiet many-core machine (ONNX Runtime CPU; the GPU is not used): each graph version
# of digits and of the edm16 EDM pickle against the numpy loop, 1 and 2 threads pinned to 2 cores, interleaved.
# Usage: scripts/device_bench_17.sh DIR  (DIR holds artifacts: s17 (before), s17b..s17f, s17h (final) of digits
# and e16old, e16new, e16e, e16f, e16h of edm16, each compiled with --solver edm --nfe 9 --static-batch 1,8
# --max-batch 32 --no-engine by successive versions of the compiler).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?artifact folder}"
python -c "import onnxruntime, numpy, platform; print('onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__, platform.python_version())"
lscpu | grep -E "Model name|^CPU\(s\)|L2 cache|L3 cache" || true
digits="$dir/s17 $dir/s17b $dir/s17c $dir/s17d $dir/s17e $dir/s17f $dir/s17h"
edm16="$dir/e16old $dir/e16new $dir/e16e $dir/e16f $dir/e16h"
for rep in 1 2; do for t in 1 2; do
  echo "== round $rep, $t thread(s)"
  cores=$([ "$t" = 1 ] && echo 2 || echo 2,3)
  OMP_NUM_THREADS=$t taskset -c "$cores" python scripts/compare_artifacts.py $digits --threads "$t" --batch 1,8,32 --iters 60
  OMP_NUM_THREADS=$t taskset -c "$cores" python scripts/compare_artifacts.py $edm16 --threads "$t" --batch 1,8,32 --iters 40
done; done
