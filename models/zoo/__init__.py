"""Bundled models trained offline on scikit-learn's 8x8 digits, plus the FD-digits quality metric.

* `load_digits_model()` -> the bundled class-conditional EDM denoiser (`digits_edm.pt`, a small U-Net of
  our own, see `unet.py`; trained by `python -m iia.models.zoo.train_digits`).
* `load_classifier()`, `features()`, `predict()` -> the bundled digit CNN (`digits_classifier.pt`, trained
  by `python -m iia.models.zoo.train_classifier`).
* `fd_digits(samples)` -> FD-digits, a Frechet distance on classifier features (not FID), see `fd.py`.
"""

from __future__ import annotations

from pathlib import Path

from ..base import Denoiser
from iia.runtime.contract import sha256_file

from .classifier import BUNDLED_CLASSIFIER, features, load_classifier, predict, read_checkpoint
from .fd import fd_digits
from .unet import UNet

BUNDLED_DIGITS = Path(__file__).resolve().parent / "digits_edm.pt"

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


def load_digits_net(path: str | Path | None = None) -> UNet:
    """The U-Net (EMA weights, eval mode) rebuilt from an `iia-zoo-v1` checkpoint's config and state dict."""
    ckpt = read_checkpoint(Path(path) if path is not None else BUNDLED_DIGITS)
    net = UNet(**ckpt["config"])
    net.load_state_dict(ckpt["state_dict"])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_digits_model(path: str | Path | None = None) -> Denoiser:
    """The bundled (or a retrained) digits denoiser as a `Denoiser`: shape (1, 8, 8), 10 classes."""
    path = Path(path) if path is not None else BUNDLED_DIGITS
    net = load_digits_net(path)
    return Denoiser(
        net=net,
        shape=(1, 8, 8),
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        label_dim=net.label_dim,
        identity={"kind": "bundled", "name": "digits-edm", "sha256": sha256_file(path)},
    )


__all__ = [
    "BUNDLED_CLASSIFIER",
    "BUNDLED_DIGITS",
    "UNet",
    "features",
    "fd_digits",
    "load_classifier",
    "load_digits_model",
    "load_digits_net",
    "predict",
]
