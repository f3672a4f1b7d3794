"""A PNG grid of uint8 images [N, H, W, C] (Pillow, imported lazily)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from iia.runtime.contract import atomic_open

MIN_TILE = 32  # tiles smaller than this are upscaled (nearest) by an integer factor: 8x8 -> x4


def upscale_factor(height: int, width: int) -> int:
    return max(1, MIN_TILE // max(height, width))


def grid_array(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H*s+pad)+pad, cols*(W*s+pad)+pad, C'] uint8 grid (C' in 1, 3, 4)."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {list(images.shape)}")
    n, h, w, c = images.shape
    if c not in (1, 3, 4):  # show the first channel of other channel counts
        images, c = images[..., :1], 1
    scale = upscale_factor(h, w)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def save_png(grid: np.ndarray, path: str | Path) -> None:
    """Write atomically (temp file + rename): a failure never leaves a half-written PNG."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(grid[..., 0] if grid.shape[2] == 1 else grid))  # L, RGB, RGBA
    with atomic_open(path) as f:
        image.save(f, format="PNG")


def save_npz(path: str | Path, **arrays) -> None:
    with atomic_open(path) as f:
        np.savez(f, **arrays)
