#!/usr/bin/env bash
# Every GPU claim of the docs, checked on one CUDA machine in <= 10 minutes (sized for one H100, 16 cores).
#
#   bash scripts/device_check.sh [CHECK ...]        # from anywhere; default: every check, in this order
#
# checks (each under its own time limit, all under DEVICE_CHECK_BUDGET_S; a failing or skipped check never stops
# the next; the artifacts are compiled once, by `compile`, and shared):
#   compile      digits, --solver edm --nfe 9 --max-batch 32, --graph loop (a TensorRT fp32 plan where TensorRT and
#                a GPU exist): the artifact the checks below use (added first when a named check needs it)
#   trt-fp32     the loop form's TensorRT plan was built; TensorRT runtime vs ONNX Runtime CPU at batch 1/8/32
#                within the artifact's golden tolerance (images atol 1e-3, images_uint8 +-1 level); the artifact's
#                own golden command (`polygraphy run sampler.onnx --trt ...`) passes
#   trt-fp16     --precision fp16 builds (normalisation layers kept in fp32) and stays near fp32 (bound below)
#   trt-checks   the TensorRT backend applies the load-time checks: a consistently forged sample_shape is refused
#                with an ArtifactError
#   ort-cuda     ONNX Runtime's CUDA provider runs the artifact within the golden tolerance of ONNX Runtime CPU
#   latency      the same compiled with --graph unrolled, then iia-bench on each GPU backend (TensorRT, ONNX Runtime
#                CUDA), both forms, batch 1/8/32: graph p50, numpy-loop p50, speedup_vs_loop, overhead (iia-bench
#                checks each graph output against the loop's first)
#   triton-plan  iia-export-triton's tensorrt_plan model: model.plan IS the artifact's plan, deserializes here, and
#                its I/O tensors (names, dtypes, dims, batch profile) are what config.pbtxt declares
#   edm2-latent  a tiny guided EDM2 latent model + VAE (tests/edm_fixtures.py): TensorRT fp32 build, golden
#                command, iia-bench on TensorRT (overhead vs NFE x guided denoiser + one decoder call)
#   native       runtime/native built with CMake against CUDA/TensorRT: iia-run vs the Python runtime per backend
#                and batch (max abs, bit-identical), iia-run --bench
#   cpu-floors   speedup_vs_loop on ONNX Runtime CPU with idle cores (digits and an EDM-format pickle, 1 thread
#                pinned to one core, 2 threads --no-spin pinned to two), against docs/performance.md's floors
# opt-in checks (run only when named; each takes most of the budget: run it alone):
#   full-size-cuda  FULL-SIZE fixture (EDM's CIFAR-10 DDPM++ configuration, ~56 M parameters:
#                tests/edm_fixtures.make_edm_pickle(path, **CIFAR10_DDPMPP), as scripts/real_size.py builds it),
#                its DEFAULT compile with --device cuda (auto search, --budget 180, TensorRT where it exists):
#                reports the cost per image-call, the plan block, the coefficient stage's and the whole compile's
#                time, peak RSS, what shipped, the device coefficients.json records, and the stepping state's
#                float64 vs float32 time on the GPU (ipndm NFE 9, 64 noises); tests/test_device.py first (its
#                CUDA-only tests skip elsewhere). FULL_SIZE_FLAGS adds flags to the compile.
#
# Each check prints PASS / FAIL / SKIP / TIMEOUT with its reason and numbers; a table sums them up at the end. Exit
# status 0 only when every check that ran passed and none was skipped. Logs and numbers (JSON) go under
# $OUT/device_check/ when OUT is set, else under a temporary folder that is printed. Settings (environment):
#   DEVICE_CHECK_BUDGET_S  total seconds for all checks (default 570); a check gets what is left, at most its limit
#   DEVICE_CHECK_WHEELS    a folder of wheels installed first (pip --no-index --no-deps, to a temp site; default
#                          .whl when it exists): tensorrt, onnxruntime-gpu, polygraphy, diffusers, tritonclient
#   TENSORRT_ROOT          a TensorRT install (include/, lib/) for the native build
#   FP16_LEVELS, FP16_SHARE  trt-fp16's bound: this share of images_uint8 values within this many levels of fp32
#                          ONNX Runtime CPU (defaults 4 and 0.99; the docs state no fp16 tolerance: it is this
#                          script's, printed beside the measured numbers)
#   PYTHON                 the interpreter (default: python3)
# Python modules are reached through public names only (iia.runtime, the console scripts named in pyproject.toml),
# so the script survives moves inside the packages.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here" || exit 2
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CHECKS=(compile trt-fp32 trt-fp16 trt-checks ort-cuda latency triton-plan edm2-latent native cpu-floors)
OPT_IN=(full-size-cuda)  # run only when named
declare -A LIMIT=([compile]=120 [trt-fp32]=90 [trt-fp16]=90 [trt-checks]=40 [ort-cuda]=40 [latency]=180
                  [triton-plan]=60 [edm2-latent]=120 [native]=150 [cpu-floors]=150 [full-size-cuda]=570)
