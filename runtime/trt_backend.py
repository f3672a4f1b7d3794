"""TensorRT backend: `sampler.plan` through TensorRT's Python API (tensor-name API of TensorRT >= 8.5).

Device memory and the stream come from polygraphy's ctypes wrapper of the CUDA runtime (`polygraphy.cuda`),
so neither torch nor pycuda is needed. Buffers for the engine's maximum batch are allocated once and bound
to the context at construction; a call copies the inputs in, sets the input shapes, enqueues, copies the
requested outputs back and synchronises.

Thread safety: ONE execution context and its buffers, guarded by a lock, so concurrent calls serialise
(the GPU would mostly serialise them anyway, and each extra context would reserve its own activation memory).
For parallel GPU streams, load one sampler per worker.

Never touch TensorRT before checking for a CUDA device: its runtime can crash the process without one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import SAMPLER_PLAN, TENSORRT, ArtifactError
from .devices import gpu_compute_capability, tensorrt_unavailable_reason

from .sampler import BackendUnavailable, Sampler


def plan_mismatch(engine: dict, trt_version: str, capability: str | None) -> str | None:
    """Why a plan built with `engine` (manifest) cannot run on this TensorRT / GPU, or None if it can."""
    built_v, built_cc = engine.get("tensorrt"), engine.get("compute_capability")
    if built_v == trt_version and built_cc == capability:
        return None
    return (f"{SAMPLER_PLAN} was built with TensorRT {built_v} for GPU compute capability {built_cc}, but this machine has "
            f"TensorRT {trt_version} and compute capability {capability}; a TensorRT plan only runs where it was "
            f"built (recompile the artifact here, or use an onnxruntime backend)")


def import_tensorrt():
    """The tensorrt module, after checking that a CUDA device exists (else BackendUnavailable)."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    import tensorrt

    return tensorrt


def plan_unavailable_reason(manifest: dict) -> str | None:
    engine = manifest.get("engine") or {}
    if not engine.get("built") or SAMPLER_PLAN not in manifest["files"]:
        why = engine.get("reason") or "not built"
        return f"the artifact has no TensorRT plan ({SAMPLER_PLAN} was not built at compile time: {why})"
    return None


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype
    item_shape: tuple[int, ...]
    ptr: int
    nbytes: int


class TrtEngine:
    """A deserialised engine with one execution context, buffers for `max_batch`, and a lock."""

    def __init__(self, plan: bytes, max_batch: int):
        self._lock = threading.Lock()
        self._bindings: dict[str, _Binding] = {}
        self._stream = None
        trt = import_tensorrt()
        try:
            from polygraphy import cuda
        except Exception as err:
            raise BackendUnavailable(f"polygraphy (CUDA memory helpers) is not importable: {err}") from None
        self._trt, self._cuda, self._kind = trt, cuda.wrapper(), cuda.MemcpyKind
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendUnavailable("TensorRT could not deserialize the plan (see its log above)")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")
        try:
            self._stream = cuda.Stream()
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                if is_input:  # the profile's maximum bounds the batch
                    max_batch = min(max_batch, int(self._engine.get_tensor_profile_shape(name, 0)[2][0]))
            self.max_batch = max_batch
            for i in range(self._engine.num_io_tensors):
                name = self._engine.get_tensor_name(i)
                is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
                item_shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))[1:]
                nbytes = max(1, max_batch * int(np.prod(item_shape, dtype=np.int64)) * dtype.itemsize)
                ptr = self._cuda.malloc(nbytes)
                self._bindings[name] = _Binding(name, is_input, dtype, item_shape, ptr, nbytes)
                if not self._context.set_tensor_address(name, ptr):
                    raise BackendUnavailable(f"TensorRT refused the buffer for tensor {name}")
        except BaseException:
            self.close()
            raise
        self.input_names = [b.name for b in self._bindings.values() if b.is_input]
        self.output_names = [b.name for b in self._bindings.values() if not b.is_input]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        with self._lock:
            if self._context is None:
                raise RuntimeError("this TensorRT sampler was closed")
            stream = self._stream.ptr
            for name, value in feeds.items():
                binding = self._bindings[name]
                host = np.ascontiguousarray(value, dtype=binding.dtype)  # int64 labels -> int32 on TensorRT 8
                if host.nbytes > binding.nbytes:
                    raise ValueError(f"{name}: batch {host.shape[0]} exceeds the engine's maximum {self.max_batch}")
                if not self._context.set_input_shape(name, tuple(host.shape)):
                    raise ValueError(f"TensorRT refused input shape {list(host.shape)} for {name}")
                self._cuda.memcpy(binding.ptr, host.ctypes.data, host.nbytes, self._kind.HostToDevice, stream)
            if not self._context.execute_async_v3(stream):
                raise RuntimeError("TensorRT execution failed (see its log above)")
            results = []
            for name in outputs:
                binding = self._bindings[name]
                host = np.empty(tuple(self._context.get_tensor_shape(name)), dtype=binding.dtype)
                self._cuda.memcpy(host.ctypes.data, binding.ptr, host.nbytes, self._kind.DeviceToHost, stream)
                results.append(host)
            self._stream.synchronize()
        return results

    def close(self) -> None:
        with self._lock:  # never free buffers under a running call
            for binding in self._bindings.values():
                self._cuda.free(binding.ptr)
            self._bindings = {}
            if self._stream is not None:
                self._stream.free()
                self._stream = None
            self._context = self._engine = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TensorRTSampler(Sampler):
    """`sampler.plan` on TensorRT; concurrent calls serialise on one context (see the module docstring)."""

    backend = TENSORRT

    def __init__(self, manifest: dict, root: Path, plan: bytes):
        super().__init__(manifest, root)
        self._engine = TrtEngine(plan, self.max_batch)
        self.max_batch = self._engine.max_batch
        missing = [n for n in self.input_names + self.output_names
                   if n not in self._engine.input_names + self._engine.output_names]
        declared = {t["name"]: tuple(t["shape"][1:]) for t in manifest["inputs"] + manifest["outputs"]}
        wrong = {name: b.item_shape for name, b in self._engine._bindings.items()
                 if name in declared and b.item_shape != declared[name]}
        if missing or wrong:
            self._engine.close()
            raise ArtifactError(f"{root / SAMPLER_PLAN} does not match manifest.json: " + (
                f"lacks tensor(s) {missing}" if missing else f"per-sample shapes {wrong}, the manifest says "
                f"{ {n: declared[n] for n in wrong} }"))

    def _run(self, feeds, outputs):
        return self._engine.run(feeds, outputs)

    def close(self) -> None:
        self._engine.close()


def check_plan_compatible(manifest: dict) -> None:
    """BackendUnavailable unless this machine can run the artifact's plan (device, TensorRT, version, GPU)."""
    reason = plan_unavailable_reason(manifest)
    if reason:
        raise BackendUnavailable(reason)
    trt = import_tensorrt()
    reason = plan_mismatch(manifest.get("engine") or {}, getattr(trt, "__version__", "?"), gpu_compute_capability())
    if reason:
        raise BackendUnavailable(reason)
