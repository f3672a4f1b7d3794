"""Discrete-time eps-prediction DDPMs (a diffusers `save_pretrained` folder) in the EDM convention.

With alphabar_t from the scheduler: sigma_t = sqrt((1 - alphabar_t) / alphabar_t), x = z_t / sqrt(alphabar_t),
so the network sees x / sqrt(1 + sigma^2) and D(x; sigma) = x - sigma * eps. The network's time input comes
from sigma through the discrete table:
  - "interpolate" (default): linear in log-sigma between neighbouring timesteps. The denoiser is then a
    continuous function of sigma, which the Karras schedule and calibration's fine sub-steps (uniform in
    sigma between two timesteps) need; on table sigmas it equals the discrete model exactly.
  - "nearest": snap to the closest training timestep (and `round_sigma` snaps the schedule the same way,
    as EDM does for its iDDPM models).
diffusers is an optional dependency (`pip install "iia[diffusers]"`), needed only for this loader.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .base import Denoiser

TIME_MAPPINGS = ("interpolate", "nearest")


class DiffusersLoadError(ValueError):
    pass


class DiscreteEpsDenoiser(torch.nn.Module):
    """Wraps an eps-prediction network `unet(z, t) -> eps` into D(x; sigma)."""

    def __init__(self, unet: torch.nn.Module, sigma_table: torch.Tensor, time_mapping: str = "interpolate",
                 num_class_embeds: int = 0):
        super().__init__()
        if time_mapping not in TIME_MAPPINGS:
            raise DiffusersLoadError(f"time mapping must be one of {TIME_MAPPINGS}, got {time_mapping!r}")
        self.unet = unet
        self.time_mapping = time_mapping
        self.conditional = num_class_embeds > 0
        self.register_buffer("log_sigmas", sigma_table.to(torch.float32).log(), persistent=False)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.to(torch.float32).log()
        dist = log_sigma[:, None] - self.log_sigmas[None, :]  # [B, T]
        if self.time_mapping == "nearest":
            return dist.abs().argmin(dim=1).to(torch.float32)
        # index of the table entry just below, clamped so that [low, low + 1] is a valid interval
        low = (dist >= 0).to(torch.int64).sum(dim=1).sub(1).clamp(0, self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return low.to(torch.float32) + w

    def forward(self, x, sigma, class_labels=None):
        c_in = 1 / torch.sqrt(1 + sigma.to(x.dtype) ** 2).reshape(-1, *([1] * (x.ndim - 1)))
        t = self.sigma_to_t(sigma)
        kwargs = {"class_labels": class_labels} if self.conditional else {}
        eps = self.unet(x * c_in, t, return_dict=False, **kwargs)[0]
        return x - sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * eps


def sigmas_from_scheduler(scheduler) -> torch.Tensor:
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def _folder_sha256(path: Path) -> str:
    """Identity of a model folder: sha256 over its config and weight files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def load_diffusers_folder(path: str | Path, time_mapping: str = "interpolate") -> Denoiser:
    """A local `save_pretrained` folder: UNet2DModel (in `unet/` or at the top) + a DDPM/DDIM scheduler config."""
    path = Path(path)
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError:
        raise DiffusersLoadError("loading a diffusers folder needs diffusers: pip install 'iia[diffusers]'") from None
    unet_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
    sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
    if not (unet_dir / "config.json").exists():
        raise DiffusersLoadError(f"{path} has no UNet2DModel config.json (at the top or in unet/)")
    sched_files = [sched_dir / "scheduler_config.json"]
    if not sched_files[0].exists():
        raise DiffusersLoadError(f"{path} has no scheduler_config.json (at the top or in scheduler/)")
    config = json.loads((unet_dir / "config.json").read_text())
    if config.get("_class_name") not in (None, "UNet2DModel"):
        raise DiffusersLoadError(f"{unet_dir} holds a {config.get('_class_name')}, iia loads UNet2DModel")
    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True).eval()
    scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise DiffusersLoadError(f"{path}: prediction_type {prediction!r} is not supported (epsilon only)")
    table = sigmas_from_scheduler(scheduler)
    classes = int(unet.config.get("num_class_embeds") or 0)
    net = DiscreteEpsDenoiser(unet, table, time_mapping, classes).eval()
    for p in net.parameters():
        p.requires_grad_(False)

    def round_sigma(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if time_mapping == "interpolate":
            return sigma
        idx = (sigma.log()[..., None] - table.log()).abs().argmin(-1)
        return table[idx]

    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return Denoiser(
        net=net,
        shape=(int(unet.config.in_channels), int(size), int(size)),
        sigma_min=float(table[0]),
        sigma_max=float(table[-1]),
        label_dim=classes,
        round_sigma=round_sigma,
        identity={"kind": "diffusers-ddpm", "name": path.name, "sha256": _folder_sha256(path), "path": str(path),
                  "time_mapping": time_mapping, "timesteps": len(table)},
        sigma_table=table,
    )
