"""New solver families reproduce diffusers' own schedulers on the same sigmas, noise and denoiser; they compile."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from iia.calibration.fit import draw_noise
from iia.calibration.sampling import sample
from iia.calibration.schedules import program_for
from iia.calibration.schedules import karras_sigmas
from iia.calibration.solvers import build_program
from iia.models import load

pytest.importorskip("diffusers", reason="the peers are diffusers' schedulers (optional extra)")
from iia.evaluation.peers import run_peer  # noqa: E402


@pytest.fixture(scope="module")
def gmm():
    return load("gmm")


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _max_diff(ours, peer, denoiser, sigmas, n=32):
    noise, labels = draw_noise(denoiser, n, 3)
    a = sample(build_program(ours, sigmas), denoiser, noise, labels)
    b = run_peer(peer, denoiser, sigmas, noise, labels)
    assert torch.isfinite(a).all() and a.abs().max() > 0.1
    return float((a - b).abs().max())


@pytest.mark.parametrize("nfe", [4, 7])
@pytest.mark.parametrize("ours,peer", [("unipc-2", "unipc-bh2"), ("unipc-3", "unipc-bh2-3")])
def test_unipc_matches_diffusers(gmm, ours, peer, nfe):
    sigmas = program_for(gmm, ours, nfe).sigmas  # Karras, then 0
    assert _max_diff(ours, peer, gmm, sigmas) <= 1e-4


@pytest.mark.parametrize("nfe", [4, 7])
@pytest.mark.parametrize("order", [2, 3])
def test_deis_matches_diffusers(gmm, order, nfe):
    # diffusers' DEIS cannot step to sigma = 0: both run NFE steps over NFE + 1 Karras sigmas ending at sigma_min
    sigmas = karras_sigmas(nfe + 1, gmm.sigma_min, gmm.sigma_max)[:-1].tolist()
    assert _max_diff(f"deis-{order}", f"deis-{order}", gmm, sigmas) <= 1e-4


@pytest.mark.parametrize("nfe", [5, 8])
@pytest.mark.parametrize("ours,peer", [("dpm-solver++", "dpm++2m"), ("dpm-solver++3m", "dpm++3m")])
def test_dpmpp_matches_diffusers(digits, ours, peer, nfe):
    # diffusers' DPM-Solver casts states to float32; the digits net keeps that rounding from being amplified
    sigmas = program_for(digits, ours, nfe).sigmas
    assert _max_diff(ours, peer, digits, sigmas, n=16) <= 1e-4


def test_heun_peer_is_edm_heun(gmm):
    sigmas = program_for(gmm, "edm", 7).sigmas
    assert _max_diff("edm", "heun", gmm, sigmas) <= 1e-6


def test_orders_differ(gmm):
    # the three orders are different samplers (a harness that ignored the order would pass the tests above)
    sigmas = program_for(gmm, "unipc-3", 8).sigmas
    noise, _ = draw_noise(gmm, 8, 0)
    outs = [sample(build_program(s, sigmas), gmm, noise) for s in ("unipc-2", "unipc-3", "dpm-solver++3m", "deis-3")]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def gmm_onnx(gmm):
    from iia.compiler.export import export_denoiser

    return export_denoiser(gmm, 8)


@pytest.mark.parametrize("solver", ["unipc-3", "deis-3", "dpm-solver++3m"])
def test_new_solvers_compile_to_one_graph(gmm, gmm_onnx, solver):
    from iia.calibration.solvers import Denoise
    from iia.compiler.emit import emit_sampler
    from iia.compiler.fold import plan_folding

    program = program_for(gmm, solver, 6)
    plan = plan_folding(gmm_onnx, [op.sigma for op in program.ops() if isinstance(op, Denoise)])
    model = emit_sampler(program, gmm_onnx, gmm.shape, False, plan=plan)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    noise, _ = draw_noise(gmm, 4, 1)
    got = sess.run(["images"], {"noise": noise.numpy().astype(np.float32)})[0]
    ref = sample(program, gmm, noise.to(torch.float32).to(torch.float64)).numpy()
    assert np.abs(got - ref).max() < 1e-3
