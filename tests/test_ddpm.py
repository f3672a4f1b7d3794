"""Discrete DDPMs from diffusers folders; DDIM time-step selections; PNDM family; DPM-Solver++."""

import numpy as np
import pytest
import torch

from iia.calibration.fit import CalibrationOptions, draw_noise
from iia.calibration.sampling import sample
from iia.calibration.schedules import program_for
from iia.calibration.schedules import discrete_sigmas
from iia.models import gaussian_mixture

diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional extra for DDPM folders")


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A tiny randomly initialised UNet2DModel with an attention block, saved as a diffusers folder."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    path = tmp_path_factory.mktemp("ddpm") / "tiny-ddpm"
    unet.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def ddpm(ddpm_folder):
    from iia.models import load

    return load(ddpm_folder)


def test_sigma_convention_and_table(ddpm):
    ab = torch.as_tensor(diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod, dtype=torch.float64)
    assert torch.allclose(ddpm.sigma_table, ((1 - ab) / ab).sqrt())
    t = ddpm.net.sigma_to_t(ddpm.sigma_table[[0, 10, 999]].float())
    assert torch.allclose(t, torch.tensor([0.0, 10.0, 999.0]), atol=1e-3)


def test_ddim_step_matches_diffusers_ddim_scheduler(ddpm, ddpm_folder):
    """Our DDIM on the uniform selection equals diffusers' DDIMScheduler.step (eta = 0), x = z / sqrt(ab)."""
    steps = 10
    sched = diffusers.DDIMScheduler.from_pretrained(ddpm_folder / "scheduler", set_alpha_to_one=True, clip_sample=False,
                                                    timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(steps)
    program = program_for(ddpm, "ddim", steps, schedule="uniform")
    table = ddpm.sigma_table
    expected_t = list(range(0, 1000, 100))[::-1]
    assert sched.timesteps.tolist() == expected_t
    assert np.allclose(program.sigmas[:-1], table[expected_t].numpy())
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 8, 8, generator=gen)
    unet = ddpm.net.unet
    x = z.double() * (1 + table[expected_t[0]] ** 2).sqrt()  # x_T = z_T / sqrt(ab_T) = z_T sqrt(1 + sigma_T^2)
    noise_for_ours = x * (1 / program.sigmas[0])
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(z, t).sample
            z = sched.step(eps, t, z, eta=0.0).prev_sample
    ours = sample(program, ddpm, noise_for_ours)
    assert (ours - z.double()).abs().max() < 1e-4


@pytest.mark.parametrize("kind,n", [("uniform", 10), ("quadratic", 10)])
def test_ddim_timestep_selections(kind, n):
    table = torch.linspace(0.01, 150.0, 1000, dtype=torch.float64)
    sig = discrete_sigmas(table, n, kind)
    assert len(sig) == n + 1 and sig[-1] == 0 and sig[-2] == table[0]
    idx = [int((table == s).nonzero()) for s in sig[:-1]]
    if kind == "uniform":
        assert idx == list(range(900, -1, -100))
    else:
        assert idx == sorted((np.linspace(0, np.sqrt(800), n) ** 2).astype(int).tolist(), reverse=True)


def test_discrete_schedule_needs_discrete_model():
    with pytest.raises(ValueError, match="discrete model"):
        program_for(gaussian_mixture(shape=(4,)), "ddim", 10, schedule="uniform")


@pytest.fixture(scope="module")
def gmm():
    return gaussian_mixture(shape=(16,), components=4, seed=3)


def d_of(D, x, s):
    return (x - D(x, s)) / s


def test_ipndm_matches_textbook_adams_bashforth(gmm):
    noise, _ = draw_noise(gmm, 4, 0)
    program = program_for(gmm, "ipndm", 8)
    sig = program.sigmas
    x, hist = noise.double() * sig[0], []
    for i in range(len(sig) - 1):
        hist.insert(0, d_of(gmm, x, sig[i]))
        h = sig[i + 1] - sig[i]
        order = min(len(hist), 4)
        if order == 1:
            x = x + h * hist[0]
        elif order == 2:
            x = x + h * (3 * hist[0] - hist[1]) / 2
        elif order == 3:
            x = x + h * (23 * hist[0] - 16 * hist[1] + 5 * hist[2]) / 12
        else:
            x = x + h * (55 * hist[0] - 59 * hist[1] + 37 * hist[2] - 9 * hist[3]) / 24
    assert torch.allclose(sample(program, gmm, noise), x, atol=1e-10)
    assert sample(program_for(gmm, "iia-ipndm", 8, r=1), gmm, noise).sub(x).abs().max() < 1e-10


def test_spndm_heun_first_then_ab2(gmm):
    noise, _ = draw_noise(gmm, 4, 1)
    program = program_for(gmm, "spndm", 7)
    assert program.nfe == 7
    sig = program.sigmas
    x = noise.double() * sig[0]
    d0 = d_of(gmm, x, sig[0])
    xp = x + (sig[1] - sig[0]) * d0
    x = x + (sig[1] - sig[0]) * 0.5 * (d0 + d_of(gmm, xp, sig[1]))
    prev = d0  # the first step's slope is the history of the first multistep step
    for i in range(1, len(sig) - 1):
        d = d_of(gmm, x, sig[i])
        h = sig[i + 1] - sig[i]
        x = x + h * (3 * d - prev) / 2
        prev = d
    assert torch.allclose(sample(program, gmm, noise), x, atol=1e-10)


def test_dpmpp_2m_matches_textbook(gmm):
    noise, _ = draw_noise(gmm, 4, 2)
    program = program_for(gmm, "dpm-solver++", 8)
    sig = program.sigmas
    x, old = noise.double() * sig[0], None
    for i in range(len(sig) - 1):
        D = gmm(x, sig[i])
        if old is None or sig[i + 1] == 0:
            x = sig[i + 1] / sig[i] * x + (1 - sig[i + 1] / sig[i]) * D
        else:
            h, h_last = np.log(sig[i] / sig[i + 1]), np.log(sig[i - 1] / sig[i])
            q = h_last / h
            Dp = (1 + 1 / (2 * q)) * D - 1 / (2 * q) * old
            x = sig[i + 1] / sig[i] * x - np.expm1(-h) * Dp
        old = D
    assert torch.allclose(sample(program, gmm, noise), x, atol=1e-10)


def test_compile_ddpm_folder_iia_ddim_nfe10(ddpm_folder, tmp_path):
    import onnxruntime as ort

    from iia.calibration.artifact import load_program
    from iia.compiler.build import CompileOptions, compile_model

    out = tmp_path / "art"
    opts = CompileOptions(nfe=10, solver="iia-ddim", calibration=CalibrationOptions(
        batch=16, holdout=8, reference_steps=24, schedule="uniform"))
    manifest = compile_model(str(ddpm_folder), out, opts, log=lambda s: None)
    assert manifest["parity"]["max_abs"] <= 1e-4
    from iia.models import load

    d = load(ddpm_folder)
    program = load_program(out / "coefficients.json", d, 10)
    noise = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(out / "sampler.onnx"), providers=["CPUExecutionProvider"])
    images = sess.run(["images"], {"noise": noise})[0]
    ref = sample(program, d, torch.from_numpy(noise)).numpy()
    assert np.abs(images - ref).max() < 1e-4
