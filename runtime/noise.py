"""The noise convention every tool follows: image k of seed s is `numpy.random.default_rng(s + k)`'s float32
standard normal (EDM generate.py's per-image seeds), default class label (s + k) mod label_dim. numpy only."""

from __future__ import annotations

import numpy as np


def draw_noise(seed: int | None, batch_size: int, shape) -> np.ndarray:
    """Standard-normal float32 noise [batch_size, *shape]: image k is drawn from its own generator
    `numpy.random.default_rng(seed + k)` (EDM generate.py's per-image seeds), so image k of seed s equals
    image 0 of seed s + k and does not depend on the batch size. seed None draws fresh entropy.

    Raises ValueError for a negative seed, an image seed seed + k over the contract's MAX_SEED (the bound the
    Triton model applies to each image's seed), or batch_size < 0.
    """
    from .contract import MAX_SEED  # (contract imports this module)

    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] % np.uint64(MAX_SEED - batch_size + 2))
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if batch_size and seed + batch_size - 1 > MAX_SEED:
        raise ValueError(f"seed {seed} with {batch_size} images: image seeds seed..seed+{batch_size - 1} must lie in "
                         f"[0, {MAX_SEED}] (the contract's MAX_SEED)")
    shape = tuple(int(s) for s in shape)
    out = np.empty((batch_size, *shape), dtype=np.float32)
    for k in range(batch_size):
        out[k] = np.random.default_rng(seed + k).standard_normal(shape, dtype=np.float32)
    return out


def draw_labels(seed: int, batch_size: int, label_dim: int) -> np.ndarray:
    """The default class ids int64 [batch_size] when none are given: image k of seed s gets (s + k) mod
    label_dim. Balanced over any label_dim consecutive images and, like the noise, fixed per image whatever
    the batch; every tool that draws labels for a seed (iia-sample, iia-bench, calibration, the parity check,
    iia-quality) uses this."""
    if batch_size < 0 or label_dim < 1:
        raise ValueError(f"need batch_size >= 0 and label_dim >= 1, got {batch_size} and {label_dim}")
    return ((np.uint64(seed) + np.arange(batch_size, dtype=np.uint64)) % np.uint64(label_dim)).astype(np.int64)
