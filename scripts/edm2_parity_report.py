"""Issue 14 floors, measured: tiny EDM2-style nets of our own (tests/fixtures/edm2_like) compiled with --solver edm;
ONNX Runtime vs a PyTorch implementation of EDM2's sampler definition (tests/test_edm2.py), plain and guided
(g = 1.4) latent with a tiny random AutoencoderKL; images_uint8 agreement; stored weights. Run from the repo root:
`OMP_NUM_THREADS=1 python scripts/edm2_parity_report.py` (about 2-3 minutes on 2 cores)."""
import sys, numpy as np, torch, onnx
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's iia and the test fixtures

from edm_fixtures import make_edm2_pickle
from test_edm2 import edm2_sampler, one_hot, run_graph
from iia.compiler.build import CompileOptions, compile_model
from iia.compiler.emit import initializer_bytes
from iia.models.edm_pickle import load_edm_pickle
from diffusers import AutoencoderKL
import tempfile
w = Path(tempfile.mkdtemp(prefix="iia-floors14-"))
make_edm2_pickle(w/"net.pkl", label_dim=10, seed=0)
make_edm2_pickle(w/"lat.pkl", channels=4, label_dim=10, encoder="latent", seed=2)
make_edm2_pickle(w/"latg.pkl", channels=4, label_dim=0, model_channels=4, encoder="latent", seed=3)
torch.manual_seed(0)
AutoencoderKL(down_block_types=("DownEncoderBlock2D",)*2, up_block_types=("UpDecoderBlock2D",)*2, block_out_channels=(8,16),
              layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).save_pretrained(w/"vae")
q = lambda s: None
m1 = compile_model(str(w/"net.pkl"), w/"a1", CompileOptions(nfe=9, solver="edm", engine=False, force=True), log=q)
den = load_edm_pickle(w/"net.pkl")
rng = np.random.default_rng(0)
for B in (1, 7):
    noise, labels = rng.standard_normal((B,3,8,8)).astype(np.float32), rng.integers(0,10,B)
    im, = run_graph(w/"a1"/"sampler.onnx", {"noise": noise, "class_labels": labels}, ["images"])
    ref = edm2_sampler(den.net.precond, torch.from_numpy(noise), one_hot(labels,10))
    print(f"pixel edm nfe9 batch {B}: max|ORT - EDM2 def| = {np.abs(im-ref.numpy()).max():.3g}")
print("pixel stored/params", m1["weights"]["ratio_vs_params"])
m2 = compile_model(str(w/"lat.pkl"), w/"a2", CompileOptions(nfe=9, solver="edm", engine=False, force=True, guide=str(w/"latg.pkl"), guidance=1.4, vae=str(w/"vae")), log=q)
net, g = load_edm_pickle(w/"lat.pkl"), load_edm_pickle(w/"latg.pkl")
vae = AutoencoderKL.from_pretrained(str(w/"vae")).eval()
noise, labels = rng.standard_normal((16,4,8,8)).astype(np.float32), rng.integers(0,10,16)
lat, u8 = run_graph(w/"a2"/"sampler.onnx", {"noise": noise, "class_labels": labels}, ["latents", "images_uint8"])
ref = edm2_sampler(net.net.precond, torch.from_numpy(noise), one_hot(labels,10), gnet=g.net.precond, guidance=1.4)
raw = (ref - net.decode.latent_bias) / net.decode.latent_scale
with torch.no_grad():
    ru8 = (vae.decode(raw).sample.clamp(0,1)*255).to(torch.uint8).permute(0,2,3,1).numpy()
d = np.abs(u8.astype(int)-ru8.astype(int))
params = sum(p.numel()*4 for m in (net.net, g.net, vae.decoder, vae.post_quant_conv) for p in m.parameters())
print(f"latent guided g=1.4 batch 16: max|latents - EDM2 def| = {np.abs(lat-ref.numpy()).max():.3g}; images_uint8 within +-1: {(d<=1).mean():.5%} (max diff {d.max()}), exact {(d==0).mean():.4%}, unsaturated {((ru8>0)&(ru8<255)).mean():.1%}")
print(f"stored {initializer_bytes(onnx.load(str(w/'a2'/'sampler.onnx')))} bytes / params(net+guide+decoder) {params} = {initializer_bytes(onnx.load(str(w/'a2'/'sampler.onnx')))/params:.4f}x")
print("timings", m2["timings_s"])
