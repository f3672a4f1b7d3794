"""diffusers `save_pretrained` folders (UNet2DModel + scheduler config) as denoisers in the EDM convention.

The scheduler's `_class_name` decides how the network's output becomes D(x; sigma) (x = x0 + sigma * n):

  - beta-table family (DDPMScheduler, DDIMScheduler, PNDMScheduler): alphabar_t from the betas, and with
    sigma_t = sqrt((1 - alphabar_t) / alphabar_t), x = z_t / sqrt(alphabar_t) (Karras et al. 2022, App. C.3):
        c_in = 1 / sqrt(1 + sigma^2)     c_noise = t(sigma) (the training timestep, see `time_mapping`)
        epsilon:       c_skip = 1,                 c_out = -sigma
        sample:        c_skip = 0,                 c_out = 1
        v_prediction:  c_skip = 1 / (1 + sigma^2), c_out = -sigma / sqrt(1 + sigma^2)
                       (x0 = alpha_t z_t - sigma_t v, Salimans & Ho 2022, in x = z / alpha_t)
    The time input comes from sigma through the discrete table: "interpolate" (default; linear in log-sigma
    between neighbouring timesteps, so D is continuous in sigma as the Karras schedule and calibration's fine
    sub-steps need; equal to the discrete model on table sigmas) or "nearest" (snap; `round_sigma` snaps the
    schedule the same way, as EDM does for its iDDPM models).
  - EDM formulation (EDMEulerScheduler, EDMDPMSolverMultistepScheduler), diffusers' `precondition_*`:
        c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = log(sigma) / 4, c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
        c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2) (+ epsilon, - v_prediction).
  - VE score SDE (ScoreSdeVeScheduler; Song et al. 2021): the Fourier-embedded UNet takes (x, sigma) with images
    in [0, 1] and returns the score, so D = x + sigma^2 * score. iia's data convention is [-1, 1]
    (images_uint8 = x * 127.5 + 128), so the folder is presented through x' = 2 x - 1, sigma' = 2 sigma:
        D'(x'; sigma') = 2 D((x' + 1) / 2; sigma' / 2) - 1 = x' + sigma'^2 / 2 * score((x' + 1) / 2, sigma' / 2).

Learned variance (out_channels = 2 C) takes the first C channels, as diffusers' DDPMScheduler does. Everything
the folder asks for that iia does not do is refused by name (`DiffusersLoadError`), or, where a flag allows it,
changed and said so in `Denoiser.report`. diffusers is an optional dependency (`pip install "iia[diffusers]"`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import Denoiser
from .decode import folder_sha256

TIME_MAPPINGS = ("interpolate", "nearest")
BETA_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
ACCEPTED_SCHEDULERS = BETA_SCHEDULERS + EDM_SCHEDULERS + VE_SCHEDULERS
SPACINGS = ("leading", "trailing", "linspace")
X0_CLIPPING = ("ignore", "clip")  # what to do with the scheduler's clip_sample / thresholding
LATENT_COMPONENTS = ("vae", "vqvae")  # model_index.json entries that make a folder a latent pipeline
DIFFUSERS_DDIM_BUG = "https://github.com/huggingface/diffusers/issues/12633"


class DiffusersLoadError(ValueError):
    pass


class DiffusersDenoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x + shift, c_noise) [+ x0 clipping], F the UNet's first C channels.

    `formulation` is "vp" (beta table), "edm" or "ve"; see the module docstring for the coefficients.
    Inputs x float32 [B, C, H, W], sigma float32 [B] (> 0), class_labels int64 [B] for conditional UNets.
    """

    def __init__(self, unet: torch.nn.Module, formulation: str, prediction: str, channels: int,
                 sigma_table: torch.Tensor | None = None, time_mapping: str = "interpolate",
                 sigma_data: float = 0.5, conditional: bool = False, clip_x0: float | None = None):
        super().__init__()
        if time_mapping not in TIME_MAPPINGS:
            raise DiffusersLoadError(f"time mapping must be one of {TIME_MAPPINGS}, got {time_mapping!r}")
        self.unet = unet
        self.formulation = formulation
        self.prediction = prediction
        self.channels = channels
        self.time_mapping = time_mapping
        self.sigma_data = sigma_data
        self.conditional = conditional
        self.clip_x0 = clip_x0
        if sigma_table is not None:
            self.register_buffer("log_sigmas", sigma_table.to(torch.float32).log(), persistent=False)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The beta-table UNet's time input for sigma [B] (float32 timesteps, see `time_mapping`)."""
        log_sigma = sigma.to(torch.float32).log()
        dist = log_sigma[:, None] - self.log_sigmas[None, :]  # [B, T]
        if self.time_mapping == "nearest":
            return dist.abs().argmin(dim=1).to(torch.float32)
        # index of the table entry just below, clamped so that [low, low + 1] is a valid interval
        low = (dist >= 0).to(torch.int64).sum(dim=1).sub(1).clamp(0, self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return low.to(torch.float32) + w

    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, shift, c_noise) for sigma [B]; all but c_noise shaped [B, 1, 1, 1]."""
        s = sigma.reshape(-1, 1, 1, 1)
        one = torch.ones_like(s)
        if self.formulation == "vp":
            c_in, shift, c_noise = 1 / torch.sqrt(1 + s**2), 0 * s, self.sigma_to_t(sigma)
            if self.prediction == "epsilon":
                c_skip, c_out = one, -s
            elif self.prediction == "sample":
                c_skip, c_out = 0 * s, one
            else:  # v_prediction
                c_skip, c_out = 1 / (1 + s**2), -s / torch.sqrt(1 + s**2)
        elif self.formulation == "edm":
            sd = self.sigma_data
            c_in, shift, c_noise = 1 / torch.sqrt(s**2 + sd**2), 0 * s, 0.25 * sigma.log()
            c_skip = sd**2 / (s**2 + sd**2)
            c_out = (1 if self.prediction == "epsilon" else -1) * s * sd / torch.sqrt(s**2 + sd**2)
        else:  # ve: the UNet sees [0, 1] images and sigma / 2 and returns the score (already divided by sigma)
            c_in, shift, c_noise = 0.5 * one, 0.5 * one, sigma / 2
            c_skip, c_out = one, s**2 / 2
        return c_skip, c_out, c_in, shift, c_noise

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.to(x.dtype)
        c_skip, c_out, c_in, shift, c_noise = self.preconditioning(sigma)
        kwargs = {"class_labels": class_labels} if self.conditional else {}
        out = self.unet(x * c_in + shift, c_noise, return_dict=False, **kwargs)[0]
        denoised = c_skip * x + c_out * out[:, : self.channels]  # learned variance: the first C channels
        if self.clip_x0 is not None:
            denoised = denoised.clamp(-self.clip_x0, self.clip_x0)
        return denoised


def sigmas_from_scheduler(scheduler) -> torch.Tensor:
    """sigma_t = sqrt((1 - alphabar_t) / alphabar_t) of a beta-table scheduler, float64 [T], ascending."""
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffusersLoadError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise DiffusersLoadError(f"{path} is not a JSON object")
    return data


def latent_component(path: Path) -> tuple[str, str] | None:
    """(entry, class) of the VAE/VQ-VAE a latent pipeline folder names, or None for a pixel-space folder.

    The hook for latent decoding: a decode stage would load this component; until then loading refuses it.
    """
    index = path / "model_index.json"
    entries = _read_json(index) if index.exists() else {}
    for key in LATENT_COMPONENTS:
        value = entries.get(key)
        if isinstance(value, list) and any(value):
            return key, str(value[-1])
        if (path / key / "config.json").exists():
            return key, str(_read_json(path / key / "config.json").get("_class_name", "?"))
    return None


@dataclass
class SchedulerReading:
    """What iia takes from a scheduler config, and what it says about it (the compile block)."""

    class_name: str
    formulation: str  # "vp" | "edm" | "ve"
    prediction: str
    sigma_min: float
    sigma_max: float
    sigma_table: torch.Tensor | None = None  # vp: float64 [T], the last entry capped if alphabar_T = 0
    net_table: torch.Tensor | None = None  # vp: the finite part the time mapping interpolates
    sigma_data: float = 0.5
    default_schedule: str = "karras"
    rho: float = 7.0
    steps_offset: int = 0
    clip_x0: float | None = None
    variance_type: str | None = None  # the scheduler's, where it has one (DDPMScheduler)
    lines: list[str] = field(default_factory=list)  # accepted settings
    changed: list[str] = field(default_factory=list)  # settings sampled differently from diffusers (said so)


def _clipping(config, sched_file: Path, x0_clipping: str | None) -> tuple[float | None, list[str]]:
    """The scheduler's clip_sample / thresholding under the user's --x0-clipping choice."""
    thresholding = bool(config.get("thresholding", False))
    clip = bool(config.get("clip_sample", False))
    if x0_clipping is not None and x0_clipping not in X0_CLIPPING:
        raise DiffusersLoadError(f"--x0-clipping must be one of {', '.join(X0_CLIPPING)}, got {x0_clipping!r}")
    if not (thresholding or clip):
        if x0_clipping == "clip":
            raise DiffusersLoadError(f"--x0-clipping clip: {sched_file} has neither clip_sample nor thresholding set")
        return None, []
    bound = float(config.get("clip_sample_range", 1.0))
    setting = ("thresholding=True (dynamic thresholding of x0)" if thresholding
               else f"clip_sample=True (x0 clipped to [-{bound:g}, {bound:g}])")
    if x0_clipping is None:
        raise DiffusersLoadError(
            f"{sched_file}: {setting} is applied by diffusers at every step and not by iia's ODE samplers; pass "
            f"--x0-clipping ignore to sample without it" + ("" if thresholding else
                                                             ", or --x0-clipping clip to clip D (diffusers' DDIM with "
                                                             "use_clipped_model_output=True)"))
    if x0_clipping == "ignore":
        return None, [f"{setting}: ignored (--x0-clipping ignore): x0 is not clipped"]
    if thresholding:
        raise DiffusersLoadError(f"{sched_file}: --x0-clipping clip implements clip_sample, not thresholding=True; "
                                 f"pass --x0-clipping ignore")
    return bound, [f"{setting}: D clamped to [-{bound:g}, {bound:g}] (--x0-clipping clip): diffusers' DDIM with "
                   f"use_clipped_model_output=True (its default re-uses the unclipped eps)"]


def _beta_table_reading(scheduler, class_name: str, sched_file: Path, x0_clipping: str | None) -> SchedulerReading:
    config = scheduler.config
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction"):
        raise DiffusersLoadError(f"{sched_file}: prediction_type {prediction!r} is not one of epsilon, sample, v_prediction")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise DiffusersLoadError(f"{sched_file}: timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    table = sigmas_from_scheduler(scheduler)
    T = len(table)
    offset = int(config.get("steps_offset", 0) or 0)
    clip_x0, changed = _clipping(config, sched_file, x0_clipping)
    if not torch.isfinite(table[:-1]).all() or not bool((table[1:] > table[:-1]).all()):
        raise DiffusersLoadError(f"{sched_file}: the beta table gives a non-increasing or infinite sigma before the "
                                 f"last timestep; iia cannot use it")
    net_table = table
    if not math.isfinite(float(table[-1])):
        # zero terminal SNR (rescale_betas_zero_snr): alphabar_{T-1} = 0 has sigma = inf
        net_table = table[:-1]
        table = torch.cat([table[:-1], table[-2:-1]])
        changed.append(f"rescale_betas_zero_snr=True: alphabar[{T - 1}] = 0 (sigma = inf); sigma_max capped at "
                       f"sigma(t={T - 2}) = {float(table[-1]):.6g}, the last finite value: timestep {T - 1} "
                       f"is sampled as t = {T - 2}")
    if config.get("set_alpha_to_one") is False:
        changed.append(f"set_alpha_to_one=False: diffusers' DDIM/PNDM end on t=0 (sigma {float(table[0]):.4g}, "
                       f"output scaled by sqrt(alphabar_0)); iia's samplers end at sigma = 0")
    if spacing in ("linspace", "trailing"):
        stride = f"({T} - 1) / (steps - 1)" if spacing == "linspace" else f"{T} / steps"
        changed.append(f"timestep_spacing {spacing!r}: diffusers' DDIMScheduler.step goes from t to t - {T} // steps, "
                       f"not to the next selected timestep, wherever that differs from the spacing's stride {stride} "
                       f"({DIFFUSERS_DDIM_BUG}); iia steps between the selected timesteps")
    c_form = {"epsilon": "c_skip = 1, c_out = -sigma", "sample": "c_skip = 0, c_out = 1",
              "v_prediction": "c_skip = 1/(1+sigma^2), c_out = -sigma/sqrt(1+sigma^2)"}[prediction]
    lines = [f"beta table ({config.get('beta_schedule', 'trained_betas')}, {T} timesteps): "
             f"sigma = sqrt((1 - alphabar) / alphabar) in [{float(table[0]):.4g}, {float(table[-1]):.6g}]",
             f"prediction_type {prediction}: {c_form}, c_in = 1/sqrt(1+sigma^2), c_noise = t(sigma)",
             f"timesteps: timestep_spacing {spacing!r}, steps_offset {offset} -> default --schedule {spacing} "
             f"(others: karras, exponential, uniform, quadratic, leading, trailing, linspace)"]
    changed.append(f"initial state sigma_0 * noise in iia's units, sigma_0 the schedule's first sigma (sigma_max = "
                   f"{float(table[-1]):.4g} where the timesteps start at t = {T - 1}; lower where leading, uniform or "
                   f"quadratic spacing starts below it); diffusers' pipelines start from unit noise in the VP form, "
                   f"sqrt(sigma_0^2 + 1) * noise in iia's units, a start larger by sqrt(1 + 1/sigma_0^2) (x1.05 at "
                   f"sigma_0 = 3): the same seed gives a different image")
    if class_name == "PNDMScheduler":
        changed.append("PNDMScheduler: its PLMS/PRK warm-up is not reproduced step for step; iia's --solver "
                       "ipndm/spndm are the same linear-multistep family on the same timesteps")
    return SchedulerReading(class_name, "vp", prediction, float(table[0]), float(table[-1]), sigma_table=table,
                            net_table=net_table, default_schedule=spacing, steps_offset=offset, clip_x0=clip_x0,
                            variance_type=config.get("variance_type"), lines=lines, changed=changed)


def _edm_reading(scheduler, class_name: str, sched_file: Path, x0_clipping: str | None) -> SchedulerReading:
    config = scheduler.config
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise DiffusersLoadError(f"{sched_file}: prediction_type {prediction!r} with {class_name}: diffusers' EDM "
                                 f"preconditioning defines epsilon and v_prediction only")
    clip_x0, changed = _clipping(config, sched_file, x0_clipping)
    if config.get("final_sigmas_type", "zero") != "zero":
        changed.append(f"final_sigmas_type {config.get('final_sigmas_type')!r}: diffusers ends at sigma_min; "
                       f"iia's samplers end at sigma = 0")
    changed.append(f"initial state sigma_max * noise (diffusers' pipelines: sqrt(sigma_max^2 + 1) * noise, "
                   f"{class_name}.init_noise_sigma)")
    sd = float(config.get("sigma_data", 0.5))
    schedule = config.get("sigma_schedule", "karras")
    if schedule not in ("karras", "exponential"):
        raise DiffusersLoadError(f"{sched_file}: sigma_schedule {schedule!r} is not karras or exponential")
    rho = float(config.get("rho", 7.0))
    lines = [f"EDM formulation: sigma in [{config['sigma_min']:g}, {config['sigma_max']:g}], sigma_data {sd:g}",
             f"prediction_type {prediction}: c_skip = sd^2/(sigma^2+sd^2), c_out = "
             f"{'' if prediction == 'epsilon' else '-'}sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2), "
             f"c_noise = log(sigma)/4",
             f"schedule: sigma_schedule {schedule!r}" + (f", rho {rho:g}" if schedule == "karras" else "")
             + f" -> default --schedule {schedule}"]
    return SchedulerReading(class_name, "edm", prediction, float(config["sigma_min"]), float(config["sigma_max"]),
                            sigma_data=sd, default_schedule=schedule, rho=rho, clip_x0=clip_x0, lines=lines,
                            changed=changed)


def _ve_reading(scheduler, class_name: str, sched_file: Path) -> SchedulerReading:
    config = scheduler.config
    smin, smax = float(config["sigma_min"]), float(config["sigma_max"])
    lines = [f"VE score SDE: images in [0, 1], sigma in [{smin:g}, {smax:g}]; D = x + sigma^2 * score",
             f"iia works in [-1, 1]: x' = 2x - 1, sigma' = 2 sigma in [{2 * smin:g}, {2 * smax:g}]",
             "schedule: geometric in sigma like diffusers' -> default --schedule exponential"]
    changed = [f"{class_name} samples the reverse SDE with a Langevin corrector (stochastic); iia integrates the "
               f"probability-flow ODE of the same denoiser",
               "initial state sigma'_max * noise in [-1, 1] (diffusers: sigma_max * noise in [0, 1], i.e. offset by "
               "0.5 in image units)"]
    return SchedulerReading(class_name, "ve", "score", 2 * smin, 2 * smax, default_schedule="exponential",
                            lines=lines, changed=changed)


def _unet_checks(config: dict, unet_dir: Path, reading: SchedulerReading) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and the number of classes, refusing what iia cannot feed or read."""
    cls = config.get("_class_name")
    if cls not in (None, "UNet2DModel"):
        raise DiffusersLoadError(f"{unet_dir} holds a {cls}, iia loads UNet2DModel")
    channels = int(config.get("in_channels", 3))
    out = int(config.get("out_channels", channels))
    if out not in (channels, 2 * channels):
        raise DiffusersLoadError(f"{unet_dir}/config.json: out_channels {out} is neither in_channels {channels} "
                                 f"nor 2 x in_channels (learned variance)")
    variance = reading.variance_type
    if out == 2 * channels and variance not in (None, "learned", "learned_range"):
        raise DiffusersLoadError(f"{unet_dir}/config.json: out_channels {out} = 2 x in_channels means learned "
                                 f"variance, but the scheduler's variance_type is {variance!r} (diffusers' own "
                                 f"step would fail on it): expected learned or learned_range")
    if out == 2 * channels:
        reading.lines.append(f"out_channels {out} = 2 x {channels} (learned variance): D uses the first {channels}")
    size = config.get("sample_size")
    if isinstance(size, int):
        h = w = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = (int(v) for v in size)
    else:
        raise DiffusersLoadError(f"{unet_dir}/config.json: sample_size {size!r} is not an int or [height, width]")
    embed = config.get("class_embed_type")
    classes = int(config.get("num_class_embeds") or 0)
    if embed is not None:
        raise DiffusersLoadError(f"{unet_dir}/config.json: class_embed_type {embed!r} takes continuous class "
                                 f"embeddings, which iia cannot feed (it feeds integer labels to num_class_embeds)")
    time_type = config.get("time_embedding_type", "positional")
    wanted = "fourier" if reading.formulation == "ve" else "positional"
    if time_type != wanted:
        raise DiffusersLoadError(f"{unet_dir}/config.json: time_embedding_type {time_type!r} does not go with "
                                 f"{reading.class_name}: iia feeds it "
                                 + ("sigma (a Fourier embedding)" if wanted == "fourier" else
                                    "a time continuous in sigma (a positional embedding)"))
    return (channels, h, w), classes


