"""Where calibration needs float64: the stepping state in float32 vs float64 (CPU), as docs/calibration.md reports.

    python scripts/state_precision.py gmm digits

Per model: (1) the reference solution (Heun, 128 steps) integrated in float32 vs float64; (2) base samplers at
NFE 5/9/19 run in float32 vs float64, against their error vs the reference; (3) the local IIA fit with a float32
trajectory, targets and basis (products summed into float64 normal equations) vs float64: coefficients and
held-out RMSE; (4) the time of a sampler run in either precision vs its network calls alone. The network runs in
float32 either way (Denoiser), as it does in the graph.
"""

from __future__ import annotations

import sys
import time

import torch

import iia.calibration.fit as fit
from iia.calibration.evalset import evaluation_set, sample_errors
from iia.calibration.fit import CalibrationOptions, calibrate
from iia.calibration.sampling import integrate, sample
from iia.calibration.schedules import karras_sigmas, program_for
from iia.models import load


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def local_fit(d, nfe: int, opts: CalibrationOptions, dtype: torch.dtype):
    """calibrate() with its calibration noises (hence trajectory, targets, basis) in `dtype`."""
    draw = fit.draw_noise
    fit.draw_noise = lambda den, n, seed, labels=None: (lambda t: (t[0].to(dtype), t[1]))(draw(den, n, seed, labels))
    try:
        return calibrate(d, "iia-edm", nfe, opts, guard=False)
    finally:
        fit.draw_noise = draw


def report(spec: str) -> None:
    d = load(spec)
    ev = evaluation_set(d, 128, 10**6 + 7, 128)
    ref = ev.reference
    print(f"== {spec}")
    sig = karras_sigmas(128, d.sigma_min, d.sigma_max, 7.0, d.round_sigma)
    r32 = integrate("edm", d, ev.noise.to(torch.float32) * sig[0], sig, ev.labels).to(torch.float64)
    print(f"reference (Heun 128): rms |f32 - f64| = {rms(r32 - ref):.3g} (data rms {rms(ref):.3g})")
    for solver in ("ipndm", "edm"):
        for nfe in (5, 9, 19):
            prog = program_for(d, solver, nfe, 1, "karras")
            x64 = sample(prog, d, ev.noise, ev.labels)
            x32 = sample(prog, d, ev.noise, ev.labels, dtype=torch.float32).to(torch.float64)
            print(f"{solver:6s} NFE {nfe:2d}: sampler rmse {rms(x64 - ref):.4g}; rms |f32 - f64| {rms(x32 - x64):.3g} "
                  f"({rms(x32 - x64) / rms(x64 - ref):.1e} of the error)")
    opts = CalibrationOptions(holdout=128, reference_steps=128, batch=128)
    for nfe in (5, 9):
        f64, f32 = local_fit(d, nfe, opts, torch.float64), local_fit(d, nfe, opts, torch.float32)
        worst = max(abs(a - b) / max(abs(a), abs(b), 1.0) for s, t in zip(f64.program.steps, f32.program.steps)
                    for a, b in zip(s.coefficients, t.coefficients))
        err = {k: rms(sample_errors(sample(p, d, ev.noise, ev.labels), ev.reference_at(p.sigmas[0])))
               for k, p in (("base", f64.base_program), ("f64", f64.program), ("f32", f32.program))}
        print(f"local fit iia-edm NFE {nfe}: max relative coefficient difference {worst:.3g}; held-out rmse base "
              f"{err['base']:.5g}, fit with a float64 state {err['f64']:.5g}, float32 state {err['f32']:.5g}")
    prog = program_for(d, "ipndm", 9, 1, "karras")
    for dtype in (torch.float64, torch.float32):  # warm-up
        sample(prog, d, ev.noise, ev.labels, dtype=dtype)
    seconds = {}
    for dtype in (torch.float64, torch.float32):
        t0 = time.perf_counter()
        sample(prog, d, ev.noise, ev.labels, dtype=dtype)
        seconds[dtype] = time.perf_counter() - t0
    x, t0 = ev.noise.to(torch.float32), time.perf_counter()
    for _ in range(9):
        d(x, 1.0, ev.labels)
    net = time.perf_counter() - t0
    print(f"ipndm NFE 9, 128 noises: float64 state {seconds[torch.float64] * 1e3:.1f} ms, float32 state "
          f"{seconds[torch.float32] * 1e3:.1f} ms, the 9 network calls alone {net * 1e3:.1f} ms")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["gmm", "digits"]:
        report(name)
