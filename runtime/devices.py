"""CUDA / TensorRT availability probes: CUDA through the driver API (ctypes), since TensorRT's runtime can crash
a process that has no GPU, so it is never imported before a device is found. Standard library only."""

from __future__ import annotations

import ctypes

from .contract import NO_CUDA


def _cuda_driver():
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib if lib.cuInit(0) == 0 else None
    return None


def cuda_device_count() -> int:
    lib = _cuda_driver()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def gpu_compute_capability(device: int = 0) -> str | None:
    lib = _cuda_driver()
    if lib is None:
        return None
    major, minor, dev = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    return f"{major.value}.{minor.value}"


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can be used here (a CUDA device, then an importable tensorrt), else one line why."""
    if cuda_device_count() == 0:
        return NO_CUDA
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # ImportError, or a stub package that fails on import
        return f"tensorrt is not importable ({type(err).__name__}: {err})"
    return None
