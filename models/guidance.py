"""Guided denoisers: one `Denoiser` whose net evaluates two denoisers and extrapolates between them.

* Guide network (EDM2's guidance, autoguidance): D(x) = D_guide(x) + g (D_net(x) - D_guide(x)), the guide an
  unconditional or smaller / less-trained network with the same sample shape. g = 1 is the main net alone.
  (NVlabs/edm2 generate_images.py: `gnet(x, t, labels).lerp(net(x, t, labels), guidance)`.)
* Classifier-free guidance: D(x, c) = D(x, null) + w (D(x, c) - D(x, null)), the null label being what the
  model saw when label dropout removed the label (EDM: an all-zero one-hot vector). Only models that declare
  `null_label` (trained with label dropout) accept it.

The guided net is exported as ONE graph holding both networks' weights once; calibration (IIA) fits the
guided denoiser, so its coefficients hold for the guidance value they were fitted at (recorded in the
identity, and so in every artifact).

A RANGE of scales (`guidance=(lo, hi)`, `cfg=(lo, hi)`): the same modules take the scale per image as a
tensor `guidance` float32 [B] (the graph input of a per-request artifact); the Denoiser runs at the range's
default scale, and `GuidanceRange.at(g)` gives the denoiser guided at one fixed scale (what calibration fits).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import torch

from .base import Denoiser


class GuidanceError(ValueError):
    """Guidance settings that cannot be applied to these models (the message names the setting)."""


def _scale(guidance: torch.Tensor | None, fixed: float, x: torch.Tensor):
    """The fixed scale, or the per-image scales `guidance` [B] shaped to broadcast over x [B, ...]."""
    return fixed if guidance is None else guidance.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class GuideNet(torch.nn.Module):
    """`(x, sigma[, class_labels][, guidance])` -> D_guide + g (D_net - D_guide); each net gets labels only if
    conditional; `guidance` float32 [B] (per image) replaces the fixed g when given."""

    def __init__(self, net: torch.nn.Module, guide: torch.nn.Module, guidance: float, net_conditional: bool,
                 guide_conditional: bool):
        super().__init__()
        self.net, self.guide, self.guidance = net, guide, float(guidance)
        self.net_conditional, self.guide_conditional = net_conditional, guide_conditional

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        d_net = self.net(x, sigma, class_labels) if self.net_conditional else self.net(x, sigma)
        d_guide = self.guide(x, sigma, class_labels) if self.guide_conditional else self.guide(x, sigma)
        return d_guide + _scale(guidance, self.guidance, x) * (d_net - d_guide)


class ClassifierFreeNet(torch.nn.Module):
    """`(x, sigma, class_labels[, guidance])` -> D(x, null) + w (D(x, c) - D(x, null)); the null label is id -1;
    `guidance` float32 [B] (per image) replaces the fixed w when given."""

    def __init__(self, net: torch.nn.Module, cfg: float):
        super().__init__()
        self.net, self.cfg = net, float(cfg)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        d_cond = self.net(x, sigma, class_labels)
        d_null = self.net(x, sigma, torch.full_like(class_labels, -1))
        return d_null + _scale(guidance, self.cfg, x) * (d_cond - d_null)


class ScaleInput(torch.nn.Module):
    """The export signature of a per-request artifact's denoiser: `(x, sigma[, class_labels], guidance)`, the
    guided module's scale read per image from `guidance` float32 [B]."""

    def __init__(self, guided_net: torch.nn.Module, conditional: bool):
        super().__init__()
        self.inner, self.conditional = guided_net, conditional

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels_or_guidance: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:
            return self.inner(x, sigma, labels_or_guidance, guidance)
        return self.inner(x, sigma, None, labels_or_guidance)


@dataclass(frozen=True)
class GuidanceRange:
    """A per-request guidance scale: g in [lo, hi] (`kind` "guide" or "cfg"), `default` where a request gives
    none; `at(g)` the same models guided at the fixed scale g (its identity records g, as a single-scale
    compile's does)."""

    kind: str
    lo: float
    hi: float
    default: float
    at: Callable[[float], "Denoiser"]


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _ident(d: Denoiser) -> dict:
    return {k: d.identity.get(k) for k in ("kind", "name", "sha256", "path", "vae") if d.identity.get(k) is not None}


