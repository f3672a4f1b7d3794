#!/usr/bin/env bash
# GPU check for issue 14 (EDM2 guided latent model, decoder in the graph): builds the tiny fixtures, compiles
# with the TensorRT engine (fp32), checks the engine against the ONNX Runtime golden outputs, and benchmarks
# TensorRT vs ONNX Runtime CUDA (overhead floor NFE x guided denoiser + one decoder call). < 2 minutes.
# Needs: a CUDA GPU, tensorrt, onnxruntime-gpu, diffusers, torch. Run from the repository root.
set -euo pipefail
work=${1:-/tmp/iia-gpu-check-14}
mkdir -p "$work"
python - "$work" <<'PY'
import sys, torch
sys.path.insert(0, "tests")
from edm_fixtures import make_edm2_pickle
from diffusers import AutoencoderKL
w = sys.argv[1]
make_edm2_pickle(f"{w}/lat.pkl", channels=4, label_dim=10, encoder="latent", seed=2)
make_edm2_pickle(f"{w}/lat-guide.pkl", channels=4, label_dim=0, model_channels=4, encoder="latent", seed=3)
torch.manual_seed(0)
AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4).save_pretrained(f"{w}/vae")
PY
python -c "import sys; from iia.compiler.cli import main; sys.exit(main(sys.argv[1:]))" "$work/lat.pkl" --nfe 9 --solver edm --guide "$work/lat-guide.pkl" --guidance 1.4 \
    --vae "$work/vae" --max-batch 16 --out "$work/art" --force
python - "$work/art" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
print("engine:", m["engine"])
print("parity:", m["parity"])
PY
(cd "$work/art" && polygraphy run sampler.onnx --trt --load-inputs golden_inputs.json \
    --load-outputs golden_outputs.json --atol 1e-3 images_uint8:1 --rtol 0 --check-error-stat max) || echo "TensorRT golden check FAILED"
python -c "import sys; from iia.evaluation.cli import bench_main; sys.exit(bench_main(sys.argv[1:]))" \
    "$work/art" --batch 1,8 --iters 20
