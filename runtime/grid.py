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


class NpzWriter:
    """An .npz written atomically and array by array, each array streamed in chunks (np.load reads it like
    np.savez's): `with NpzWriter(path) as z: with z.array("x", np.float32, shape) as a: a.write(chunk)...`.
    Rows written must add up to shape[0] exactly (ValueError otherwise, and nothing is written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self):
        import zipfile

        self._open = atomic_open(self.path)
        self._zip = zipfile.ZipFile(self._open.__enter__(), "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        return self

    def __exit__(self, *exc):
        try:
            self._zip.close()
        except BaseException:
            if exc[0] is None:
                raise
        return self._open.__exit__(*exc)

    def put(self, name: str, array) -> None:
        array = np.asarray(array)
        with self.array(name, array.dtype, array.shape) as out:
            out.write(array if array.ndim else array.reshape(1))

    def array(self, name: str, dtype, shape) -> "_NpyStream":
        return _NpyStream(self._zip, name, np.dtype(dtype), tuple(int(s) for s in shape))


class _NpyStream:
    def __init__(self, zf, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self.zf, self.name, self.dtype, self.shape, self.rows = zf, name, dtype, shape, 0

    def __enter__(self):
        self.f = self.zf.open(f"{self.name}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.f, header)
        return self

    def write(self, chunk) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if self.shape and tuple(chunk.shape[1:]) != self.shape[1:]:
            raise ValueError(f"{self.name}: chunk of shape {list(chunk.shape)} for an array {list(self.shape)}")
        self.rows += chunk.shape[0] if self.shape else 1
        self.f.write(chunk.tobytes())

    def __exit__(self, *exc):
        self.f.close()
        expected = self.shape[0] if self.shape else 1
        if exc[0] is None and self.rows != expected:
            raise ValueError(f"{self.name}: {self.rows} rows written, {expected} declared")