NEEDS_COMPILE=" trt-fp32 trt-checks ort-cuda latency triton-plan native "
SKIP=77  # a check's exit status for "could not run here"

# ---- one check, in its own process (re-entered by the driver below under `timeout`) ------------------------

skip() { echo "SKIP: $*"; echo "$*" >"$RES/$NAME.reason"; exit "$SKIP"; }
fail() { echo "FAIL: $*"; echo "$*" >"$RES/$NAME.reason"; exit 1; }
detail() { echo "$*"; echo "$*" >>"$RES/$NAME.detail"; }
have_py() { "$PY" -c "import $1" >/dev/null 2>&1; }
need_gpu() { [ -z "$(cat "$WORK/no_gpu" 2>/dev/null)" ] || skip "$(cat "$WORK/no_gpu")"; }
need_py() {  # need_py MODULE WHAT
  have_py "$1" || skip "python module '$1' not importable ($2); carry its wheel in DEVICE_CHECK_WHEELS"
}
need_trt() { need_gpu; need_py tensorrt "TensorRT's Python API"; }
need_art() {  # need_art FORM: the artifact `compile` made
  [ -f "$WORK/art-$1/manifest.json" ] || skip "no $1-form artifact: the 'compile' check did not produce it"
}
entry() { "$PY" "$WORK/dc.py" entry "$@"; }  # a console script by its pyproject.toml name
engine_built() { "$PY" "$WORK/dc.py" engine "$1"; }

compile_digits() {  # compile_digits FORM [FLAGS...]: digits, EDM solver (no calibration), NFE 9, into $WORK/art-FORM
  local form=$1; shift
  entry iia-compile digits --solver edm --nfe 9 --max-batch 32 --graph "$form" --with-denoiser --out "$WORK/art-$form" \
    --force "$@"
}

check_compile() {
  need_gpu
  compile_digits loop || fail "iia-compile digits --graph loop failed (log above)"
  detail "loop form: TensorRT plan $(engine_built "$WORK/art-loop")"
}

check_trt_fp32() {
  need_trt; need_art loop
  engine_built "$WORK/art-loop" | grep -q '^built' || fail "no TensorRT plan: $(engine_built "$WORK/art-loop")"
  "$PY" "$WORK/dc.py" parity "$WORK/art-loop" tensorrt 1e-3 1 1.0 "$RES/trt-fp32.json" || fail "TensorRT plan vs ORT CPU"
  need_py polygraphy "the golden command"
  "$PY" "$WORK/dc.py" golden "$WORK/art-loop" || fail "the artifact's golden command failed on TensorRT"
  detail "golden command (polygraphy --trt): passed"
}

check_trt_fp16() {
  need_trt
  entry iia-compile digits --solver edm --nfe 9 --max-batch 32 --precision fp16 --out "$WORK/art-fp16" --force \
    || fail "iia-compile --precision fp16 failed (log above)"
  engine_built "$WORK/art-fp16" | grep -q '^built' || fail "no fp16 plan: $(engine_built "$WORK/art-fp16")"
  "$PY" "$WORK/dc.py" parity "$WORK/art-fp16" tensorrt inf "${FP16_LEVELS:-4}" "${FP16_SHARE:-0.99}" \
    "$RES/trt-fp16.json" || fail "fp16 plan vs fp32 ORT CPU beyond this script's bound"
}

check_trt_checks() {
  need_trt; need_art loop
  engine_built "$WORK/art-loop" | grep -q '^built' || skip "the loop artifact has no TensorRT plan"
  rm -rf "$WORK/forged" && cp -r "$WORK/art-loop" "$WORK/forged"
  "$PY" "$WORK/dc.py" forged "$WORK/forged" || fail "a forged manifest loaded on TensorRT"
}

check_ort_cuda() {
  need_gpu; need_art loop
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    || skip "onnxruntime $("$PY" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' \
            2>&1) has no CUDAExecutionProvider; carry onnxruntime-gpu"
  "$PY" "$WORK/dc.py" parity "$WORK/art-loop" onnxruntime-cuda 1e-3 1 1.0 "$RES/ort-cuda.json" \
    || fail "ONNX Runtime CUDA vs CPU"
}