def read_scheduler(sched_dir: Path, x0_clipping: str | None = None) -> SchedulerReading:
    """Read `scheduler_config.json` through the folder's own diffusers scheduler class."""
    import diffusers

    sched_file = sched_dir / "scheduler_config.json"
    class_name = _read_json(sched_file).get("_class_name")
    if class_name not in ACCEPTED_SCHEDULERS:
        raise DiffusersLoadError(f"{sched_file}: _class_name {class_name!r} is not a scheduler iia reads "
                                 f"(accepted: {', '.join(ACCEPTED_SCHEDULERS)})")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise DiffusersLoadError(f"{sched_file}: this diffusers ({diffusers.__version__}) has no {class_name}")
    try:
        scheduler = cls.from_pretrained(sched_dir, local_files_only=True)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise DiffusersLoadError(f"{sched_file}: {class_name} rejects this config ({err})") from None
    if class_name in BETA_SCHEDULERS:
        return _beta_table_reading(scheduler, class_name, sched_file, x0_clipping)
    if class_name in EDM_SCHEDULERS:
        return _edm_reading(scheduler, class_name, sched_file, x0_clipping)
    if x0_clipping == "clip":
        raise DiffusersLoadError(f"--x0-clipping clip: {class_name} has no x0 clipping to apply")
    return _ve_reading(scheduler, class_name, sched_file)


