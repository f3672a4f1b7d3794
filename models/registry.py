"""Resolve a user's model argument (a path or a built-in name) to a Denoiser."""

from __future__ import annotations

from pathlib import Path

from .base import Denoiser


class ModelLoadError(ValueError):
    """The model argument names nothing iia can load."""


BUILTINS = ("gmm", "digits", "bundled")  # model names that are no path (options after a colon)
BUILTIN_HELP = "'gmm' (analytic Gaussian mixture, e.g. 'gmm:components=10,spread=0.5'), 'digits' (bundled model)"


# gmm options: name -> (type, lo, hi); bounds keep a typo from allocating gigabytes or dividing by zero
GMM_OPTIONS = {"components": (int, 1, 4096), "spread": (float, 1e-6, 1e3), "scale": (float, 0.0, 1e3),
               "seed": (int, 0, 2**62), "conditional": (bool, None, None), "d": (int, 1, 1 << 20),
               "sigma_min": (float, 1e-8, 1e3), "sigma_max": (float, 1e-6, 1e5)}


def gmm_from_options(options: dict, where: str = "gmm"):
    """`gaussian_mixture(**options)` after checking each option's name, type and bounds (GMM_OPTIONS);
    `shape` (a list of ints, as the manifest records it) is accepted in place of d. ModelLoadError naming
    the option otherwise."""
    import math

    from .gmm import gaussian_mixture

    options = dict(options)
    shape = options.pop("shape", None)
    kwargs = {}
    for key, value in options.items():
        if key not in GMM_OPTIONS:
            raise ModelLoadError(f"{where}: unknown option '{key}' (known: {', '.join(GMM_OPTIONS)})")
        kind, lo, hi = GMM_OPTIONS[key]
        if kind is bool:
            value = {0: False, 1: True}.get(value, value) if not isinstance(value, float) else value
            if not isinstance(value, bool):
                raise ModelLoadError(f"{where}: option '{key}' must be true or false, got {value!r}")
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok and kind is int:
                ok = float(value).is_integer()
                value = int(value) if ok else value
            if not ok or not lo <= value <= hi:
                raise ModelLoadError(f"{where}: option '{key}' must be {'an integer' if kind is int else 'a number'} "
                                     f"in [{lo}, {hi}], got {value!r}")
        kwargs[key] = value
    if shape is not None:
        if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in shape)):
            raise ModelLoadError(f"{where}: shape must be 1..4 integers in [1, 4096], got {shape!r}")
        kwargs["shape"] = tuple(shape)
    if "d" in kwargs:
        kwargs["shape"] = (kwargs.pop("d"),)
    if math.prod(kwargs.get("shape", (1,))) * kwargs.get("components", 10) > 1 << 26:
        raise ModelLoadError(f"{where}: components x dimensions exceeds {1 << 26} (too large to hold in memory)")
    if kwargs.get("sigma_min", 0.002) >= kwargs.get("sigma_max", 80.0):
        raise ModelLoadError(f"{where}: sigma_min must be below sigma_max")
    return gaussian_mixture(**kwargs)


def _parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            word = value.strip().lower()
            options[key.strip()] = {"true": True, "yes": True, "false": False, "no": False}.get(word, value.strip())
    return options


def folder_sha256(path: str | Path) -> str:
    """sha256 over a model folder's config and weight files (relative names and bytes)."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def source_sha256(spec: str | Path) -> str | None:
    """The sha256 a model's identity will record, computed WITHOUT loading it (nothing is unpickled): of the
    file for an EDM .pkl or a .pt checkpoint, of the config and weight files for a diffusers folder; None
    for a built-in name. ModelLoadError if the path does not exist."""
    text = str(spec)
    if text.partition(":")[0] in BUILTINS:
        return None
    check_source(text)
    path = Path(text)
    if path.is_dir():
        return folder_sha256(path)
    from iia.runtime.contract import sha256_file

    return sha256_file(path)


def load(spec: str | Path, x0_clipping: str | None = None, *, guide: str | Path | None = None,
         guidance: float | None = None, cfg: float | None = None, vae: str | Path | None = None) -> Denoiser:
    """Load a denoiser from a path (EDM/EDM2 `.pkl`, diffusers folder) or a built-in name.

    `x0_clipping` ("ignore" | "clip") answers a diffusers scheduler's clip_sample / thresholding (refused
    when None); it applies to diffusers folders only. guide/guidance: a second network (EDM2 guidance) and
    g, D = D_guide + g (D_net - D_guide); cfg: weight of classifier-free guidance against the null label;
    vae: the local AutoencoderKL folder of a latent EDM2 pickle. See `iia.models.guidance`, `iia.models.decode`.
    """
    if guide is None and guidance is None and cfg is None:
        return _load_one(spec, x0_clipping, vae)
    from .guidance import guided

    net = _load_one(spec, x0_clipping, vae)
    try:
        guide_net = None if guide is None else _load_one(guide, x0_clipping)
    except ModelLoadError as err:  # "model 'nope.pkl' not found" did not say which argument
        raise ModelLoadError(f"--guide {guide}: {err}") from None
    return guided(net, guide_net, guidance, cfg)


def check_source(spec: str | Path) -> None:
    """What can be refused about a model argument without reading it (ModelLoadError): an empty name, a path
    that does not exist. Built-in names pass. iia-compile runs it before any work (a --guide typo was refused
    after the main pickle had loaded)."""
    text = str(spec)
    if not text.strip():  # Path("") is "." (the current folder), which would be read as a diffusers folder
        raise ModelLoadError("the model is an empty name: give an EDM/EDM2 .pkl, a diffusers folder, or a bundled "
                             "model (digits, gmm)")
    if text.partition(":")[0] not in BUILTINS and not Path(text).exists():
        raise ModelLoadError(f"model '{text}' not found: pass a path to an EDM .pkl, a diffusers folder, or {BUILTIN_HELP}")


def _load_one(spec: str | Path, x0_clipping: str | None = None, vae: str | Path | None = None) -> Denoiser:
    text = str(spec)
    check_source(text)
    if vae is not None and not text.endswith(".pkl"):
        raise ModelLoadError(f"--vae applies to latent EDM2 pickles; {text} is not a .pkl")
    if x0_clipping is not None and not Path(text).is_dir():
        raise ModelLoadError(f"--x0-clipping {x0_clipping} applies to diffusers folders only, not '{text}'")
    name, _, opts = text.partition(":")
    if name == "gmm":
        options = _parse_options(opts)
        if "shape" in options:
            raise ModelLoadError("gmm shape is set with d=<dim> or the default (1, 8, 8)")
        return gmm_from_options(options, f"model '{text}'")
    if name in ("digits", "bundled"):
        unknown = next(iter(_parse_options(opts)), None)
        if unknown is not None:  # "digits:x=1" named another output and loaded the same model
            raise ModelLoadError(f"model '{text}': unknown option '{unknown}' (the bundled model '{name}' takes no "
                                 f"options)")
        from .zoo import load_digits_model

        return load_digits_model()
    path = Path(text)
    if path.is_dir():
        from .diffusers_ddpm import load_diffusers_folder

        return load_diffusers_folder(path, x0_clipping=x0_clipping)
    if path.suffix == ".pt":
        from .zoo import load_digits_model

        return load_digits_model(path)
    from .edm_pickle import load_edm_pickle

    return load_edm_pickle(path, vae=vae)


def resolve_model(spec: str | Path | Denoiser, x0_clipping: str | None = None) -> Denoiser:
    return spec if isinstance(spec, Denoiser) else load(spec, x0_clipping)