def _range(value, flag: str, default: float | None) -> tuple[float, float, float] | None:
    """(lo, hi, default) of a scale given as a (lo, hi) pair, None for a single value; GuidanceError naming
    `flag` when lo >= hi or the default lies outside (the default's default: the range's midpoint)."""
    if not isinstance(value, (tuple, list)):
        if default is not None:
            raise GuidanceError(f"--guidance-default applies to a range ({flag} LO:HI); {flag} {value:g} is one scale")
        return None
    lo, hi = (float(v) for v in value)
    if not lo < hi:
        raise GuidanceError(f"{flag} {lo:g}:{hi:g}: a range needs LO < HI")
    g0 = (lo + hi) / 2 if default is None else float(default)
    if not lo <= g0 <= hi:
        raise GuidanceError(f"--guidance-default {g0:g} lies outside {flag} {lo:g}:{hi:g}")
    return lo, hi, g0


def _guided_range(net: Denoiser, guide: Denoiser | None, lo: float, hi: float, g0: float) -> Denoiser:
    """`guided` at the default scale g0, its identity naming the range instead, its `guidance_range` set (the
    guide's kind when `guide` is given, else classifier-free)."""
    kind = "guide" if guide is not None else "cfg"

    def at(g: float) -> Denoiser:
        return guided(net, guide, g, None) if kind == "guide" else guided(net, None, None, g)

    out = at(g0)
    settings = {k: v for k, v in out.identity["guidance"].items() if k not in ("g", "w")}
    settings.update(range=[lo, hi], default=g0)
    name = out.identity["name"].replace(f"={g0:g})", f" in [{lo:g}, {hi:g}])")
    out.identity = dict(out.identity, guidance=settings, name=name,
                        sha256=_digest({"net": out.identity["net"], "guidance": settings}))
    out.guidance_range = GuidanceRange(kind, lo, hi, g0, at)
    return out


def check_guidance_settings(guide: bool, guidance, cfg, default: float | None = None) -> None:
    """The checks of `guided` that need no model (GuidanceError naming the setting): a range's order and its
    default, --guidance without --guide, --guide with --cfg. iia-compile runs them before loading the model
    (tester-40: `--cfg 1:0` was refused after a 230 MB pickle had loaded)."""
    value, flag = (guidance, "--guidance") if guide else (cfg, "--cfg")
    if value is not None and (not guide or cfg is None):
        _range(value, flag, default)
    if not guide and guidance is not None:
        raise GuidanceError("--guidance needs --guide (the guide network's pickle); for classifier-free guidance "
                            "against the null label use --cfg")
    if guide and cfg is not None:
        raise GuidanceError("--guide and --cfg are two kinds of guidance: choose one")


