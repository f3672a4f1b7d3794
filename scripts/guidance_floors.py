"""The floors of a guidance-range artifact (issue 25) on the test fixtures, printed: parity per scale, the guard's table,
stored weights, equality with the single-scale artifact at a node, ORT vs PyTorch with interpolated constants and
held-out RMSE vs the exact fit and the base at g in {1.0, 1.3, 1.7, 2.2, 2.9} (64 noises, 64-step references).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/guidance_floors.py guide|cfg   (writes under /tmp/gc/floors)
"""
import json, sys, numpy as np, torch, onnx
from pathlib import Path
sys.path.insert(0, "tests")
from edm_fixtures import make_edm2_pickle, make_edm_pickle
from iia.calibration.fit import CalibrationOptions
from iia.calibration.sampling import reference_solution, sample
from iia.calibration.solvers import build_program
from iia.compiler.build import CompileOptions, compile_model
from iia.compiler.check import weight_bytes
from iia.compiler.coefficients import obtain_coefficients
from iia.compiler.scales import scale_table
from iia.models import load
from iia.models.edm_pickle import load_edm_pickle
from iia.runtime.contract import GUIDANCE, IMAGES, LABELS, NOISE, draw_labels, draw_noise
from iia.runtime.onnx_backend import OrtSession
root = Path("/tmp/gc/floors"); root.mkdir(exist_ok=True)
kind = sys.argv[1]
cal = CalibrationOptions(batch=64, holdout=64, reference_steps=64)
opts = lambda **kw: CompileOptions(nfe=5, solver="iia-edm", engine=False, cache_dir=str(root/"cache"), force=True, calibration=cal, **kw)
if kind == "guide":
    make_edm2_pickle(root/"net.pkl", label_dim=10, seed=0); make_edm2_pickle(root/"guide.pkl", label_dim=0, model_channels=4, seed=1)
    model, extra, single = root/"net.pkl", dict(guide=str(root/"guide.pkl"), guidance=(1.0, 3.0)), lambda g: dict(guide=str(root/"guide.pkl"), guidance=g)
    den = load(model, guide=root/"guide.pkl", guidance=(1.0, 3.0))
    params = sum(p.numel()*4 for m in (load_edm_pickle(root/"net.pkl").net, load_edm_pickle(root/"guide.pkl").net) for p in m.parameters())
else:
    make_edm_pickle(root/"cfg.pkl", label_dropout=0.1, channels=8)
    model, extra, single = root/"cfg.pkl", dict(cfg=(1.0, 3.0)), lambda g: dict(cfg=g)
    den = load(model, cfg=(1.0, 3.0))
    params = sum(p.numel()*4 for p in load_edm_pickle(root/"cfg.pkl").net.parameters())
out = root/f"{kind}-range"
m = compile_model(str(model), out, opts(**extra), log=lambda s: None)
print("parity per g:", {k: f"{v:.2g}" for k, v in m["parity"]["guidance"].items()}, "tolerance", m["parity"]["tolerance"])
print("guard:", [(r["g"], round(r["rmse_interpolated"],4), round(r["rmse_exact"],4), round(r["rmse_base"],4)) for r in m["guidance"]["guard"]])
print("weights stored / (net+guide params):", weight_bytes(onnx.load(str(out/"sampler.onnx")))["weights"] / params)
node = m["guidance"]["nodes"][1]
s_out = root/f"{kind}-single"
compile_model(str(model), s_out, opts(**single(node)), log=lambda s: None)
feed = {NOISE: draw_noise(7, 3, (3, 8, 8)), LABELS: draw_labels(7, 3, 10)}
a = OrtSession(str(out/"sampler.onnx"), "cpu", 1).run({**feed, GUIDANCE: np.full(3, node, np.float32)}, [IMAGES])[0]
b = OrtSession(str(s_out/"sampler.onnx"), "cpu", 1).run(feed, [IMAGES])[0]
print(f"at node {node:.4g}: range vs single-scale artifact max abs {np.abs(a-b).max():.2g}")
data = json.loads((out/"coefficients.json").read_text())
base = build_program(data["solver"], data["sigmas"], data["r"])
table = scale_table(data["guidance"]["nodes"], [base.with_coefficients(n["coefficients"]) for n in data["nodes"]])
noise = torch.from_numpy(draw_noise(99, 64, (3, 8, 8))).double(); labels = torch.from_numpy(draw_labels(99, 64, 10))
gs = [1.0, 1.3, 1.7, 2.2, 2.9]
feed = {NOISE: draw_noise(5, 5, (3, 8, 8)), LABELS: draw_labels(5, 5, 10), GUIDANCE: np.array(gs, np.float32)}
got = OrtSession(str(out/"sampler.onnx"), "cpu", 1).run(feed, [IMAGES])[0]
for b_, g in enumerate(gs):
    g32 = float(np.float32(g))
    want = sample(table.program_at(g32), den.guidance_range.at(g32), torch.from_numpy(feed[NOISE][b_:b_+1]), torch.from_numpy(feed[LABELS][b_:b_+1])).numpy()
    d = den.guidance_range.at(g)
    ref = reference_solution(d, noise, labels, 64, sigma_start=base.sigmas[0])
    exact = obtain_coefficients(d, "iia-edm", opts(), lambda s: None)[1]
    e = {n: float(((sample(p, d, noise, labels) - ref)**2).mean().sqrt()) for n, p in (("range", table.program_at(g)), ("exact", exact), ("base", base))}
    print(f"g {g}: ORT vs PyTorch(interpolated) {np.abs(got[b_:b_+1]-want).max():.2g}; held-out rmse range {e['range']:.4g} exact {e['exact']:.4g} (ratio {e['range']/e['exact']:.4f}) base {e['base']:.4g}")