check_latency() {
  need_gpu; need_art loop
  local backends=() forms=(loop) b form ran=0 broken=""
  if compile_digits unrolled; then forms+=(unrolled)
  else broken="iia-compile --graph unrolled failed; "; fi
  engine_built "$WORK/art-loop" | grep -q '^built' && backends+=(tensorrt)
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    && backends+=(onnxruntime-cuda)
  [ ${#backends[@]} -gt 0 ] || skip "neither a TensorRT plan nor ONNX Runtime's CUDA provider here"
  for b in "${backends[@]}"; do for form in "${forms[@]}"; do
    if entry iia-bench "$WORK/art-$form" --backend "$b" --batch 1,8,32 --iters 50 --no-eager \
         --json "$RES/latency-$b-$form.json"; then ran=$((ran + 1))
    else echo "FAIL: iia-bench $b $form"; fi
  done; done
  "$PY" "$WORK/dc.py" latency-table "$RES"/latency-*.json
  "$PY" "$WORK/dc.py" latency-line "$RES"/latency-*.json
  [ "$ran" = $((2 * ${#backends[@]})) ] || fail "${broken}$ran of $((2 * ${#backends[@]})) benchmarks ran"
}

check_triton_plan() {
  need_trt; need_art loop
  need_py tritonclient.grpc "iia-export-triton checks configs with tritonclient"
  engine_built "$WORK/art-loop" | grep -q '^built' || skip "the loop artifact has no TensorRT plan"
  entry iia-export-triton "$WORK/art-loop" --repo "$WORK/repo" --name digits --kind gpu \
    --backend tensorrt,onnxruntime --force || fail "iia-export-triton failed (log above)"
  "$PY" "$WORK/dc.py" triton-plan "$WORK/art-loop" "$WORK/repo/digits_tensorrt" || fail "plan vs config.pbtxt"
}

check_edm2_latent() {
  need_trt; need_py diffusers "the VAE folder"
  local w="$WORK/edm2"
  mkdir -p "$w"
  "$PY" "$WORK/dc.py" edm2-fixtures "$w" || fail "could not build the EDM2 fixtures (tests/edm_fixtures.py)"
  entry iia-compile "$w/lat.pkl" --nfe 9 --solver edm --guide "$w/lat-guide.pkl" --guidance 1.4 --vae "$w/vae" \
    --max-batch 16 --with-denoiser --out "$w/art" --force || fail "iia-compile of the guided latent EDM2 model failed (log above)"
  detail "$(engine_built "$w/art")"
  engine_built "$w/art" | grep -q '^built' || fail "no TensorRT plan"
  need_py polygraphy "the golden command"
  "$PY" "$WORK/dc.py" golden "$w/art" || fail "the golden command failed on TensorRT"
  entry iia-bench "$w/art" --backend tensorrt --batch 1,8 --iters 20 --no-eager --json "$RES/edm2-latent-bench.json" \
    || fail "iia-bench on TensorRT failed"
  "$PY" "$WORK/dc.py" latency-table "$RES/edm2-latent-bench.json"
  "$PY" "$WORK/dc.py" latency-line "$RES/edm2-latent-bench.json"
}

check_native() {
  need_gpu; need_art loop
  command -v cmake >/dev/null || skip "cmake not found"
  local build="$WORK/native" trt=(-DIIA_WITH_TENSORRT=AUTO)
  [ -n "${TENSORRT_ROOT:-}" ] && trt+=(-DTENSORRT_ROOT="$TENSORRT_ROOT")
  if [ -f build/deps/onnxruntime/usr/include/onnxruntime/onnxruntime_cxx_api.h ] || \
     runtime/native/fetch_ort_headers.sh build/deps/onnxruntime; then :
  else skip "no ONNX Runtime headers (runtime/native/fetch_ort_headers.sh needs apt; carry build/deps/onnxruntime)"; fi
  cmake -S . -B "$build" -DIIA_ORT_FROM_PYTHON=ON -DIIA_PYTHON="$(command -v "$PY")" "${trt[@]}" \
    -DCMAKE_BUILD_TYPE=Release >"$RES/native-cmake.log" 2>&1 \
    || fail "cmake configure failed: $(grep -m1 -i error "$RES/native-cmake.log")"
  grep -i "TensorRT backend" "$RES/native-cmake.log" | head -2
  cmake --build "$build" -j "$(nproc)" --target iia-run >>"$RES/native-cmake.log" 2>&1 \
    || fail "build failed: $(grep -m1 -i error "$RES/native-cmake.log")"
  "$PY" "$WORK/dc.py" native "$build" "$WORK/art-loop" "$RES/native.json" || fail "native vs Python runtime"
}

check_cpu_floors() {
  local cores; cores=$(nproc)
  [ "$cores" -ge 4 ] || skip "needs >= 4 cores (pinned 1- and 2-thread runs beside the driver); this machine has $cores"
  command -v taskset >/dev/null || skip "taskset not found"
  "$PY" "$WORK/dc.py" edm16 "$WORK/edm16.pkl" || fail "could not build the EDM-format pickle (tests/edm_fixtures.py)"
  local m
  for m in digits "$WORK/edm16.pkl"; do
    local out="$WORK/floors-$(basename "$m" .pkl)"
    entry iia-compile "$m" --solver edm --nfe 9 --static-batch 1,8 --max-batch 32 --no-engine --with-denoiser \
      --out "$out" --force \
      || fail "iia-compile $m failed (log above)"
    OMP_NUM_THREADS=1 taskset -c 2 "$PY" "$WORK/dc.py" entry iia-bench "$out" --backend onnxruntime-cpu \
      --batch 1,8,32 --threads 1 --iters 60 --no-eager --json "$RES/cpu-floors-$(basename "$out")-t1.json" \
      || fail "iia-bench 1 thread"
    OMP_NUM_THREADS=2 taskset -c 2,3 "$PY" "$WORK/dc.py" entry iia-bench "$out" --backend onnxruntime-cpu \
      --batch 1,8,32 --threads 2 --no-spin --iters 60 --no-eager --json "$RES/cpu-floors-$(basename "$out")-t2.json" \
      || fail "iia-bench 2 threads"
  done
  "$PY" "$WORK/dc.py" latency-table "$RES"/cpu-floors-*.json
  "$PY" "$WORK/dc.py" floors "$RES"/cpu-floors-*-t1.json
}

check_full_size_cuda() {
  need_gpu
  "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || skip "torch sees no CUDA device (--device cuda)"
  local pkl="$WORK/cifar.pkl" art="$WORK/art-cifar" log="$RES/full-size-cuda-compile.log" t0 rss=()
  # the device tests that skip without CUDA (auto = cuda:0, index bounds, CUDA vs CPU samples) run here
  if have_py pytest; then
    local tests="$RES/full-size-cuda-tests.log"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py >"$tests" 2>&1 \
      || { tail -n 30 "$tests"; fail "tests/test_device.py failed with a CUDA device (log above)"; }
    detail "tests/test_device.py: $(tail -n 1 "$tests")"
  fi
  "$PY" "$WORK/dc.py" cifar "$pkl" || fail "could not build the full-size fixture (tests/edm_fixtures.py)"
  detail "fixture: tests/edm_fixtures.make_edm_pickle(**CIFAR10_DDPMPP)"
  [ -x /usr/bin/time ] && rss=(/usr/bin/time -v -o "$RES/full-size-cuda-time.txt")
  t0=$SECONDS
  # shellcheck disable=SC2086  # FULL_SIZE_FLAGS: extra flags, word-split on purpose
  ${rss[@]+"${rss[@]}"} "$PY" "$WORK/dc.py" entry iia-compile "$pkl" --nfe 9 --device cuda --out "$art" --force \
    ${FULL_SIZE_FLAGS:-} 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} seconds=$((SECONDS - t0))
  "$PY" "$WORK/dc.py" full-size-report "$log" "$art" "$seconds" "$RES/full-size-cuda-time.txt" "$RES/full-size-cuda.json"
  [ "$rc" = 0 ] || fail "iia-compile of the full-size fixture with --device cuda failed after ${seconds}s (log above)"
  "$PY" "$WORK/dc.py" device-recorded "$art" || fail "coefficients.json does not record a CUDA calibration"
  "$PY" "$WORK/dc.py" state-timing "$pkl" || fail "the stepping-state timing on the GPU failed"
}

if [ "${1:-}" = "--run-one" ]; then
  NAME=$2
  export DETAIL="$RES/$NAME.detail"  # dc.py's note() appends its one-line results here too
  "check_${NAME//-/_}"
  exit $?
fi

# ---- the driver -------------------------------------------------------------------------------------------

if [ $# -gt 0 ]; then
  for c in "$@"; do
    [[ " ${CHECKS[*]} ${OPT_IN[*]} " == *" $c "* ]] \
      || { echo "device_check.sh: unknown check '$c' (checks: ${CHECKS[*]} ${OPT_IN[*]})" >&2; exit 2; }
  done
  CHECKS=("$@")
  for c in "$@"; do  # a check that needs the shared artifact brings `compile` with it
    if [[ "$NEEDS_COMPILE" == *" $c "* && " ${CHECKS[*]} " != *" compile "* ]]; then CHECKS=(compile "${CHECKS[@]}"); fi
  done
fi
export WORK RES
WORK=$(mktemp -d "${TMPDIR:-/tmp}/iia-device-check.XXXXXX")
if [ -n "${OUT:-}" ]; then RES="$OUT/device_check"; mkdir -p "$RES"
else RES=$(mktemp -d "${TMPDIR:-/tmp}/iia-device-check-results.XXXXXX"); fi
trap 'rm -rf "$WORK"' EXIT
export IIA_CACHE_DIR="$WORK/cache" PY
budget=${DEVICE_CHECK_BUDGET_S:-570}
start=$SECONDS

wheels=${DEVICE_CHECK_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  echo "== installing the wheels of $wheels into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$wheels"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site" || echo "wheel install failed: the checks go on without them"
fi

# The helper every check calls: public iia names only (see the header).
cat >"$WORK/dc.py" <<'PY'
import json, math, os, re, subprocess, sys
from pathlib import Path

import numpy as np


def entry(name, *args):
    """Run a console script as pyproject.toml names it (so a module move inside iia does not break this script)."""
    import importlib
    text = Path("pyproject.toml").read_text()
    m = re.search(r'^' + re.escape(name) + r'\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    if not m:
        sys.exit(f"pyproject.toml names no console script {name}")
    sys.argv = [name, *args]
    sys.exit(getattr(importlib.import_module(m.group(1)), m.group(2))())


def note(line):
    """Print a result line and keep it for the summary table (DETAIL: the check's detail file)."""
    print(line)
    if os.environ.get("DETAIL"):
        with open(os.environ["DETAIL"], "a") as f:
            f.write(line + "\n")


def manifest(art):
    return json.loads((Path(art) / "manifest.json").read_text())


def engine(art):
    e = manifest(art).get("engine", {})
    print(f"built, {e.get('precision')}" if e.get("built") else f"not built: {e.get('reason')}")


def labels_for(m, batch):
    return np.arange(batch) % m["label_dim"] if m.get("label_dim") else None


def parity(art, backend, atol, levels, share, out):
    """`backend` vs ONNX Runtime CPU on the same noise: images max abs (<= atol x max(1, output scale)) and the share
    of images_uint8 values within `levels` (>= share)."""
    import iia.runtime
    atol, levels, share = float(atol), int(levels), float(share)
    m = manifest(art)
    dut, ref = iia.runtime.load(art, backend), iia.runtime.load(art, "onnxruntime-cpu")
    rows, ok = [], True
    for batch in (1, 8, 32):
        noise = iia.runtime.draw_noise(batch, batch, dut.sample_shape)
        labels = labels_for(m, batch)
        x, y = dut(noise, class_labels=labels), ref(noise, class_labels=labels)
        u, v = dut.images(noise, class_labels=labels), ref.images(noise, class_labels=labels)
        scale = max(1.0, float(np.abs(y).max()))
        d = np.abs(u.astype(np.int16) - v.astype(np.int16))
        row = {"batch": batch, "max_abs": float(np.abs(x - y).max()), "scale": scale, "finite": bool(np.isfinite(x).all()),
               "uint8_max_levels": int(d.max()), "uint8_within": float((d <= levels).mean())}
        row["ok"] = row["finite"] and row["max_abs"] <= atol * scale and row["uint8_within"] >= share
        ok &= row["ok"]
        rows.append(row)
        print(f"{backend} vs onnxruntime-cpu, batch {batch}: images max abs {row['max_abs']:.3g} (bound {atol * scale:.3g}), "
              f"images_uint8 within {levels} level(s) {row['uint8_within']:.4%} (bound {share:.2%}), "
              f"max {row['uint8_max_levels']} level(s): {'ok' if row['ok'] else 'OUT OF BOUNDS'}")
    dut.close(), ref.close()
    note(f"{backend}: max abs {max(r['max_abs'] for r in rows):.3g}, images_uint8 within {levels}: "
         f"{min(r['uint8_within'] for r in rows):.4%} (batch 1/8/32){'' if ok else ' OUT OF BOUNDS'}")
    Path(out).write_text(json.dumps({"backend": backend, "engine": m.get("engine"), "rows": rows}, indent=1))
    sys.exit(0 if ok else 1)


def golden(art):
    """The artifact's own golden command (manifest `golden.check`), run in the artifact folder."""
    import shlex
    words = shlex.split(manifest(art)["golden"]["check"])
    if words[0] != "polygraphy":
        sys.exit(f"unexpected golden command {words}")
    print("$", shlex.join(words))
    runner = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
    sys.exit(subprocess.run([sys.executable, "-c", runner, *words[1:]], cwd=art).returncode)


def forged(art):
    """sample_shape forged consistently everywhere the manifest states it: the TensorRT backend must refuse it."""
    import iia.runtime
    path = Path(art) / "manifest.json"
    m = json.loads(path.read_text())
    c, h, w = m["sample_shape"]
    fake = [c, h // 2, w * 2]
    m["sample_shape"] = fake
    m["model"]["shape"] = fake
    for t in m["inputs"] + m["outputs"]:
        if t["name"] in ("noise", "images", "latents"):
            t["shape"] = [t["shape"][0], *fake]
        elif t["name"] == "images_uint8":
            t["shape"] = [t["shape"][0], fake[1], fake[2], t["shape"][3]]
    path.write_text(json.dumps(m))
    try:
        iia.runtime.load(art, "tensorrt")
    except iia.runtime.ArtifactError as err:
        note(f"refused as it should be{' (names sampler.plan)' if 'sampler.plan' in str(err) else ''}: {err}")
        sys.exit(0)
    note(f"a manifest forged to sample_shape {fake} loaded on TensorRT")
    sys.exit(1)


def triton_plan(art, model_dir):
    """What Triton's tensorrt_plan backend checks at load, without the server: plan bytes, deserialisation, I/O."""
    import tensorrt as trt
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb2
    model_dir = Path(model_dir)
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())
    plan = (model_dir / "1" / "model.plan").read_bytes()
    if plan != (Path(art) / "sampler.plan").read_bytes():
        sys.exit("model.plan differs from the artifact's sampler.plan")
    eng = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    if eng is None:
        sys.exit("the exported plan does not deserialize on this GPU")
    declared = {t.name: t for t in [*config.input, *config.output]}
    types = {"TYPE_FP32": trt.float32, "TYPE_INT64": trt.int64, "TYPE_UINT8": trt.uint8}
    ok = True
    for i in range(eng.num_io_tensors):
        name = eng.get_tensor_name(i)
        shape, dtype = list(eng.get_tensor_shape(name)), eng.get_tensor_dtype(name)
        t = declared.pop(name, None)
        if t is None:
            print(f"{name}: in the engine, not in config.pbtxt: MISMATCH")
            ok = False
            continue
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        good = shape[0] == -1 and shape[1:] == dims and types.get(pb2.DataType.Name(t.data_type)) == dtype
        if eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            lo, _, hi = eng.get_tensor_profile_shape(name, 0)
            good = good and lo[0] == 1 and hi[0] == config.max_batch_size
        print(f"{name}: engine {shape} {dtype}, config dims {list(t.dims)} (model side {dims}): "
              f"{'ok' if good else 'MISMATCH'}")
        ok &= good
    if declared:
        print(f"config.pbtxt declares tensors the engine lacks: {sorted(declared)}")
        ok = False
    sys.exit(0 if ok else 1)


def edm2_fixtures(w):
    import torch
    sys.path.insert(0, "tests")
    from edm_fixtures import make_edm2_pickle
    from diffusers import AutoencoderKL
    make_edm2_pickle(f"{w}/lat.pkl", channels=4, label_dim=10, encoder="latent", seed=2)
    make_edm2_pickle(f"{w}/lat-guide.pkl", channels=4, label_dim=0, model_channels=4, encoder="latent", seed=3)
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                  norm_num_groups=4).save_pretrained(f"{w}/vae")


def edm16(path):
    sys.path.insert(0, "tests")
    from edm_fixtures import make_edm_pickle
    make_edm_pickle(path, "edm-cond", resolution=16, channels=32)


def cifar(path):
    """The full-size fixture: an EDM-format pickle with EDM's published CIFAR-10 DDPM++ configuration
    (tests/edm_fixtures.py CIFAR10_DDPMPP, the one scripts/real_size.py builds)."""
    sys.path.insert(0, "tests")
    from edm_fixtures import CIFAR10_DDPMPP, make_edm_pickle
    net = make_edm_pickle(path, **CIFAR10_DDPMPP)
    note(f"fixture {path}: {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters (CIFAR10_DDPMPP)")


def full_size_report(log, art, seconds, time_file, out):
    """The full-size compile's numbers from its log: cost per image-call, the plan block, the stage times, peak RSS,
    what shipped; kept in `out` (JSON) and the summary."""
    text = Path(log).read_text(errors="replace")
    lines = text.splitlines()
    plan = [l for l in lines if re.search(r"\bplan\b", l) and l.startswith("  ")]
    cost = re.findall(r"([0-9.eE+-]+) s per image-call", text)
    stages = dict(re.findall(r"^\[([^\]]+)\] done in ([0-9.]+) s", text, re.M))
    shipped = [l.strip() for l in lines if "shipped" in l][-1:]
    rss = None
    if Path(time_file).is_file():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", Path(time_file).read_text())
        rss = int(m.group(1)) / 2**20 if m else None
    print("== the plan block")
    print("\n".join(plan) or "(no plan lines in the log)")
    note(f"cost per image-call {cost[0] if cost else '?'} s; coefficients {stages.get('coefficients', '?')} s; "
         f"whole compile {seconds} s" + (f"; peak RSS {rss:.2f} GiB" if rss else ""))
    if shipped:
        note(shipped[0][:160])
    Path(out).write_text(json.dumps({"seconds": int(seconds), "stages_s": stages, "cost_per_image_call_s": cost[:1],
                                     "plan": plan, "shipped": shipped, "peak_rss_gib": rss}, indent=1))


def device_recorded(art):
    """coefficients.json names the CUDA device the calibration ran on."""
    data = json.loads((Path(art) / "coefficients.json").read_text())
    note(f"coefficients.json device: {data.get('device')}")
    sys.exit(0 if str(data.get("device", "")).startswith("cuda") else 1)


def state_timing(pkl):
    """ipndm NFE 9 on 64 noises on the GPU: float64 vs float32 stepping state, and the network calls alone."""
    import time
    import torch
    import iia.models
    from iia.calibration.evalset import draw_noise
    from iia.calibration.sampling import sample
    from iia.calibration.schedules import program_for
    d = iia.models.load(pkl).to("cuda")
    program = program_for(d, "ipndm", 9, 1, "karras")
    noise, labels = draw_noise(d, 64, 0)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    t64 = timed(lambda: sample(program, d, noise, labels, dtype=torch.float64))
    t32 = timed(lambda: sample(program, d, noise, labels, dtype=torch.float32))
    x = noise.to(torch.float32)
    net = timed(lambda: [d(x, 1.0, labels) for _ in range(9)])
    note(f"GPU stepping state, ipndm NFE 9, 64 noises: float64 {t64 * 1e3:.1f} ms, float32 {t32 * 1e3:.1f} ms, "
         f"9 network calls alone {net * 1e3:.1f} ms")


def rows_of(path):
    data = json.loads(Path(path).read_text())
    return data["rows"] if isinstance(data, dict) else data


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def latency_line(*paths):
    """One line per file: speedup_vs_loop at each batch (the summary table's numbers)."""
    for p in paths:
        rows = rows_of(p)
        note(f"{Path(p).stem}: vs loop " + "/".join(fmt(r.get("speedup_vs_loop"), ".2f") for r in rows)
             + " at batch " + "/".join(str(r["batch"]) for r in rows)
             + ", graph p50 " + "/".join(f"{r['p50_ms']:.3f}" for r in rows) + " ms")


def latency_table(*paths):
    print(f"{'file':<34} {'backend':<17} {'batch':>5} {'graph p50 ms':>12} {'loop p50 ms':>11} {'vs loop':>7} "
          f"{'overhead':>8}")
    for p in paths:
        for r in rows_of(p):
            print(f"{Path(p).stem:<34} {r['backend']:<17} {r['batch']:>5} {r['p50_ms']:>12.3f} "
                  f"{fmt(r.get('loop_p50_ms'), '.3f'):>11} {fmt(r.get('speedup_vs_loop'), '.2f'):>7} "
                  f"{fmt(r.get('overhead_ratio'), '.2f'):>8}")


def floors(*paths):
    """docs/performance.md's floors (speedup_vs_loop >= 1.3 at batch 1, >= 1.15 at batch 8, 1 thread), reported:
    they are targets the docs say are met on digits and not reliably on the EDM-format pickle, not pass/fail."""
    for p in paths:
        for r in rows_of(p):
            floor = {1: 1.3, 8: 1.15}.get(r["batch"])
            if floor and r.get("speedup_vs_loop") is not None:
                note(f"{Path(p).stem} batch {r['batch']}: speedup_vs_loop {r['speedup_vs_loop']:.2f} "
                      f"(floor {floor}: {'met' if r['speedup_vs_loop'] >= floor else 'NOT met'})")


def native(build, art, out):
    """iia-run (C++) against the Python runtime, per GPU backend and batch; then iia-run --bench."""
    import iia.runtime
    run = next((p for p in Path(build).rglob("iia-run") if p.is_file() and os.access(p, os.X_OK)), None)
    if run is None:
        sys.exit(f"no iia-run under {build}")
    work, m, results, ok = Path(build), manifest(art), [], True
    for backend in ("tensorrt", "onnxruntime-cuda"):
        try:
            py = iia.runtime.load(art, backend)
        except Exception as err:
            note(f"{backend}: the Python runtime cannot load it here: {err}")
            results.append({"backend": backend, "error": str(err)})
            ok = False
            continue
        for batch in (1, 3, 8):
            noise = iia.runtime.draw_noise(batch, batch, py.sample_shape)
            labels = labels_for(m, batch)
            np.save(work / "noise.npy", noise)
            cmd = [str(run), art, "--backend", backend, "--noise", str(work / "noise.npy"), "--out", str(work / "out.npy")]
            if labels is not None:
                cmd += ["--labels", ",".join(map(str, labels))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                note(f"{backend} batch {batch}: iia-run failed: {proc.stderr.strip()}")
                results.append({"backend": backend, "batch": batch, "error": proc.stderr.strip()})
                ok = False
                continue
            nat, ref = np.load(work / "out.npy"), py(noise, class_labels=labels)
            row = {"backend": backend, "batch": batch, "max_abs": float(np.abs(nat - ref).max()),
                   "bit_identical": bool(np.array_equal(nat, ref))}
            results.append(row)
            note(f"{backend} batch {batch}: max |native - python| {row['max_abs']:.3g}, "
                  f"bit-identical {row['bit_identical']}")
        py.close()
        subprocess.run([str(run), art, "--backend", backend, "--bench", "--batch", "1,8", "--iters", "100"], check=False)
    Path(out).write_text(json.dumps(results, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"entry": entry, "engine": engine, "parity": parity, "golden": golden, "forged": forged,
     "triton-plan": triton_plan, "edm2-fixtures": edm2_fixtures, "edm16": edm16, "latency-table": latency_table, "latency-line": latency_line,
     "floors": floors, "native": native, "cifar": cifar, "full-size-report": full_size_report,
     "device-recorded": device_recorded, "state-timing": state_timing}[command](*args)
PY

# Preflight: what this machine has (printed once; the GPU checks skip with this reason when there is no GPU).
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
"$PY" - >"$WORK/preflight" 2>&1 <<'PY'
import importlib
for name in ("torch", "onnxruntime", "tensorrt", "polygraphy", "onnx", "diffusers", "tritonclient"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"{name}: missing ({type(err).__name__})")
try:
    import onnxruntime
    print("onnxruntime providers:", ", ".join(onnxruntime.get_available_providers()))
except Exception:
    pass
PY
cat "$WORK/preflight"
gpu_reason=""
if ! nvidia-smi -L >/dev/null 2>&1 && \
   ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
  gpu_reason="no CUDA device (nvidia-smi -L fails and torch.cuda.is_available() is False)"
fi
printf '%s' "$gpu_reason" >"$WORK/no_gpu"
cp "$WORK/preflight" "$RES/machine.txt"

declare -A STATUS SECS
: >"$RES/summary.tsv"
for c in "${CHECKS[@]}"; do
  left=$((budget - (SECONDS - start)))
  limit=${LIMIT[$c]}; [ "$left" -lt "$limit" ] && limit=$left
  echo
  echo "== $c (limit ${limit}s)"
  if [ "$limit" -lt 15 ]; then
    STATUS[$c]=SKIP; SECS[$c]=0; echo "out of the ${budget}s budget" >"$RES/$c.reason"; echo "SKIP: out of budget"
    continue
  fi
  t0=$SECONDS
  timeout -k 10 "$limit" bash "${BASH_SOURCE[0]}" --run-one "$c" 2>&1 | tee "$RES/$c.log"
  rc=${PIPESTATUS[0]}
  SECS[$c]=$((SECONDS - t0))
  case $rc in
    0) STATUS[$c]=PASS ;;
    "$SKIP") STATUS[$c]=SKIP ;;
    124|137) STATUS[$c]=TIMEOUT; echo "stopped after ${limit}s" >"$RES/$c.reason" ;;
    *) STATUS[$c]=FAIL; [ -s "$RES/$c.reason" ] || echo "exit status $rc: $(tail -n 1 "$RES/$c.log")" >"$RES/$c.reason" ;;
  esac
done

echo
echo "== summary ($((SECONDS - start))s; logs and numbers in $RES)"
printf '%-12s %-8s %5s  %s\n' check status secs "reason / numbers"
bad=0
for c in "${CHECKS[@]}"; do
  note=$(cat "$RES/$c.reason" 2>/dev/null || paste -sd';' "$RES/$c.detail" 2>/dev/null)
  printf '%-12s %-8s %5s  %s\n' "$c" "${STATUS[$c]}" "${SECS[$c]}" "${note:0:200}"
  printf '%s\t%s\t%s\t%s\n' "$c" "${STATUS[$c]}" "${SECS[$c]}" "$note" >>"$RES/summary.tsv"
  [ "${STATUS[$c]}" = PASS ] || bad=1
done
exit "$bad"
