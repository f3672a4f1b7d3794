"""Load official NVlabs EDM and EDM2 network pickles (`.pkl`) as a `Denoiser`: the pickle's preconditioned
network behind iia's `D(x, sigma, class_labels)` signature, its sigma range, and (EDM2) its encoder as the decode
stage. Reading the file (a restricted unpickler that EXECUTES the Python source embedded in the pickle: only load
pickles you trust) is `iia.models.edm_unpickle`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .base import Denoiser
from .edm_unpickle import EDMPickleError, EDMShimError, read_edm_pickle

__all__ = ["EDMPickleError", "EDMShimError", "EDMNet", "load_edm_pickle", "read_edm_pickle"]

# EDM's generate.py clamps the net's own range into this one.
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0

_PRECOND_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "Precond")  # Precond: EDM2


# --------------------------------------------------------------------------------------------------
# Adapter to iia's Denoiser.net signature


class EDMNet(torch.nn.Module):
    """`(x [B,C,H,W] f32, sigma [B] f32, class_labels [B] int64)` -> EDM precond(x, sigma, one_hot(labels)).

    The labels argument is ignored (and may be omitted) when `label_dim == 0`. The one-hot is built with
    an `arange ==` comparison, which exports cleanly to ONNX.
    """

    def __init__(self, precond: torch.nn.Module):
        super().__init__()
        self.precond = precond
        self.label_dim = int(getattr(precond, "label_dim", 0) or 0)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_dim > 0:
            classes = torch.arange(self.label_dim, device=x.device, dtype=torch.int64)
            one_hot = (class_labels.to(torch.int64).reshape(-1, 1) == classes).to(x.dtype)
            return self.precond(x, sigma, one_hot)
        return self.precond(x, sigma, None)


class _RoundSigma:
    """Denoiser.round_sigma for an EDM precond: its own round_sigma (iDDPM snaps to its table), float64 out."""

    def __init__(self, precond: torch.nn.Module):
        self.precond = precond

    def __call__(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        fn = getattr(self.precond, "round_sigma", None)
        if fn is None:
            return sigma
        with torch.no_grad():
            out = fn(sigma)
        return torch.as_tensor(out).to(torch.float64).reshape(sigma.shape)

    def __repr__(self) -> str:
        return f"<round_sigma of {type(self.precond).__name__}>"


def _attr_float(obj, name: str, default: float) -> float:
    value = getattr(obj, name, None)
    if value is None:
        return default
    try:
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError):
        return default


def _attr_int(obj, name: str, label: str, default: int | None = None) -> int:
    value = getattr(obj, name, default)
    try:
        if value is None:
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        raise EDMPickleError(f"{label}: the network ({type(obj).__name__}) has no usable '{name}' attribute") from None


PIXEL_ENCODERS = ("StandardRGBEncoder",)
LATENT_ENCODERS = ("StabilityVAEEncoder",)


def decode_stage_for(encoder, label: str, vae: str | Path | None = None):
    """The decode stage of an EDM2 pickle's `encoder` (None: EDM pickles, which hold no encoder).

    StandardRGBEncoder: EDM's pixel formula. StabilityVAEEncoder: its per-channel scale/bias, then the VAE
    from `vae` (a local diffusers AutoencoderKL folder); without `vae` the stage records the pickle's
    vae_name and the compiler refuses to build the graph, naming it. Other encoders are refused by name.
    """
    from .decode import LatentDecode, PixelDecode, load_vae

    if encoder is None:
        if vae is not None:
            raise EDMPickleError(f"--vae given, but {label} is a pixel-space model (it holds no latent encoder)")
        return None
    name = type(encoder).__name__
    if name in PIXEL_ENCODERS:
        if vae is not None:
            raise EDMPickleError(f"--vae given, but {label} is a pixel-space model (its encoder is {name})")
        return PixelDecode()
    if name not in LATENT_ENCODERS:
        raise EDMPickleError(f"{label}: unknown encoder class '{name}' (iia decodes StandardRGBEncoder and "
                             f"StabilityVAEEncoder)")
    state = vars(encoder)
    try:
        scale = [float(v) for v in state["scale"]]
        bias = [float(v) for v in state["bias"]]
    except (KeyError, TypeError, ValueError):
        raise EDMPickleError(f"{label}: its {name} has no usable per-channel 'scale'/'bias'") from None
    vae_name = state.get("vae_name")
    module = load_vae(vae, expected=vae_name) if vae is not None else None
    return LatentDecode(module, scale, bias, pixel_range="unit", vae_name=vae_name,
                        vae_path=None if vae is None else str(vae), source=label)


def _has_label_dropout(precond: torch.nn.Module) -> bool:
    """EDM's UNets keep their training-time `label_dropout` rate; > 0 means the null label was trained."""
    for module in precond.modules():
        try:
            if float(getattr(module, "label_dropout", 0) or 0) > 0:
                return True
        except (TypeError, ValueError):
            continue
    return False


