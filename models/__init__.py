"""Denoisers behind one interface: `Denoiser`, the analytic mixture, loaders for user checkpoints."""

from .base import Denoiser, DenoiserError, from_callable
from .gmm import gaussian_mixture
from .registry import load, resolve_model

__all__ = ["Denoiser", "DenoiserError", "from_callable", "gaussian_mixture", "load", "resolve_model"]
