"""Every kind of diffusers folder either samples like diffusers' own scheduler or is refused by name.

Each test builds its own tiny random-weight UNet2DModel and scheduler config (no downloads) and compares
iia's sampler with diffusers' scheduler `step` loop on the folder's config, or asserts the refusal names
the setting.
"""

import json

import numpy as np
import pytest
import torch

from iia.calibration.sampling import sample
from iia.calibration.schedules import program_for
from iia.calibration.schedules import timestep_selection
from iia.models import load

diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional extra for diffusers folders")


def tiny_unet(channels=1, size=8, out_channels=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=out_channels or channels,
                                 layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), **kwargs).eval()


def save_folder(path, unet, scheduler, model_index=None):
    unet.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    if model_index is not None:
        (path / "model_index.json").write_text(json.dumps(model_index))
    return path


def ddim_reference(folder, steps, z, class_labels=None, **overrides):
    """diffusers' DDIMScheduler built from the folder's scheduler config, eta = 0, from z_T = z."""
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", **overrides)
    sched.set_timesteps(steps)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    channels = unet.config.in_channels
    kwargs = {"class_labels": class_labels} if class_labels is not None else {}
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(z, t, **kwargs).sample[:, :channels]  # learned variance: DDPMScheduler's split
            z = sched.step(out, t, z, eta=0.0).prev_sample
    return z.double(), sched


def ours_from_same_noise(denoiser, program, z_T, class_labels=None):
    # diffusers starts from z_T (alphabar-scaled); iia's state is x = z / sqrt(alphabar) = z sqrt(1 + sigma^2)
    s0 = program.sigmas[0]
    noise = z_T.double() * (1 + s0**2) ** 0.5 / s0
    return sample(program, denoiser, noise, class_labels)


BETA_CASES = {
    # scheduler class, its config, UNet shape / out_channels, steps
    "ddpm-eps-leading-offset1": ("DDPMScheduler", dict(clip_sample=False, steps_offset=1), (1, 8, 1), 10),
    "ddim-v-trailing": ("DDIMScheduler", dict(clip_sample=False, prediction_type="v_prediction",
                                              timestep_spacing="trailing", beta_schedule="scaled_linear",
                                              beta_start=0.00085, beta_end=0.012), (1, 8, 1), 10),
    "pndm-sample-leading": ("PNDMScheduler", dict(prediction_type="sample", steps_offset=1, set_alpha_to_one=True,
                                                  skip_prk_steps=True), (1, 8, 1), 5),
    "ddpm-learned-variance-nonsquare": ("DDPMScheduler", dict(clip_sample=False, variance_type="learned_range",
                                                              beta_schedule="squaredcos_cap_v2"),
                                        (3, (8, 12), 6), 8),
}


@pytest.mark.parametrize("case", list(BETA_CASES))
def test_beta_table_folder_ddim_matches_diffusers(case, tmp_path):
    """--solver ddim on the folder's default schedule == DDIMScheduler.from_config(folder) step loop, <= 1e-4."""
    class_name, config, (channels, size, out_channels), steps = BETA_CASES[case]
    folder = save_folder(tmp_path / case, tiny_unet(channels, size, out_channels),
                         getattr(diffusers, class_name)(num_train_timesteps=1000, **config))
    d = load(folder)
    h, w = (size, size) if isinstance(size, int) else size
    assert d.shape == (channels, h, w)
    assert d.default_schedule == config.get("timestep_spacing", "leading")
    program = program_for(d, "ddim", steps)
    z = torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(1))
    # PNDMScheduler has no clip_sample: DDIMScheduler.from_config would add its own default (True)
    ref, sched = ddim_reference(folder, steps, z, **({} if "clip_sample" in config else {"clip_sample": False}))
    table = d.sigma_table
    assert np.allclose(program.sigmas[:-1], table[sched.timesteps].numpy())
    ours = ours_from_same_noise(d, program, z)
    assert (ours - ref).abs().max() <= 1e-4
    block = "\n".join(d.report)
    assert class_name in block and config.get("prediction_type", "epsilon") in block
    assert f"timestep_spacing '{config.get('timestep_spacing', 'leading')}'" in block
    if out_channels == 2 * channels:
        assert "learned variance" in block


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_timestep_selection_is_diffusers_set_timesteps(spacing, offset, steps):
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    assert timestep_selection(1000, steps, spacing, offset)[::-1] == sched.timesteps.tolist()