def load_diffusers_folder(path: str | Path, time_mapping: str = "interpolate",
                          x0_clipping: str | None = None) -> Denoiser:
    """A local `save_pretrained` folder: UNet2DModel (in `unet/` or at the top) + a scheduler config.

    `x0_clipping`: None refuses a scheduler that clips/thresholds x0; "ignore" samples without clipping;
    "clip" clamps D to clip_sample_range. Raises DiffusersLoadError naming the file and setting it refuses.
    """
    path = Path(path)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise DiffusersLoadError("loading a diffusers folder needs diffusers: pip install 'iia[diffusers]'") from None
    latent = latent_component(path)
    decode = None
    if latent is not None:  # the decode stage (an AutoencoderKL vae/; others refused by name)
        from .decode import DecodeError, diffusers_vae_decode

        try:
            decode = diffusers_vae_decode(path, *latent)
        except DecodeError as err:
            raise DiffusersLoadError(str(err)) from None
    unet_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
    sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
    if not (unet_dir / "config.json").exists():
        raise DiffusersLoadError(f"{path} has no UNet2DModel config.json (at the top or in unet/)")
    if not (sched_dir / "scheduler_config.json").exists():
        raise DiffusersLoadError(f"{path} has no scheduler_config.json (at the top or in scheduler/)")
    reading = read_scheduler(sched_dir, x0_clipping)
    shape, classes = _unet_checks(_read_json(unet_dir / "config.json"), unet_dir, reading)
    weights = [n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
               if (unet_dir / n).is_file()]
    if not weights:
        present = sorted(p.name for p in unet_dir.glob("diffusion_pytorch_model*"))
        raise DiffusersLoadError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (or .bin)"
                                 + (f"; found {', '.join(present)} (variants are not loaded)" if present else ""))
    try:
        unet, info = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False,
                                                 output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as err:  # diffusers/torch/safetensors: truncated, corrupt, mismatched
        root = err  # diffusers wraps the reader's error in "Unable to load weights ... for PATH at PATH"
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        cause = " ".join(str(root).split()) or type(root).__name__  # torch's size-mismatch list: thousands of chars
        raise DiffusersLoadError(f"{unet_dir}/{weights[0]} could not be loaded (truncated or corrupt, or made for "
                                 f"another config.json): {cause[:200]}{'...' if len(cause) > 200 else ''}") from None
    unet.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = info.get(kind) or []
        if found:
            names = ", ".join(str(k if isinstance(k, str) else k[0]) for k in found[:3])
            raise DiffusersLoadError(f"{unet_dir}/{weights[0]} does not fit its config.json: {len(found)} "
                                     f"{kind.replace('_', ' ')} ({names}{', ...' if len(found) > 3 else ''})")
    bad = [name for name, p in unet.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DiffusersLoadError(f"{unet_dir}/{weights[0]}: parameter {bad[0]} holds NaN/Inf "
                                 f"({len(bad)} parameter(s) in all)")
    net = DiffusersDenoiser(unet, reading.formulation, reading.prediction, shape[0], reading.net_table,
                            time_mapping, reading.sigma_data, classes > 0, reading.clip_x0).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    table = reading.sigma_table

    def round_sigma(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if table is None or time_mapping == "interpolate":
            return sigma
        idx = (sigma.log()[..., None] - table.log()).abs().argmin(-1)
        return table[idx]

    labels = f"{classes} classes (num_class_embeds)" if classes else "unconditional"
    report = [f"diffusers folder: UNet2DModel {shape[0]}x{shape[1]}x{shape[2]} (C x H x W), {labels} "
              f"+ {reading.class_name}"]
    report += [f"  {line}" for line in reading.lines]
    report += [f"  changed: {line}" for line in reading.changed]
    config = {"scheduler": reading.class_name, "formulation": reading.formulation, "prediction": reading.prediction,
              "default_schedule": reading.default_schedule, "steps_offset": reading.steps_offset,
              "x0_clipping": x0_clipping,
              "clip_x0": reading.clip_x0, "changed": reading.changed}
    return Denoiser(
        net=net,
        shape=shape,
        sigma_min=reading.sigma_min,
        sigma_max=reading.sigma_max,
        label_dim=classes,
        round_sigma=round_sigma,
        identity={"kind": f"diffusers-{reading.formulation}", "name": path.name, "sha256": folder_sha256(path),
                  "path": str(path), "time_mapping": time_mapping, "class_name": reading.class_name,
                  "config": config, **({"timesteps": len(table)} if table is not None else {})},
        sigma_table=table,
        default_schedule=reading.default_schedule,
        rho=reading.rho,
        steps_offset=reading.steps_offset,
        report=tuple(report),
        decode=decode,
    )
