"""ctypes binding of libiia_runtime's C ABI (runtime/native/include/iia/runtime.h), for tests that feed the SAME
arrays to the C library and to iia.runtime in one process."""

from __future__ import annotations

import ctypes

import numpy as np

OK, INVALID_ARGUMENT, ARTIFACT, BACKEND_UNAVAILABLE, RUNTIME = range(5)
THREADS_DEFAULT = -1  # IIA_THREADS_DEFAULT: ONNX Runtime's default (Python's threads=None)
DTYPES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.float16): 3, np.dtype(np.int8): 4,
          np.dtype(np.int16): 5, np.dtype(np.int32): 6, np.dtype(np.int64): 7, np.dtype(np.uint8): 8,
          np.dtype(np.uint16): 9, np.dtype(np.uint32): 10, np.dtype(np.uint64): 11, np.dtype(np.bool_): 12}


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("rank", ctypes.c_size_t),
                ("shape", ctypes.POINTER(ctypes.c_int64))]


class LoadOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("backend", ctypes.c_char_p), ("threads", ctypes.c_int),
                ("device_id", ctypes.c_int), ("verify", ctypes.c_int), ("spin", ctypes.c_int)]


class Info(ctypes.Structure):
    _fields_ = [("rank", ctypes.c_size_t), ("sample_shape", ctypes.c_int64 * 8), ("label_dim", ctypes.c_int64),
                ("max_batch", ctypes.c_int64), ("nfe", ctypes.c_int64), ("is_image", ctypes.c_int),
                ("backend", ctypes.c_char_p), ("solver", ctypes.c_char_p), ("model", ctypes.c_char_p)]


class RunOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("guidance", ctypes.POINTER(Tensor))]


class Guidance(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("guided", ctypes.c_int), ("lo", ctypes.c_double),
                ("hi", ctypes.c_double), ("default_scale", ctypes.c_double)]


class NativeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Library:
    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.iia_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(LoadOptions), ctypes.POINTER(ctypes.c_void_p)]
        lib.iia_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(Tensor), ctypes.POINTER(Tensor), ctypes.c_void_p,
                                ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        lib.iia_run_ex.argtypes = [ctypes.c_void_p, ctypes.POINTER(Tensor), ctypes.POINTER(Tensor),
                                   ctypes.POINTER(RunOptions), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                   ctypes.c_size_t]
        lib.iia_get_guidance.argtypes = [ctypes.c_void_p, ctypes.POINTER(Guidance)]
        lib.iia_free.argtypes = [ctypes.c_void_p]
        lib.iia_free.restype = ctypes.c_int
        lib.iia_get_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(Info)]
        lib.iia_describe.argtypes = [ctypes.c_void_p]
        lib.iia_describe.restype = ctypes.c_char_p
        lib.iia_last_error.restype = ctypes.c_char_p
        lib.iia_last_backend_ns.restype = ctypes.c_uint64
        self.lib = lib

    def error(self, status: int) -> NativeError:
        return NativeError(status, self.lib.iia_last_error().decode())

    def load(self, path, backend: str = "auto", threads: int = THREADS_DEFAULT, verify: bool = True,
             spin: bool = True, struct_size: int | None = None) -> "NativeSampler":
        """`struct_size`: override iia_load_options.struct_size (a caller built against another header)."""
        options = LoadOptions()
        self.lib.iia_load_options_init(ctypes.byref(options))
        options.backend, options.threads, options.verify, options.spin = backend.encode(), threads, int(verify), int(spin)
        if struct_size is not None:
            options.struct_size = struct_size
        handle = ctypes.c_void_p()
        status = self.lib.iia_load(str(path).encode(), ctypes.byref(options), ctypes.byref(handle))
        if status != OK:
            raise self.error(status)
        return NativeSampler(self, handle)


def _tensor(array: np.ndarray) -> tuple[Tensor, object]:
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        array = array.copy(order="C")
    shape = (ctypes.c_int64 * max(1, array.ndim))(*array.shape)
    return Tensor(array.ctypes.data, DTYPES[array.dtype], array.ndim, shape), (array, shape)


class NativeSampler:
    def __init__(self, library: Library, handle: ctypes.c_void_p):
        self.library, self.handle = library, handle
        self.info = Info()
        library.lib.iia_get_info(handle, ctypes.byref(self.info))
        self.sample_shape = tuple(self.info.sample_shape[: self.info.rank])

    def describe(self) -> str:
        return self.library.lib.iia_describe(self.handle).decode()

    def guidance(self) -> tuple[float, float, float] | None:
        """(lo, hi, default) of an artifact compiled for a guidance range (iia_get_guidance), else None."""
        g = Guidance()
        g.struct_size = ctypes.sizeof(Guidance)
        status = self.library.lib.iia_get_guidance(self.handle, ctypes.byref(g))
        if status != OK:
            raise self.library.error(status)
        return (g.lo, g.hi, g.default_scale) if g.guided else None

    def run(self, noise, class_labels=None, images: bool = True, uint8: bool = False, guidance=None,
            options_size: int | None = None):
        """(images float32 | None, images_uint8 uint8 | None); NativeError(status, message) on failure.
        guidance given (or options_size, to override iia_run_options.struct_size): through iia_run_ex."""
        noise = np.asarray(noise)
        t, keep = _tensor(noise)
        lt, keep_l = (None, None) if class_labels is None else _tensor(np.asarray(class_labels))
        batch = noise.shape[0] if noise.ndim == len(self.sample_shape) + 1 else 1
        out = np.empty((max(batch, 0), *self.sample_shape), np.float32) if images else None
        out8 = None
        if uint8:
            c, h, w = self.sample_shape
            out8 = np.empty((max(batch, 0), h, w, c), np.uint8)
        buffers = (None if out is None else out.ctypes.data, 0 if out is None else out.size,
                   None if out8 is None else out8.ctypes.data, 0 if out8 is None else out8.size)
        if guidance is None and options_size is None:
            status = self.library.lib.iia_run(self.handle, ctypes.byref(t), None if lt is None else ctypes.byref(lt),
                                              *buffers)
        else:
            options = RunOptions()
            self.library.lib.iia_run_options_init(ctypes.byref(options))
            gt, keep_g = (None, None) if guidance is None else _tensor(np.asarray(guidance))
            options.guidance = None if gt is None else ctypes.pointer(gt)
            if options_size is not None:
                options.struct_size = options_size
            status = self.library.lib.iia_run_ex(self.handle, ctypes.byref(t), None if lt is None else ctypes.byref(lt),
                                                 ctypes.byref(options), *buffers)
        if status != OK:
            raise self.library.error(status)
        return out, out8

    def close(self) -> None:
        if self.handle:
            self.library.lib.iia_free(self.handle)
            self.handle = None
