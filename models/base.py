"""One denoiser interface: D(x, sigma, class_labels) -> x0 estimate, EDM convention (x = x0 + sigma * n).

Every model iia handles (the analytic mixture, EDM pickles, bundled nets, diffusers DDPMs, any callable)
becomes a `Denoiser`. Samplers, calibration and the compiler only ever see this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import checkpoint as torch_checkpoint


class DenoiserError(ValueError):
    """A denoiser misbehaved (NaN/Inf or wrong shape) or was called with bad inputs. `sigma`: the noise level
    of the failing call where the message already names it (callers then add no sigma of their own)."""

    def __init__(self, message: str, sigma: float | None = None):
        super().__init__(message)
        self.sigma = sigma


# what non-reentrant torch.utils.checkpoint raises inside a call it recomputes, to stop once it has what it needs
# (the global fits recompute calls, calibration/search_fits.py): passed through, never named as the model's failure
_StopRecomputation = getattr(torch_checkpoint, "_StopRecomputationError", ())


@dataclass
class Denoiser:
    """A denoiser plus what samplers must know about it.

    `net` is an `nn.Module` with the export signature `(x float32 [B,*shape], sigma float32 [B],
    class_labels int64 [B])` (the labels argument is dropped when `label_dim == 0`). It is what the
    compiler exports once. `__call__` is the sampler-facing convenience: any float dtype in, same dtype
    out (the network itself runs in float32, as EDM's generate.py does).
    """

    net: torch.nn.Module
    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    label_dim: int = 0
    round_sigma: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda s: s)
    identity: dict = field(default_factory=dict)  # kind, name, sha256: goes into every artifact
    sigma_table: torch.Tensor | None = None  # discrete models: sigma of each training timestep, ascending
    analytic: bool = False  # a closed-form denoiser (no network): calls are nearly free, so calibration can afford more
    # The schedule a plain run uses: what the model's own sampler would pick (a diffusers folder's
    # timestep_spacing, its EDM sigma_schedule), and the parameters of the model's schedules.
    default_schedule: str = "karras"
    rho: float = 7.0  # Karras schedule exponent
    steps_offset: int = 0  # added to the 'leading' timestep selection (diffusers' steps_offset)
    report: tuple[str, ...] = ()  # lines the loader wants the user to read: what it read, what it changed
    # The model's decode stage, samples -> uint8 pixels (see models/decode.py); None: `decode_stage()` gives
    # EDM's pixel formula for image models.
    decode: torch.nn.Module | None = None
    null_label: bool = False  # the net was trained with label dropout: class label -1 means "no label" (CFG)
    # images the network has been called on (`forward`): long work reads its progress here (`fit.calibrate`)
    image_calls: int = field(default=0, compare=False, repr=False)

    @property
    def conditional(self) -> bool:
        return self.label_dim > 0

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def device(self) -> torch.device:
        """Where the network runs: its parameters' (or buffers') device; a network with neither (a plain
        callable) runs where `to` put it, the CPU by default."""
        for tensor in self.net.parameters():
            return tensor.device
        for tensor in self.net.buffers():
            return tensor.device
        return getattr(self, "_device", torch.device("cpu"))

    def to(self, device: torch.device | str) -> "Denoiser":
        """Move the network to `device` (in place, as nn.Module.to; a no-op where it already is); returns self.
        The decode stage stays where it is (the parity check decodes a few images). On CUDA the network runs in
        IEEE float32, TF32 off (models/device.py `ieee_float32_on_cuda`)."""
        device = torch.device(device)
        if device.type == "cuda":
            from .device import ieee_float32_on_cuda

            ieee_float32_on_cuda()
        if device != self.device:
            self.net.to(device)
        self._device = device
        return self

    def __call__(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network on `self.device` (inputs moved there: a no-op where the caller made them there); the
        output on x's device, in x's dtype."""
        batch = x.shape[0]
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise DenoiserError(f"input shape {tuple(x.shape[1:])} does not match the model's {self.shape}")
        device = self.device
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1).expand(batch).contiguous()
        args = [x.to(device, torch.float32), sigma]
        if self.conditional:
            args.append(self.labels_or_error(class_labels, batch).to(device))
        with torch.no_grad():
            out = self.forward(*args)
        at = float(sigma[0]) if batch else float("nan")
        if tuple(out.shape) != tuple(x.shape):
            raise DenoiserError(f"denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)} at "
                                f"sigma={at:.6g}", sigma=at)
        if not torch.isfinite(out).all():
            raise DenoiserError(f"denoiser returned NaN/Inf at sigma={at:.6g}", sigma=at)
        return out.to(x.device, x.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        """`net(x, sigma[, labels])` as given (float32 x [B, *shape], sigma [B] on self.device; no checks,
        gradients as the caller's mode has them). Raises DenoiserError when the network's own code fails (its
        exception named, at which sigma and batch size), so that a model's bug reads as the model's, not iia's."""
        self.image_calls += int(x.shape[0])
        try:
            return self.net(x, sigma, *labels)
        except (DenoiserError, MemoryError, _StopRecomputation):  # the last: torch.utils.checkpoint's own control flow
            raise
        except Exception as err:
            at = float(sigma.reshape(-1)[0]) if sigma.numel() else float("nan")
            raise DenoiserError(f"the model's forward call failed at sigma={at:.6g} on a batch of {x.shape[0]}: "
                                f"{type(err).__name__}: {err}", sigma=at) from err

    def decode_stage(self) -> torch.nn.Module | None:
        """The model's decode stage (uint8 NHWC pixels), EDM's pixel formula for image models without one,
        None for non-image models."""
        if self.decode is not None:
            return self.decode
        if not self.is_image:
            return None
        from .decode import PixelDecode

        return PixelDecode()

    @property
    def is_latent(self) -> bool:
        return getattr(self.decode, "kind", None) == "latent"

    def labels_or_error(self, class_labels, batch: int) -> torch.Tensor:
        if class_labels is None:
            raise DenoiserError(f"conditional model (label_dim={self.label_dim}) needs class_labels")
        labels = torch.as_tensor(class_labels).reshape(-1).to(torch.int64)
        if labels.numel() != batch:
            raise DenoiserError(f"expected {batch} class labels, got {labels.numel()}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.label_dim):
            raise DenoiserError(f"class labels must lie in [0, {self.label_dim - 1}]")
        return labels

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.net.parameters()) + sum(
            b.numel() * b.element_size() for b in self.net.buffers()
        )

    def describe(self) -> str:
        ident = self.identity
        labels = f"{self.label_dim} classes" if self.conditional else "unconditional"
        sha = ident.get("sha256")
        sha_text = f" sha256={sha[:16]}..." if sha else ""
        return (
            f"{ident.get('kind', 'model')} '{ident.get('name', '?')}'{sha_text} shape={list(self.shape)} "
            f"{labels} sigma=[{self.sigma_min:g}, {self.sigma_max:g}]"
        )


class CallableNet(torch.nn.Module):
    """Wraps a plain Python callable `fn(x, sigma, class_labels)` as a module (exportable if fn is torch code)."""

    def __init__(self, fn: Callable, conditional: bool):
        super().__init__()
        self.fn = fn
        self.conditional = conditional

    def forward(self, x, sigma, class_labels=None):
        return self.fn(x, sigma, class_labels) if self.conditional else self.fn(x, sigma, None)


def from_callable(
    fn: Callable,
    shape: tuple[int, ...],
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    label_dim: int = 0,
    round_sigma: Callable | None = None,
    name: str = "callable",
) -> Denoiser:
    """Any Python callable `fn(x, sigma[B], class_labels[B] | None) -> x0` as a Denoiser."""
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise DenoiserError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    net = CallableNet(fn, label_dim > 0)
    return Denoiser(
        net=net.eval(),
        shape=tuple(int(s) for s in shape),
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
        label_dim=int(label_dim),
        round_sigma=round_sigma or (lambda s: s),
        identity={"kind": "callable", "name": name},
    )


def weights_only_refusal(err: BaseException) -> str:
    """The reason in torch.load(weights_only=True)'s refusal, without its multi-line advice (which suggests
    weights_only=False, i.e. running the file's code: never what iia does). Other messages: one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        reasons = [line for line in lines[1:] if not line.startswith(("Check the documentation", "Re-running",
                                                                      "In PyTorch", "(1)", "(2)"))]
        return "torch's safe loader refused it: " + " ".join(reasons or lines[:1])
    return " ".join(lines)