def test_linspace_spacing_says_diffusers_ddim_steps_elsewhere(tmp_path):
    folder = save_folder(tmp_path / "lin", tiny_unet(),
                         diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="linspace"))
    d = load(folder)
    assert d.default_schedule == "linspace"
    assert any("changed" in line and "linspace" in line and "12633" in line for line in d.report)


def clipped_folder(tmp_path, **config):
    return save_folder(tmp_path / "clip", tiny_unet(), diffusers.DDIMScheduler(**config))


def test_clip_sample_refused_by_name_then_clip_or_ignore(tmp_path):
    folder = clipped_folder(tmp_path, clip_sample=True, clip_sample_range=1.0)
    with pytest.raises(ValueError, match=r"clip_sample=True.*--x0-clipping"):
        load(folder)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    steps = 10
    # clip: D clamped == diffusers' DDIM with use_clipped_model_output=True
    d = load(folder, x0_clipping="clip")
    program = program_for(d, "ddim", steps)
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(steps)
    unet = d.net.unet
    zz = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            zz = sched.step(unet(zz, t).sample, t, zz, eta=0.0, use_clipped_model_output=True).prev_sample
    clipped = ours_from_same_noise(d, program, z)
    assert (clipped - zz.double()).abs().max() <= 1e-4
    assert clipped.abs().max() <= 1.0 + 1e-6
    # ignore: the unclipped ODE, said so; == diffusers with clip_sample=False
    d = load(folder, x0_clipping="ignore")
    assert any("clip_sample=True" in line and "ignored" in line for line in d.report)
    ref, _ = ddim_reference(folder, steps, z, clip_sample=False)
    unclipped = ours_from_same_noise(d, program_for(d, "ddim", steps), z)
    assert (unclipped - ref).abs().max() <= 1e-4
    assert (unclipped - clipped).abs().max() > 0.1  # the random-weight model really gets clipped


def test_thresholding_refused_unless_ignored(tmp_path):
    folder = clipped_folder(tmp_path, clip_sample=False, thresholding=True)
    with pytest.raises(ValueError, match=r"thresholding=True.*--x0-clipping ignore"):
        load(folder)
    with pytest.raises(ValueError, match=r"clip implements clip_sample, not thresholding"):
        load(folder, x0_clipping="clip")
    assert any("thresholding" in line for line in load(folder, x0_clipping="ignore").report)


def test_zero_terminal_snr_caps_sigma_max_and_says_so(tmp_path):
    sched = diffusers.DDIMScheduler(clip_sample=False, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                    prediction_type="v_prediction")
    assert float(sched.alphas_cumprod[-1]) == 0.0
    d = load(save_folder(tmp_path / "zsnr", tiny_unet(), sched))
    table = d.sigma_table
    assert np.isfinite(d.sigma_max) and d.sigma_max == float(table[-2]) == float(table[-1])
    assert any("rescale_betas_zero_snr" in line and "capped" in line for line in d.report)
    program = program_for(d, "ddim", 10)
    assert program.sigmas[0] == d.sigma_max
    out = sample(program, d, torch.randn(2, 1, 8, 8, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_edm_euler_folder_matches_diffusers(tmp_path):
    """EDM formulation (sigma_data preconditioning, v_prediction): iia's ddim (Euler in sigma) on the folder's
    Karras schedule == EDMEulerScheduler's step loop from the same x_T."""
    sched = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="v_prediction")
    folder = save_folder(tmp_path / "edm", tiny_unet(channels=2, size=(8, 4)), sched)
    d = load(folder)
    assert (d.sigma_min, d.sigma_max, d.default_schedule) == (0.002, 80.0, "karras")
    steps = 8
    program = program_for(d, "ddim", steps)
    noise = torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(3))
    sched.set_timesteps(steps)
    assert np.allclose(program.sigmas, sched.sigmas.double().numpy(), rtol=1e-6)
    unet = d.net.unet
    x = noise * program.sigmas[0]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    ours = sample(program, d, noise.double())
    assert (ours - x.double()).abs().max() <= 1e-4 * max(1.0, float(x.abs().max()))
    assert any("sigma_data 0.5" in line for line in d.report)


