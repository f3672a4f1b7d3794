"""ONNX Runtime backends (CUDA and CPU).

Thread safety: `InferenceSession.run` is documented as safe to call concurrently from several threads on one
session, so a sampler holds ONE session per batch specialisation (the dynamic one, plus one per manifest
`static_batches` entry, made once under a lock on first use) and adds no lock around runs; concurrent calls run
in parallel.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .contract import BATCH_AXIS, MAX_THREADS, NO_CUDA, NOISE, ORT_CPU, ORT_CUDA, SAMPLER_ONNX, STATIC_BATCHES, ArtifactError
from .devices import cuda_device_count
from .manifest import check_graph_metadata

from .sampler import BackendUnavailable, Sampler


def _ort():
    try:
        import onnxruntime
    except Exception as err:  # ImportError, or a broken install
        raise BackendUnavailable(f"onnxruntime is not importable ({type(err).__name__}: {err})") from None
    return onnxruntime


def session_options(threads: int | None = None, static_batch: int | None = None, spin: bool = True):
    """Tuned options: all graph optimisations, sequential execution, `threads` intra-op threads
    (None: ONNX Runtime's default, one per physical core); `static_batch` fixes the free dimension
    BATCH_AXIS, so ONNX Runtime folds every shape computation for that batch size when it builds the session;
    `spin=False` makes idle intra-op threads sleep instead of spin-waiting (on a machine with as many busy
    threads as cores, spinning threads take turns with the working ones: latency becomes bimodal)."""
    ort = _ort()
    opts = ort.SessionOptions()
    if static_batch is not None:
        opts.add_free_dimension_override_by_name(BATCH_AXIS, int(static_batch))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: no per-session warnings on a service's stderr
    if threads is not None:
        if not 1 <= int(threads) <= MAX_THREADS:
            raise ValueError(f"threads must lie in [1, {MAX_THREADS}], got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
                 device_id: int = 0, static_batch: int | None = None, spin: bool = True):
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
        self.session = ort.InferenceSession(model, session_options(threads, static_batch, spin), providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to CPU silently when the CUDA libraries do not load
            raise BackendUnavailable(f"onnxruntime could not start its CUDA provider (got {self.session.get_providers()}); "
                                     f"check the CUDA/cuDNN libraries onnxruntime-gpu needs")
        self.device, self.threads, self.static_batch = device, threads, static_batch
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
             "int64": "tensor(int64)", "int32": "tensor(int32)", "uint8": "tensor(uint8)"}


def check_graph_interface(session, manifest: dict, where) -> None:
    """ArtifactError unless the graph's inputs and outputs (names, dtypes, static dimensions) and its stamped
    metadata (NFE, label_dim, sample_shape) are what the manifest describes."""

    def described(args):
        return [(a.name, a.type, [d if isinstance(d, int) else "batch" for d in a.shape]) for a in args]

    def declared(tensors):
        return [(t["name"], ORT_TYPES[t["dtype"]], list(t["shape"])) for t in tensors]

    graph_in, want_in = described(session.get_inputs()), declared(manifest["inputs"])
    graph_out = {name: (name, kind, shape) for name, kind, shape in described(session.get_outputs())}
    if graph_in != want_in or any(graph_out.get(t[0]) != t for t in declared(manifest["outputs"])):
        raise ArtifactError(f"{where} takes {graph_in} and gives {list(graph_out.values())}, but manifest.json "
                            f"describes {want_in} -> {declared(manifest['outputs'])}")
    check_graph_metadata(session.get_modelmeta().custom_metadata_map, manifest, where)


class OnnxRuntimeSampler(Sampler):
    """`sampler.onnx` on ONNX Runtime (CPU or CUDA): one dynamic-batch session shared by all threads, plus one
    session per manifest `static_batches` entry (made on first use), which runs the calls of exactly that batch."""

    def __init__(self, manifest: dict, root: Path, model: bytes | Path, device: str = "cpu",
                 threads: int | None = None, device_id: int = 0, spin: bool = True):
        super().__init__(manifest, root)
        self.backend = ORT_CUDA if device == "cuda" else ORT_CPU
        self.threads, self.spin = threads, spin
        where = Path(root) / SAMPLER_ONNX if root is not None else SAMPLER_ONNX
        try:
            self._session = OrtSession(model, device, threads, device_id, spin=spin)
        except (BackendUnavailable, ValueError):
            raise
        except Exception as err:  # onnxruntime's Fail / InvalidProtobuf / InvalidGraph ...: the file is unusable
            reason = " ".join(str(err).split())[:300]
            raise ArtifactError(f"{where} cannot be loaded by ONNX Runtime ({type(err).__name__}: {reason})") from None
        check_graph_interface(self._session.session, manifest, where)
        self.static_batches = tuple(sorted(set(manifest.get(STATIC_BATCHES, []))))
        # the model bytes stay in memory only when specialised sessions may still be made from them
        self._model = model if self.static_batches else None
        self._device, self._device_id = device, device_id
        self._static: dict[int, OrtSession] = {}
        self._lock = threading.Lock()

    def session_for(self, batch: int) -> OrtSession:
        """The session that runs a call of `batch` samples: its static specialisation if listed, else dynamic."""
        if self._session is None:
            raise RuntimeError("this sampler was closed")
        if batch not in self.static_batches:
            return self._session
        session = self._static.get(batch)
        if session is None:
            with self._lock:  # one session per batch even when several threads ask at once
                session = self._static.get(batch)
                if session is None:
                    session = OrtSession(self._model, self._device, self.threads, self._device_id, static_batch=batch,
                                         spin=self.spin)
                    self._static[batch] = session
        return session

    def _run(self, feeds, outputs):
        return self.session_for(feeds[NOISE].shape[0]).run(feeds, outputs)

    def close(self) -> None:
        self._session = None
        self._static = {}
