"""The bundled digits models and FD-digits (no training here: these check the shipped checkpoints)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

pytest.importorskip("sklearn")

from iia.models import Denoiser  # noqa: E402
from iia.models.zoo import (  # noqa: E402
    BUNDLED_CLASSIFIER,
    BUNDLED_DIGITS,
    fd_digits,
    features,
    load_classifier,
    load_digits_model,
    predict,
)
from iia.models.zoo.classifier import FORMAT  # noqa: E402
from iia.models.zoo.data import load_digits_tensors, train_test_indices  # noqa: E402
from iia.models.zoo.unet import count_params  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def heun_sample(denoiser: Denoiser, labels: torch.Tensor, seed: int, steps: int = 18) -> tuple[torch.Tensor, int]:
    """Plain EDM Heun (2nd order, last step Euler) on the Karras schedule; returns samples and the NFE."""
    gen = torch.Generator().manual_seed(seed)
    t = karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max)
    x = torch.randn(len(labels), *denoiser.shape, generator=gen, dtype=torch.float64) * t[0]
    nfe = 0
    for i in range(steps):
        t_cur, t_next = t[i], t[i + 1]
        d = (x - denoiser(x, t_cur, labels)) / t_cur
        nfe += 1
        x_next = x + (t_next - t_cur) * d
        if t_next > 0:
            d2 = (x_next - denoiser(x_next, t_next, labels)) / t_next
            nfe += 1
            x_next = x + (t_next - t_cur) * 0.5 * (d + d2)
        x = x_next
    return x.to(torch.float32), nfe


def test_checkpoints_are_plain_dicts():
    for path in (BUNDLED_DIGITS, BUNDLED_CLASSIFIER):
        assert path.exists(), path
        assert path.stat().st_size < 4 * 1024 * 1024
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["format"] == FORMAT
        assert set(ckpt) >= {"format", "config", "state_dict", "train"}
        assert isinstance(ckpt["config"], dict) and isinstance(ckpt["train"], dict)
        assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


def test_bundled_model_loads(model):
    assert isinstance(model, Denoiser)
    assert model.shape == (1, 8, 8)
    assert model.label_dim == 10 and model.conditional
    assert model.sigma_min == 0.002 and model.sigma_max == 80.0
    assert model.identity == {"kind": "bundled", "name": "digits-edm", "sha256": hashlib.sha256(BUNDLED_DIGITS.read_bytes()).hexdigest()}
    assert count_params(model.net) <= 500_000
    assert not model.net.training
    train = torch.load(BUNDLED_DIGITS, map_location="cpu", weights_only=True)["train"]
    assert {"seed", "steps", "time_s", "final_loss"} <= set(train)


def test_denoiser_call_contract(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    labels = torch.tensor([0, 3, 5, 9])
    out = model(x, 1.0, labels)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the net itself takes sigma per sample and is batch-independent
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    full = model.net(x, sigma, labels)
    single = torch.cat([model.net(x[i : i + 1], sigma[i : i + 1], labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)
    # near sigma_min the denoiser is (almost) the identity, by the preconditioning
    near = model.net(x, torch.full((4,), 0.002), labels)
    assert (near - x).abs().max() < 0.02


def test_heun_samples_are_classified_as_their_label(model):
    labels = torch.arange(200) % 10
    samples, nfe = heun_sample(model, labels, seed=2024)
    assert nfe == 35
    assert torch.isfinite(samples).all()
    rate = float((predict(samples) == labels).float().mean())
    assert rate >= 0.80, f"only {rate:.1%} of samples classified as their label"


def test_classifier_held_out_accuracy(digits):
    images, labels = digits
    _, test = train_test_indices()
    assert len(test) == 360
    acc = float((predict(images[test]) == labels[test]).float().mean())
    assert acc >= 0.95, acc
    clf = load_classifier()
    assert clf is load_classifier()  # cached
    feats = features(images[:10])
    assert feats.shape == (10, 128) and torch.isfinite(feats).all()


def test_fd_digits_real_vs_real_is_zero_and_noise_is_large(digits):
    images, _ = digits
    assert fd_digits(images) == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(1000, 1, 8, 8, generator=gen) * 2 - 1
    fd_noise = fd_digits(noise)
    _, test = train_test_indices()
    fd_held_out = fd_digits(images[test])
    assert math.isfinite(fd_noise) and fd_noise > 50.0
    assert fd_held_out < 10.0 < fd_noise


def test_fd_digits_rejects_bad_input():
    with pytest.raises(ValueError):
        fd_digits(torch.zeros(10, 8, 8))
    with pytest.raises(ValueError):
        fd_digits(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError):
        fd_digits(torch.full((4, 1, 8, 8), float("nan")))
