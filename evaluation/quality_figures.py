"""`iia-quality`'s figures: side-by-side sample grids (same noises and labels in every panel) and FD-digits vs NFE."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .accuracy import save_figure

NUM_CLASSES = 10
GRID_SAMPLES = 100  # first 100 noises/labels: 10 rows (classes) x 10 columns

# Grid layout (pixels): 8x8 digits upscaled nearest x4, tiles separated by TILE_PAD, panels by PANEL_GAP,
# a HEADER-high strip above each panel for its label.
UPSCALE = 4
TILE_PAD = 2
PANEL_GAP = 8
HEADER = 16


def grid_tiles(samples: torch.Tensor) -> np.ndarray:
    """First (up to) 100 samples as a uint8 [rows*tile, cols*tile] mosaic: row c = class c (label i % 10)."""
    m = min(GRID_SAMPLES, samples.shape[0])
    cols = max(1, math.ceil(m / NUM_CLASSES))
    tile = 8 * UPSCALE
    h = NUM_CLASSES * (tile + TILE_PAD) + TILE_PAD
    w = cols * (tile + TILE_PAD) + TILE_PAD
    out = np.full((h, w), 64, dtype=np.uint8)  # dark grey separators
    u8 = (samples[:m, 0].to(torch.float64) * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()  # EDM's conversion
    u8 = u8.repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2)
    for i in range(m):
        r, c = i % NUM_CLASSES, i // NUM_CLASSES
        y, x = TILE_PAD + r * (tile + TILE_PAD), TILE_PAD + c * (tile + TILE_PAD)
        out[y:y + tile, x:x + tile] = u8[i]
    return out


def grid_image_size(panels: int, n: int = GRID_SAMPLES) -> tuple[int, int]:
    """(width, height) of a comparison PNG with `panels` side-by-side grids of min(n, 100) samples."""
    cols = max(1, math.ceil(min(GRID_SAMPLES, n) / NUM_CLASSES))
    tile = 8 * UPSCALE
    pw, ph = cols * (tile + TILE_PAD) + TILE_PAD, NUM_CLASSES * (tile + TILE_PAD) + TILE_PAD
    return panels * pw + (panels + 1) * PANEL_GAP, HEADER + ph + PANEL_GAP


def save_comparison_grid(panels: list[tuple[str, torch.Tensor]], path: str | Path) -> Path:
    """One PNG: side-by-side labelled grids (same noises/labels in every panel), written atomically."""
    from PIL import Image, ImageDraw

    from iia.runtime.grid import save_png

    tiles = [(label, grid_tiles(x)) for label, x in panels]
    n = min(x.shape[0] for _, x in panels)
    width, height = grid_image_size(len(tiles), n)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x = PANEL_GAP
    for label, arr in tiles:
        draw.text((x, 2), label, fill=255)
        canvas.paste(Image.fromarray(arr), (x, HEADER))
        x += arr.shape[1] + PANEL_GAP
    path = Path(path)
    save_png(np.asarray(canvas)[..., None], path)
    return path


def plot_quality(report: dict, path: str | Path) -> None:
    """FD-digits vs NFE per solver (log y), the reference sampler's FD-digits as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["solver"] != "reference"]
    ref = next(r for r in report["rows"] if r["solver"] == "reference")
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for solver in dict.fromkeys(r["solver"] for r in rows):
        pts = sorted((r["nfe"], r["fd_digits"], r["fd_digits_se"]) for r in rows if r["solver"] == solver)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, label=solver)
    ax.axhline(ref["fd_digits"], color="k", linestyle="--", linewidth=1,
               label=f"reference ({ref['nfe']} NFE): {ref['fd_digits']:.3f}")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["nfe"] for r in rows}))
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.set_title(f"{report.get('model')}: FD-digits vs NFE (n = {report['n']}; not FID)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
