"""The analytic Gaussian-mixture denoiser: the exact posterior mean E[x0 | x, sigma].

Data: x0 ~ sum_k w_k N(mu_k, s^2 I). Noised: x = x0 + sigma n, so x | k ~ N(mu_k, (s^2 + sigma^2) I) and
E[x0 | x, k] = mu_k + s^2 / (s^2 + sigma^2) (x - mu_k). The posterior over k is a softmax of Gaussian
log-likelihoods. Its probability-flow ODE can be solved to any accuracy, so sampler error is exact.
Conditional variant: the class label is the component index (label_dim = number of components).
"""

from __future__ import annotations

import torch

from .base import Denoiser

DEFAULT_SHAPE = (1, 8, 8)


class GaussianMixtureNet(torch.nn.Module):
    def __init__(self, means: torch.Tensor, log_weights: torch.Tensor, spread: float, conditional: bool):
        super().__init__()
        self.register_buffer("means", means.to(torch.float32))  # [K, D]
        self.register_buffer("log_weights", log_weights.to(torch.float32))  # [K]
        self.spread = float(spread)
        self.conditional = conditional

    def forward(self, x, sigma, class_labels=None):
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        var = self.spread**2 + sigma.reshape(batch, 1) ** 2  # [B, 1]
        if self.conditional:
            mu = self.means[class_labels]  # [B, D]
            post = mu + (self.spread**2 / var) * (flat - mu)
            return post.reshape(x.shape)
        # squared distances to each mean: [B, K]
        # einsum (not `flat @ means.T`): the exporter would fold the transpose into a second copy of the means
        dist2 = (flat * flat).sum(1, keepdim=True) - 2 * torch.einsum("bd,kd->bk", flat, self.means) + (self.means * self.means).sum(1)
        logits = self.log_weights - 0.5 * dist2 / var
        resp = torch.softmax(logits, dim=1)  # [B, K]
        mean_mu = resp @ self.means  # [B, D]
        post = mean_mu + (self.spread**2 / var) * (flat - mean_mu)
        return post.reshape(x.shape)


def gaussian_mixture(
    shape: tuple[int, ...] = DEFAULT_SHAPE,
    components: int = 10,
    spread: float = 0.5,
    scale: float = 1.0,
    seed: int = 0,
    conditional: bool = False,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
) -> Denoiser:
    """A mixture of `components` isotropic Gaussians (std `spread`) with means ~ N(0, scale^2) per pixel."""
    if components < 1 or spread <= 0:
        raise ValueError("components must be >= 1 and spread > 0")
    gen = torch.Generator().manual_seed(seed)
    dim = 1
    for s in shape:
        dim *= int(s)
    means = torch.randn(components, dim, generator=gen, dtype=torch.float64) * scale
    log_weights = torch.log_softmax(torch.randn(components, generator=gen, dtype=torch.float64) * 0.5, 0)
    net = GaussianMixtureNet(means, log_weights, spread, conditional).eval()
    return Denoiser(
        net=net,
        shape=tuple(int(s) for s in shape),
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        label_dim=components if conditional else 0,
        analytic=True,
        identity={
            "kind": "gmm",
            "name": f"gmm-{'x'.join(map(str, shape))}-k{components}-s{spread:g}-seed{seed}{'-cond' if conditional else ''}",
            "config": {"shape": list(shape), "components": components, "spread": spread, "scale": scale,
                       "seed": seed, "conditional": conditional},
        },
    )

