"""Decode stages: the model's own map from its samples to uint8 pixels, run at the end of the sampler graph.

A decode stage is an `nn.Module` `decode(x float32 [B, *sample_shape]) -> uint8 [B, H, W, 3]` (NHWC). It is
both the PyTorch reference and, exported once by the compiler, the graph's last stage: one definition.

* `PixelDecode` (EDM/EDM2 pixel models, `StandardRGBEncoder`): uint8(clip(x * 127.5 + 128, 0, 255)), NHWC.
* `LatentDecode` (EDM2 latent models, `StabilityVAEEncoder`): raw = (x - bias) / scale per channel, then a
  diffusers `AutoencoderKL` decoder, then uint8(clamp(y, 0, 1) * 255) truncated (EDM2's encoder: its VAE path
  works on [0, 1] images); for diffusers latent pipelines (`diffusers_vae_decode`): raw = x / scaling_factor
  (+ shift_factor), uint8(round(clamp(y / 2 + 0.5, 0, 1) * 255)) (diffusers' VaeImageProcessor + numpy_to_pil).

uint8 conversion truncates toward zero, as `torch.Tensor.to(torch.uint8)` and ONNX `Cast` both do; "round"
rounds half to even first (torch.round, ONNX Round, numpy.round alike).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from .registry import folder_sha256


class DecodeError(ValueError):
    """A decode stage that cannot be built (VAE folder missing or of another kind); the message says why."""


class PixelDecode(torch.nn.Module):
    """uint8(clip(x * scale + offset, 0, 255)) as NHWC: EDM's and EDM2's `StandardRGBEncoder.decode`."""

    kind = "pixel"

    def __init__(self, scale: float = 127.5, offset: float = 128.0):
        super().__init__()
        self.scale, self.offset = float(scale), float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x.to(torch.float32) * self.scale + self.offset).clip(0, 255)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1)

    def describe(self) -> dict:
        return {"kind": self.kind, "formula": f"uint8(clip(x * {self.scale:g} + {self.offset:g}, 0, 255)), NHWC"}


class LatentDecode(torch.nn.Module):
    """Latents -> uint8 pixels through a VAE decoder (`vae.decode(raw).sample`).

    latent_scale / latent_bias (per channel, EDM2's `StabilityVAEEncoder.scale` / `.bias`): raw latents are
    (x - bias) / scale. `pixel_range` "unit": the VAE outputs [0, 1] images (EDM2); "signed": [-1, 1]
    (diffusers pipelines: y / 2 + 0.5). `vae` may be None while only the description is needed (calibration
    never decodes); calling it then raises DecodeError naming the VAE to pass.
    """

    kind = "latent"

    def __init__(self, vae: torch.nn.Module | None, latent_scale: Sequence[float], latent_bias: Sequence[float],
                 pixel_range: str = "unit", vae_name: str | None = None, vae_path: str | None = None,
                 source: str = "model", rounding: str = "truncate"):
        super().__init__()
        if pixel_range not in ("unit", "signed"):
            raise DecodeError(f"pixel_range must be 'unit' or 'signed', got {pixel_range!r}")
        if rounding not in ("truncate", "round"):
            raise DecodeError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
        self.rounding = rounding
        scale = torch.as_tensor(latent_scale, dtype=torch.float32).reshape(1, -1, 1, 1)
        bias = torch.as_tensor(latent_bias, dtype=torch.float32).reshape(1, -1, 1, 1)
        if scale.shape != bias.shape or not torch.all(scale != 0):
            raise DecodeError(f"latent scale/bias must be non-zero per-channel values of one length, got "
                              f"{list(latent_scale)} / {list(latent_bias)}")
        self.register_buffer("latent_scale", scale)
        self.register_buffer("latent_bias", bias)
        self.vae = vae
        self.pixel_range, self.vae_name, self.vae_path, self.source = pixel_range, vae_name, vae_path, source
        self.vae_sha256 = folder_sha256(vae_path) if vae_path and Path(vae_path).is_dir() else None

    @property
    def has_vae(self) -> bool:
        return self.vae is not None

    def missing_vae_message(self) -> str:
        name = f" '{self.vae_name}'" if self.vae_name else ""
        return (f"{self.source} is a latent model: its decoder is the VAE{name}, whose weights are not in the "
                f"checkpoint; pass --vae PATH (a local diffusers AutoencoderKL folder of that VAE, e.g. "
                f"`huggingface-cli download {self.vae_name or '<vae>'} --local-dir PATH`)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise DecodeError(self.missing_vae_message())
        raw = (x.to(torch.float32) - self.latent_bias) / self.latent_scale
        y = self.vae.decode(raw).sample
        if self.pixel_range == "signed":
            y = y / 2 + 0.5
        pixels = y.clamp(0, 1) * 255
        if self.rounding == "round":
            pixels = pixels.round()
        return pixels.to(torch.uint8).permute(0, 2, 3, 1)

    def describe(self) -> dict:
        return {"kind": self.kind, "vae_name": self.vae_name, "vae_path": self.vae_path, "vae_sha256": self.vae_sha256,
                "latent_scale": self.latent_scale.flatten().tolist(), "latent_bias": self.latent_bias.flatten().tolist(),
                "pixel_range": self.pixel_range, "rounding": self.rounding,
                "formula": ("uint8(" + ("round(" if self.rounding == "round" else "")
                            + "clamp(vae.decode((x - bias) / scale)" + (" / 2 + 0.5" if self.pixel_range == "signed" else "")
                            + ", 0, 1) * 255" + (")" if self.rounding == "round" else "") + "), NHWC")}


def load_vae(path: str | Path, expected: str | None = None, what: str = "--vae") -> torch.nn.Module:
    """A local diffusers `AutoencoderKL` folder (config.json + weights) as an eval-mode float32 CPU module.

    `expected` (the checkpoint's vae_name) is only used in messages; `what` names where the path came from
    ("--vae", or a pipeline folder's own vae/). Raises DecodeError for a missing folder, another class
    (named), or diffusers missing.
    """
    path = Path(path)
    want = f" (the checkpoint names '{expected}')" if expected else ""
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise DecodeError(f"{what} {path}: not a diffusers model folder with a config.json{want}")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DecodeError(f"{what} {path}: config.json is not readable JSON ({err})") from None
    if class_name != "AutoencoderKL":
        raise DecodeError(f"{what} {path}: the folder holds a {class_name}, iia decodes with an AutoencoderKL{want}")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DecodeError("--vae needs diffusers: pip install 'iia[diffusers]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise DecodeError(f"{what} {path}: diffusers could not load the AutoencoderKL ({err})") from None
    bad = [name for name, t in vae.named_parameters() if not torch.isfinite(t).all()]
    if bad:  # NaN weights would decode every image to black, and parity (NaN -> 0 on both sides) would not see it
        raise DecodeError(f"{what} {path}: parameter {bad[0]} holds NaN/Inf ({len(bad)} parameter(s) in all): "
                          f"the weights file is corrupted")
    return vae.float().cpu().eval().requires_grad_(False)


def diffusers_vae_decode(folder: str | Path, entry: str, class_name: str) -> LatentDecode:
    """The decode stage of a diffusers latent pipeline folder: its `vae/` AutoencoderKL with the VAE config's
    scaling_factor (and shift_factor), as diffusers' pipelines decode (latents / scaling_factor + shift_factor,
    vae.decode, (y / 2 + 0.5).clamp(0, 1), * 255 rounded). Other components (VQModel) are refused by name."""
    folder = Path(folder)
    if entry != "vae" or class_name != "AutoencoderKL":
        raise DecodeError(f"{folder} is a latent pipeline ({entry}: {class_name}): iia decodes latents with an "
                          f"AutoencoderKL in vae/ only")
    vae = load_vae(folder / "vae", what="the pipeline's VAE")
    channels = int(vae.config.latent_channels)
    where = f"{folder}/vae/config.json"

    def number(key: str, value, positive: bool = False) -> float:
        """A finite (positive) float from the VAE config, refused by name otherwise (null/0 are no factors)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and abs(value) < 1e30 and (value > 0 if positive else True)
        if not ok:
            raise DecodeError(f"{where}: {key} {value!r} is not a finite{' positive' if positive else ''} number")
        return float(value)

    scale = number("scaling_factor", getattr(vae.config, "scaling_factor", 1.0))
    if scale == 0:
        raise DecodeError(f"{where}: scaling_factor 0 would divide the latents by zero")
    shift = number("shift_factor", getattr(vae.config, "shift_factor", 0.0) or 0.0)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None or std is not None:
        # SDXL's pipeline: raw = x * std / scaling_factor + mean per channel, i.e. (x - bias) / scale_c with
        # scale_c = scaling_factor / std_c and bias_c = -mean_c * scale_c; it applies them only as a pair
        if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)) or shift \
                or len(mean) != channels or len(std) != channels:
            raise DecodeError(f"{where}: latents_mean {mean!r} / latents_std {std!r} with shift_factor {shift:g}: "
                              f"iia decodes both, as lists of latent_channels {channels} numbers, and no "
                              f"shift_factor, as diffusers' SDXL pipeline does")
        scales = [scale / number("latents_std", s, positive=True) for s in std]
        biases = [-number("latents_mean", m) * c for m, c in zip(mean, scales)]
    else:  # raw = x / scale + shift = (x - bias) / scale with bias = -shift * scale
        scales, biases = [scale] * channels, [-shift * scale] * channels
    return LatentDecode(vae, scales, biases, pixel_range="signed",
                        vae_name=f"{folder.name}/vae", vae_path=str(folder / "vae"), source=folder.name,
                        rounding="round")


def _bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers()))


def decode_param_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of the parameters a decode stage runs (for a VAE: its decoder and post-quant conv, not its
    encoder); 0 for none."""
    if module is None:
        return 0
    if isinstance(module, LatentDecode) and module.vae is not None:
        parts = [getattr(module.vae, "decoder", None), getattr(module.vae, "post_quant_conv", None)]
        return _bytes(parts) + module.latent_scale.nbytes + module.latent_bias.nbytes
    return _bytes([module])
