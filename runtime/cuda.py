"""CUDA probing through the driver API: no torch, and no TensorRT (its runtime can segfault without a GPU)."""

from __future__ import annotations

import ctypes


def _driver():
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib if lib.cuInit(0) == 0 else None
    return None


def cuda_device_count() -> int:
    lib = _driver()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def gpu_compute_capability(device: int = 0) -> str | None:
    lib = _driver()
    if lib is None:
        return None
    major, minor, dev = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    return f"{major.value}.{minor.value}"
