"""Resolve a user's model argument (a path or a built-in name) to a Denoiser."""

from __future__ import annotations

from pathlib import Path

from .base import Denoiser


class ModelLoadError(ValueError):
    """The model argument names nothing iia can load."""


BUILTIN_HELP = "'gmm' (analytic Gaussian mixture, e.g. 'gmm:components=10,spread=0.5'), 'digits' (bundled model)"


def _parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            options[key.strip()] = value.strip().lower() in ("1", "true", "yes")
    return options


def load(spec: str | Path, x0_clipping: str | None = None) -> Denoiser:
    """Load a denoiser from a path (EDM `.pkl`, diffusers folder) or a built-in name.

    `x0_clipping` ("ignore" | "clip") answers a diffusers scheduler's clip_sample / thresholding (refused
    when None); it applies to diffusers folders only.
    """
    text = str(spec)
    if x0_clipping is not None and not Path(text).is_dir():
        raise ModelLoadError(f"--x0-clipping {x0_clipping} applies to diffusers folders only, not '{text}'")
    name, _, opts = text.partition(":")
    if name == "gmm":
        from .gmm import gaussian_mixture

        options = _parse_options(opts)
        if "shape" in options:
            raise ModelLoadError("gmm shape is set with d=<dim> or the default (1, 8, 8)")
        if "d" in options:
            options["shape"] = (int(options.pop("d")),)
        return gaussian_mixture(**options)
    if name in ("digits", "bundled"):
        from .zoo import load_digits_model

        return load_digits_model()
    path = Path(text)
    if not path.exists():
        raise ModelLoadError(f"model '{text}' not found: pass a path to an EDM .pkl, a diffusers folder, or {BUILTIN_HELP}")
    if path.is_dir():
        from .diffusers_ddpm import load_diffusers_folder

        return load_diffusers_folder(path, x0_clipping=x0_clipping)
    if path.suffix == ".pt":
        from .zoo import load_digits_model

        return load_digits_model(path)
    from .edm_pickle import load_edm_pickle

    return load_edm_pickle(path)


def resolve_model(spec: str | Path | Denoiser, x0_clipping: str | None = None) -> Denoiser:
    return spec if isinstance(spec, Denoiser) else load(spec, x0_clipping)
