"""FD-digits: the Frechet distance between Gaussian fits of classifier features, for 8x8 digits.

FD-digits(samples) = |mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^{1/2}), where (mu, S) are the mean and
covariance of the 128-d penultimate-layer features of the bundled digit classifier
(`classifier.features`), for the generated samples (s) and for all 1,797 real scikit-learn digits (r).

This is the FID recipe with a small digit CNN in place of Inception. It is NOT FID and its numbers are not
comparable to FID numbers: call it FD-digits. Like FID it is biased upward at small sample counts, so compare
runs at the same N (2,000 samples is the reference setting). Samples are clamped to [-1, 1] before feature
extraction, as they would be when written out as images.
"""

from __future__ import annotations

import numpy as np
import torch

from .classifier import features, load_classifier
from .data import load_digits_tensors

_REAL_STATS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def feature_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and covariance [F, F] (float64, unbiased) of the classifier features of digits x [N,1,8,8]."""
    x = torch.as_tensor(x)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"FD-digits needs samples of shape [N, 1, 8, 8], got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError("FD-digits needs at least 2 samples")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("FD-digits samples contain NaN/Inf")
    feats = features(x.clamp(-1.0, 1.0), load_classifier()).to(torch.float64).numpy()
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def real_stats() -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of all 1,797 real digits (computed once, cached in memory)."""
    if "all" not in _REAL_STATS:
        images, _ = load_digits_tensors()
        _REAL_STATS["all"] = feature_stats(images)
    return _REAL_STATS["all"]


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2).

    tr((cov1 cov2)^{1/2}) is computed as tr((A cov2 A)^{1/2}) with A = cov1^{1/2}: the matrix under the root
    is symmetric PSD, so an eigen-decomposition suffices and stays real and stable for singular covariances.
    """
    a = _psd_sqrt(cov1)
    middle = a @ cov2 @ a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def fd_digits(samples: torch.Tensor) -> float:
    """FD-digits of samples [N, 1, 8, 8] in [-1, 1] against all 1,797 real digits (lower is better)."""
    mu, cov = feature_stats(samples)
    mu_r, cov_r = real_stats()
    return frechet_distance(mu, cov, mu_r, cov_r)
