"""ONNX Runtime backends (CUDA and CPU).

Thread safety: `InferenceSession.run` is documented as safe to call concurrently from several threads on one
session, so a sampler holds ONE session and adds no lock; concurrent calls run in parallel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .contract import NO_CUDA, ORT_CPU, ORT_CUDA, cuda_device_count

from .sampler import BackendUnavailable, Sampler

CPU, CUDA = ORT_CPU, ORT_CUDA


def _ort():
    try:
        import onnxruntime
    except Exception as err:  # ImportError, or a broken install
        raise BackendUnavailable(f"onnxruntime is not importable ({type(err).__name__}: {err})") from None
    return onnxruntime


def session_options(threads: int | None = None):
    """Tuned options: all graph optimisations, sequential execution, `threads` intra-op threads
    (None: ONNX Runtime's default, one per physical core)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: no per-session warnings on a service's stderr
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def cuda_unavailable_reason() -> str | None:
    if cuda_device_count() == 0:
        return NO_CUDA
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                f"(install onnxruntime-gpu); available: {', '.join(ort.get_available_providers())}")
    return None


class OrtSession:
    """One ONNX Runtime session on CPU or CUDA; `run(feeds, outputs)` is thread-safe."""

    def __init__(self, model: bytes | str | Path, device: str = "cpu", threads: int | None = None,
                 device_id: int = 0):
        ort = _ort()
        if device == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise BackendUnavailable(reason)
            providers = [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        model = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(model, session_options(threads), providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to CPU silently when the CUDA libraries do not load
            raise BackendUnavailable(f"onnxruntime could not start its CUDA provider (got {self.session.get_providers()}); "
                                     f"check the CUDA/cuDNN libraries onnxruntime-gpu needs")
        self.device, self.threads = device, threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)


class OnnxRuntimeSampler(Sampler):
    """`sampler.onnx` on ONNX Runtime (CPU or CUDA); one session shared by all threads."""

    def __init__(self, manifest: dict, root: Path, model: bytes | Path, device: str = "cpu",
                 threads: int | None = None, device_id: int = 0):
        super().__init__(manifest, root)
        self.backend = CUDA if device == "cuda" else CPU
        self.threads = threads
        self._session = OrtSession(model, device, threads, device_id)
        if self._session.input_names != self.input_names or not set(self.output_names) <= set(self._session.output_names):
            raise ValueError(f"{root / 'sampler.onnx'} takes {self._session.input_names} and gives "
                             f"{self._session.output_names}, but the manifest says {self.input_names} -> "
                             f"{self.output_names}")

    def _run(self, feeds, outputs):
        session = self._session
        if session is None:
            raise RuntimeError("this sampler was closed")
        return session.run(feeds, outputs)

    def close(self) -> None:
        self._session = None
