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

from pathlib import Path

import torch

from .base import Denoiser
from .registry import folder_sha256
from .diffusers_scheduler import DiffusersLoadError, SchedulerReading, read_json, read_scheduler

TIME_MAPPINGS = ("interpolate", "nearest")
LATENT_COMPONENTS = ("vae", "vqvae")  # model_index.json entries that make a folder a latent pipeline


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


def latent_component(path: Path) -> tuple[str, str] | None:
    """(entry, class) of the VAE/VQ-VAE a latent pipeline folder names, or None for a pixel-space folder.

    The hook for latent decoding: a decode stage would load this component; until then loading refuses it.
    """
    index = path / "model_index.json"
    entries = read_json(index) if index.exists() else {}
    for key in LATENT_COMPONENTS:
        value = entries.get(key)
        if isinstance(value, list) and any(value):
            return key, str(value[-1])
        if (path / key / "config.json").exists():
            return key, str(read_json(path / key / "config.json").get("_class_name", "?"))
    return None


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


def _folder_dirs(path: Path) -> tuple[Path, Path]:
    """(UNet dir, scheduler dir): `unet/` and `scheduler/` where present, else the folder itself."""
    unet_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
    sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
    if not (unet_dir / "config.json").exists():
        raise DiffusersLoadError(f"{path} has no UNet2DModel config.json (at the top or in unet/)")
    if not (sched_dir / "scheduler_config.json").exists():
        raise DiffusersLoadError(f"{path} has no scheduler_config.json (at the top or in scheduler/)")
    return unet_dir, sched_dir


def _load_unet(UNet2DModel, unet_dir: Path) -> torch.nn.Module:
    """The UNet2DModel of `unet_dir` in eval mode, refusing missing, corrupt, mismatched or non-finite weights."""
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
    return unet


def _round_sigma_for(table: torch.Tensor | None, time_mapping: str):
    """Denoiser.round_sigma: snaps sigma (float64) to the table under the "nearest" time mapping, else identity."""

    def round_sigma(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if table is None or time_mapping == "interpolate":
            return sigma
        idx = (sigma.log()[..., None] - table.log()).abs().argmin(-1)
        return table[idx]

    return round_sigma


def _report(shape: tuple[int, int, int], classes: int, reading: SchedulerReading) -> list[str]:
    """The compile block's lines: the folder, what was accepted, what is sampled differently (and why)."""
    labels = f"{classes} classes (num_class_embeds)" if classes else "unconditional"
    report = [f"diffusers folder: UNet2DModel {shape[0]}x{shape[1]}x{shape[2]} (C x H x W), {labels} "
              f"+ {reading.class_name}"]
    report += [f"  {line}" for line in reading.lines]
    report += [f"  changed: {line}" for line in reading.changed]
    return report


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
    unet_dir, sched_dir = _folder_dirs(path)
    reading = read_scheduler(sched_dir, x0_clipping)
    shape, classes = _unet_checks(read_json(unet_dir / "config.json"), unet_dir, reading)
    unet = _load_unet(UNet2DModel, unet_dir)
    net = DiffusersDenoiser(unet, reading.formulation, reading.prediction, shape[0], reading.net_table,
                            time_mapping, reading.sigma_data, classes > 0, reading.clip_x0).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    table = reading.sigma_table
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
        round_sigma=_round_sigma_for(table, time_mapping),
        identity={"kind": f"diffusers-{reading.formulation}", "name": path.name, "sha256": folder_sha256(path),
                  "path": str(path), "time_mapping": time_mapping, "class_name": reading.class_name,
                  "config": config, **({"timesteps": len(table)} if table is not None else {})},
        sigma_table=table,
        default_schedule=reading.default_schedule,
        rho=reading.rho,
        steps_offset=reading.steps_offset,
        report=tuple(_report(shape, classes, reading)),
        decode=decode,
    )