def test_ve_score_sde_folder_denoiser_matches_diffusers_predictor(tmp_path):
    """VE: D = x + sigma^2 score with images in [0, 1], presented in [-1, 1] (x' = 2x - 1, sigma' = 2 sigma).
    diffusers' predictor mean x + (sigma^2 - sigma_prev^2) score must follow from iia's D."""
    sched = diffusers.ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0, num_train_timesteps=20)
    unet = tiny_unet(channels=1, size=8, time_embedding_type="fourier")
    folder = save_folder(tmp_path / "ve", unet, sched)
    d = load(folder)
    assert (d.sigma_min, d.sigma_max) == pytest.approx((0.02, 100.0))
    assert d.default_schedule == "exponential"
    assert any("VE score SDE" in line for line in d.report)
    sched.set_timesteps(20)
    sched.set_sigmas(20)
    x01 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 3
    for i in (0, 7, 15):
        t, sigma = sched.timesteps[i], sched.sigmas[i]
        with torch.no_grad():
            score = unet(x01, sigma * torch.ones(2)).sample
        mean = sched.step_pred(score, t, x01, generator=torch.Generator().manual_seed(0)).prev_sample_mean
        d_prime = d(2 * x01 - 1, 2 * float(sigma))
        ours_score = ((d_prime + 1) / 2 - x01) / float(sigma) ** 2
        idx = int(t * (len(sched.timesteps) - 1))
        s_hi, s_lo = sched.discrete_sigmas[idx], sched.discrete_sigmas[idx - 1] if idx > 0 else 0.0
        expected = x01 + (s_hi**2 - s_lo**2) * ours_score
        assert (mean - expected).abs().max() <= 1e-4 * max(1.0, float(mean.abs().max()))
    # the sampler runs end to end on the default (geometric) schedule and lands in image range scale
    out = sample(program_for(d, "ddim", 6), d, torch.randn(2, 1, 8, 8, dtype=torch.float64))
    assert torch.isfinite(out).all()


def test_class_conditional_folder_feeds_labels(tmp_path):
    folder = save_folder(tmp_path / "cond", tiny_unet(num_class_embeds=3), diffusers.DDIMScheduler(clip_sample=False))
    d = load(folder)
    assert d.label_dim == 3 and "3 classes" in d.report[0]
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2])
    ref, _ = ddim_reference(folder, 6, z, class_labels=labels)
    ours = ours_from_same_noise(d, program_for(d, "ddim", 6), z, labels)
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("unet_kwargs,scheduler,match", [
    (dict(num_class_embeds=None, class_embed_type="timestep"), "DDIMScheduler", "class_embed_type 'timestep'"),
    (dict(), "EulerDiscreteScheduler", "_class_name 'EulerDiscreteScheduler'"),
    (dict(time_embedding_type="fourier"), "DDIMScheduler", "time_embedding_type 'fourier'"),
])
def test_refused_by_name(tmp_path, unet_kwargs, scheduler, match):
    sched = getattr(diffusers, scheduler)()
    if scheduler == "DDIMScheduler":
        sched = diffusers.DDIMScheduler(clip_sample=False)
    folder = save_folder(tmp_path / "refused", tiny_unet(**unet_kwargs), sched)
    with pytest.raises(ValueError, match=match):
        load(folder)


def test_latent_folder_refused_naming_the_vae(tmp_path):
    folder = save_folder(tmp_path / "ldm", tiny_unet(), diffusers.DDIMScheduler(clip_sample=False),
                         {"_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"],
                          "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]})
    with pytest.raises(ValueError, match=r"latent pipeline \(vqvae: VQModel\)"):
        load(folder)


def test_x0_clipping_flag_only_for_diffusers_folders():
    with pytest.raises(ValueError, match="--x0-clipping ignore applies to diffusers folders only"):
        load("gmm", x0_clipping="ignore")


def test_compile_nonsquare_learned_variance_v_folder_matches_diffusers(tmp_path):
    """End to end: iia-compile's block names the scheduler, prediction type and spacing; the ONNX sampler
    (--solver ddim, the folder's own spacing) equals diffusers' DDIM loop on the folder's config."""
    import onnxruntime as ort

    from iia.compiler.build import CompileOptions, compile_model

    sched = diffusers.DDPMScheduler(clip_sample=True, prediction_type="v_prediction", variance_type="learned",
                                    steps_offset=1)
    folder = save_folder(tmp_path / "vlearned", tiny_unet(channels=3, size=(4, 8), out_channels=6), sched)
    lines = []
    compile_model(str(folder), tmp_path / "art", CompileOptions(nfe=6, solver="ddim", x0_clipping="ignore"),
                  log=lines.append)
    text = "\n".join(lines)
    for needed in ("DDPMScheduler", "prediction_type v_prediction", "timestep_spacing 'leading', steps_offset 1",
                   "clip_sample=True", "ignored", "learned variance", "3x4x8"):
        assert needed in text, needed
    z = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(6))
    ref, sched = ddim_reference(folder, 6, z, clip_sample=False)
    assert sched.timesteps.tolist() == [831, 665, 499, 333, 167, 1]
    s0 = float(load(folder, x0_clipping="ignore").sigma_table[831])
    noise = (z.double() * (1 + s0**2) ** 0.5 / s0).float().numpy()
    session = ort.InferenceSession(str(tmp_path / "art" / "sampler.onnx"), providers=["CPUExecutionProvider"])
    images = session.run(["images"], {"noise": noise})[0]
    assert np.abs(images - ref.numpy()).max() <= 1e-4