def guided(net: Denoiser, guide: Denoiser | None = None, guidance: float | tuple[float, float] | None = None,
           cfg: float | tuple[float, float] | None = None, default: float | None = None) -> Denoiser:
    """`net` guided by `guide` with weight `guidance` (g), or by its own null label with weight `cfg` (w).

    A (lo, hi) pair instead of a value makes the scale per request: the returned Denoiser runs at `default`
    (default: the midpoint), its module takes per-image scales, and its `guidance_range` (GuidanceRange) gives
    the denoiser at any fixed scale. Raises GuidanceError naming the setting when the models do not fit
    together or the model cannot do CFG. With neither a guide nor cfg, returns `net` unchanged.
    """
    check_guidance_settings(guide is not None, guidance, cfg, default)
    value, flag = (guidance, "--guidance") if guide is not None else (cfg, "--cfg")
    scales = _range(value, flag, default) if value is not None and (guide is None or cfg is None) else None
    if scales is not None:
        return _guided_range(net, guide, *scales)
    if guide is None and cfg is None:
        return net
    if guide is not None:
        if guidance is None:  # g = 1 would run the guide at every step for nothing: say what to pass
            raise GuidanceError("--guide needs --guidance G (EDM2's presets use 1.2-2.9; g = 1 is the main net alone)")
        g = float(guidance)
        if tuple(guide.shape) != tuple(net.shape):
            raise GuidanceError(f"--guide {guide.identity.get('name')}: sample shape {list(guide.shape)} differs from "
                                f"the main net's {list(net.shape)}")
        if guide.conditional and guide.label_dim != net.label_dim:
            raise GuidanceError(f"--guide {guide.identity.get('name')}: label_dim {guide.label_dim} differs from the "
                                f"main net's {net.label_dim} (a guide is unconditional or has the same classes)")
        if guide.is_latent != net.is_latent:
            raise GuidanceError(f"--guide {guide.identity.get('name')}: one network is a latent model and the other "
                                f"is not")
        if net.is_latent:  # both nets must denoise in the same latent space: the main net's decode stage is used
            a, b = net.decode, guide.decode
            same = (getattr(a, "vae_name", None) == getattr(b, "vae_name", None)
                    and torch.equal(a.latent_scale, b.latent_scale) and torch.equal(a.latent_bias, b.latent_bias))
            if not same:
                raise GuidanceError(f"--guide {guide.identity.get('name')}: its latent space (VAE "
                                    f"{getattr(b, 'vae_name', None)}, per-channel scale/bias) differs from the main "
                                    f"net's (VAE {getattr(a, 'vae_name', None)}): guidance would mix two latent spaces")
        module = GuideNet(net.net, guide.net, g, net.conditional, guide.conditional)
        settings = {"kind": "guide", "g": g, "guide": _ident(guide),
                    "formula": "D = D_guide + g (D_net - D_guide)"}
        sigma_min, sigma_max = max(net.sigma_min, guide.sigma_min), min(net.sigma_max, guide.sigma_max)
        name = f"{net.identity.get('name', 'model')} guided by {guide.identity.get('name', 'guide')} (g={g:g})"
    else:
        w = float(cfg)
        if not net.conditional:
            raise GuidanceError(f"--cfg needs a class-conditional model; {net.identity.get('name')} is unconditional")
        if not net.null_label:
            raise GuidanceError(f"--cfg: {net.identity.get('name')} was not trained with label dropout (no null label "
                                f"it has learned); guide it with a second network instead (--guide PKL --guidance G)")
        module = ClassifierFreeNet(net.net, w)
        settings = {"kind": "cfg", "w": w, "formula": "D = D(x, null) + w (D(x, c) - D(x, null))"}
        sigma_min, sigma_max = net.sigma_min, net.sigma_max
        name = f"{net.identity.get('name', 'model')} with classifier-free guidance (w={w:g})"
    if not sigma_min < sigma_max:
        raise GuidanceError(f"the main net's and the guide's noise ranges do not overlap "
                            f"([{net.sigma_min:g}, {net.sigma_max:g}] vs [{guide.sigma_min:g}, {guide.sigma_max:g}])")
    report = list(net.report)
    if (sigma_min, sigma_max) != (net.sigma_min, net.sigma_max):  # the guide is defined on less: said, not silent
        report.append(f"  changed: sigma range [{net.sigma_min:g}, {net.sigma_max:g}] narrowed to [{sigma_min:g}, "
                      f"{sigma_max:g}], where the guide {guide.identity.get('name', 'guide')} is defined too")
    identity = {"kind": "guided", "name": name, "net": _ident(net), "guidance": settings}
    identity["sha256"] = _digest({"net": identity["net"], "guidance": settings})
    out = Denoiser(net=module.eval(), shape=tuple(net.shape), sigma_min=float(sigma_min), sigma_max=float(sigma_max),
                   label_dim=net.label_dim, round_sigma=net.round_sigma, identity=identity,
                   sigma_table=net.sigma_table, default_schedule=net.default_schedule, rho=net.rho,
                   steps_offset=net.steps_offset, report=tuple(report), decode=net.decode, null_label=net.null_label)
    out.components = {"net": net, "guide": guide}
    return out