def load_edm_pickle(path: str | Path, vae: str | Path | None = None) -> Denoiser:
    """Load an NVlabs EDM or EDM2 network pickle as a `Denoiser` (CPU, float32, eval mode).

    Executes the Python source embedded in the pickle (see the module docstring). The returned
    denoiser carries `identity = {"kind": "edm-pkl", "name", "sha256", "class_name", "path"}` and an extra
    attribute `pickle_meta` (dataset_kwargs, loss_fn / augment_pipe / encoder class names, classes rebuilt).
    EDM2 pickles (with an `encoder`) get their decode stage from it (see `decode_stage_for`; `vae` is the
    local AutoencoderKL folder of latent models).
    """
    path = Path(path)
    data, info = read_edm_pickle(path)
    label = path.name
    precond = data["ema"]
    if not isinstance(precond, torch.nn.Module):
        raise EDMPickleError(f"{label}: 'ema' is a {type(precond).__name__}, not a torch network")
    try:
        if hasattr(precond, "use_fp16"):
            precond.use_fp16 = False  # fp16 only ever applied on CUDA; iia runs the net in float32
        precond = precond.float().cpu().eval().requires_grad_(False)
    except (AttributeError, TypeError, RuntimeError) as exc:  # e.g. a Module whose state was never restored
        raise EDMPickleError(f"{label}: 'ema' ({type(precond).__name__}) is not a usable torch network: its state is "
                             f"missing or broken ({type(exc).__name__}: {exc})") from None
    except SystemExit as exc:
        raise EDMPickleError(f"{label}: the network's code called sys.exit({exc.code!r}) while loading") from None

    channels = _attr_int(precond, "img_channels", label)
    resolution = _attr_int(precond, "img_resolution", label)
    label_dim = _attr_int(precond, "label_dim", label, default=0)
    if channels <= 0 or resolution <= 0 or label_dim < 0:
        raise EDMPickleError(f"{label}: bad network shape img_channels={channels} img_resolution={resolution} label_dim={label_dim}")
    net_min = _attr_float(precond, "sigma_min", 0.0)
    net_max = _attr_float(precond, "sigma_max", math.inf)
    sigma_min = max(EDM_SIGMA_MIN, net_min) if not math.isnan(net_min) else EDM_SIGMA_MIN
    sigma_max = min(EDM_SIGMA_MAX, net_max) if not math.isnan(net_max) else EDM_SIGMA_MAX
    if not (0 < sigma_min < sigma_max):
        raise EDMPickleError(f"{label}: empty noise range after clamping: sigma_min={sigma_min:g} sigma_max={sigma_max:g}")

    class_name = type(precond).__name__
    encoder = data.get("encoder")
    if encoder is None and "edm2" in type(precond).__module__:
        # EDM2 pickles always carry their encoder; without it a latent net would be "decoded" as pixels
        raise EDMPickleError(f"{label}: an EDM2 network ({type(precond).__module__}.{class_name}) without the "
                             f"pickle's 'encoder' entry: iia cannot tell how to decode its samples")
    decode = decode_stage_for(encoder, label, vae)
    denoiser = Denoiser(
        net=EDMNet(precond).eval(),
        shape=(channels, resolution, resolution),
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
        label_dim=label_dim,
        round_sigma=_RoundSigma(precond),
        identity={
            "kind": "edm-pkl",
            "name": label,
            "sha256": info["sha256"],
            "class_name": class_name,
            "path": str(path),
        },
        decode=decode,
        null_label=label_dim > 0 and _has_label_dropout(precond),
    )
    if vae is not None:
        denoiser.identity["vae"] = str(vae)
    dataset_kwargs = data.get("dataset_kwargs")
    denoiser.pickle_meta = {
        "dataset_kwargs": dict(dataset_kwargs) if isinstance(dataset_kwargs, dict) else dataset_kwargs,
        "loss_fn": None if data.get("loss_fn") is None else type(data.get("loss_fn")).__name__,
        "augment_pipe": None if data.get("augment_pipe") is None else type(data.get("augment_pipe")).__name__,
        "encoder": None if encoder is None else type(encoder).__name__,
        "known_precond": class_name in _PRECOND_CLASSES,
        "net_sigma_min": net_min,
        "net_sigma_max": net_max,
        "classes": info["class_names"],
        "size": info["size"],
    }
    return denoiser
