"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as tensors in [-1, 1]; no download needed."""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
SHAPE = (1, 8, 8)
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images float32 [N, 1, 8, 8] scaled from 0..16 to [-1, 1], labels int64 [N]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).reshape(-1, *SHAPE) / 8.0 - 1.0
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images, labels


def train_test_indices(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded train/held-out split of the 1,797 digits (indices into `load_digits_tensors()`)."""
    from sklearn.model_selection import train_test_split

    _, labels = load_digits_tensors()
    index = np.arange(labels.numel())
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels.numpy())
    return np.sort(train), np.sort(test)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1, vertical: bool = False,
                 prob: float = 1.0, fill: float = -1.0) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-max_shift, max_shift] (no wrap-around: the
    uncovered border gets `fill`, the background value). Horizontal only unless `vertical`. Never flips."""
    if max_shift <= 0 or prob <= 0:
        return images
    b, _, h, w = images.shape
    m = max_shift
    padded = torch.nn.functional.pad(images, (m, m, m if vertical else 0, m if vertical else 0), value=fill)
    dx = torch.randint(-m, m + 1, (b,), generator=generator)
    dy = torch.randint(-m, m + 1, (b,), generator=generator) if vertical else torch.zeros(b, dtype=torch.int64)
    keep = torch.rand(b, generator=generator) >= prob
    dx[keep] = 0
    dy[keep] = 0
    rows = (torch.arange(h).reshape(1, h) + (m if vertical else 0) - dy.reshape(b, 1))  # [B, H]
    cols = torch.arange(w).reshape(1, w) + m - dx.reshape(b, 1)  # [B, W]
    batch = torch.arange(b).reshape(b, 1, 1)
    out = padded[batch, :, rows.reshape(b, h, 1), cols.reshape(b, 1, w)]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