def test_broken_weights_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    sched = diffusers.DDIMScheduler(clip_sample=False)
    folder = save_folder(tmp_path / "w", tiny_unet(), sched)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(k for k in tensors if k.startswith("up_blocks.1."))
    save_file({k: v for k, v in tensors.items() if k not in dropped}, weights)
    with pytest.raises(ValueError, match=rf"diffusion_pytorch_model.safetensors does not fit its config.json: "
                                         rf"{len(dropped)} missing keys"):
        load(folder)
    tensors[dropped[0]] = torch.full_like(tensors[dropped[0]], float("nan"))
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=f"parameter {dropped[0]} holds NaN/Inf"):
        load(folder)
    save_file({k: v for k, v in tensors.items() if k != dropped[0]} | {dropped[0]: torch.zeros(3, 3)}, weights)
    with pytest.raises(ValueError, match=r"safetensors could not be loaded \(truncated or corrupt, or made for another "
                                         r"config.json\): .*size mismatch") as info:
        load(folder)
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)  # torch's list runs to thousands of characters
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"safetensors could not be loaded \(truncated or corrupt"):
        load(folder)
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model.safetensors \(or .bin\); found "
                                         r"diffusion_pytorch_model.fp16.safetensors"):
        load(folder)


def test_doubled_channels_with_fixed_variance_refused(tmp_path):
    folder = save_folder(tmp_path / "v", tiny_unet(out_channels=2),
                         diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small"))
    with pytest.raises(ValueError, match="variance_type is 'fixed_small'"):
        load(folder)


def test_guard_reference_starts_where_a_leading_schedule_starts(tmp_path):
    """diffusers' leading timesteps start below t = T - 1, so the sampler starts at sigmas[0] * noise < sigma_max *
    noise; the guard's reference must integrate from there (from sigma_max it judged another trajectory: errors of
    the size of the image, the same for base and fit, and a meaningless decision)."""
    from iia.calibration.fit import CalibrationOptions, calibrate
    from iia.calibration.sampling import reference_solution
    from iia.runtime.contract import draw_noise

    folder = save_folder(tmp_path / "lead", tiny_unet(), diffusers.DDIMScheduler(
        num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1, clip_sample=False))
    denoiser = load(str(folder))
    options = CalibrationOptions(batch=4, holdout=8, reference_steps=24, seed=0)
    leading = calibrate(denoiser, "iia-ddim", 5, options)
    trailing = calibrate(denoiser, "iia-ddim", 5, options, schedule="trailing")
    s0 = float(leading.base_program.sigmas[0])
    assert s0 < 0.5 * denoiser.sigma_max and float(trailing.base_program.sigmas[0]) == pytest.approx(denoiser.sigma_max)
    # the same solver at the same NFE: errors of the same order, each against its own start
    assert leading.guard["rmse_base"] < 3 * trailing.guard["rmse_base"]
    # and the guard's number is the error against a fine integration from the sampler's start, not from sigma_max
    noise = torch.from_numpy(draw_noise(1234, 8, denoiser.shape)).double()
    x = sample(leading.base_program, denoiser, noise)
    own = float(((x - reference_solution(denoiser, noise, None, 24, sigma_start=s0)) ** 2).mean().sqrt())
    other = float(((x - reference_solution(denoiser, noise, None, 24)) ** 2).mean().sqrt())
    assert own < 0.2 * other
