"""`load(DIR, backend="auto")`: manifest checks, sha256 checks, backend choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .contract import BACKENDS, MAX_THREADS, ORT_CUDA, SAMPLER_ONNX, SAMPLER_ONNX_DATA, SAMPLER_PLAN, TENSORRT
from .manifest import artifact_root, check_listed, read_manifest, read_verified, verify_all, verify_file
from .onnx_backend import OnnxRuntimeSampler, cuda_unavailable_reason
from .sampler import BackendUnavailable, Sampler
from .trt_backend import TensorRTSampler, check_plan_compatible



def _onnx_model(root: Path, manifest: dict, verify: bool):
    """Verified bytes of sampler.onnx (or its path, when its tensors live in an external .data file)."""
    if SAMPLER_ONNX_DATA in manifest["files"]:  # ONNX Runtime resolves the .data (its digest: verify_all)
        if verify:
            verify_file(root, manifest, SAMPLER_ONNX)
        else:  # unverified, yet never a link ONNX Runtime would follow outside the artifact
            for name in (SAMPLER_ONNX, SAMPLER_ONNX_DATA):
                check_listed(root, manifest, name)
        return root / SAMPLER_ONNX
    return read_verified(root, manifest, SAMPLER_ONNX, verify)


def _build(name: str, root: Path, manifest: dict, threads, device_id: int, verify: bool,
           spin: bool = True) -> Sampler:
    if name == TENSORRT:
        check_plan_compatible(manifest)  # checks for a CUDA device before importing tensorrt
        return TensorRTSampler(manifest, root, read_verified(root, manifest, SAMPLER_PLAN, verify))
    if name == ORT_CUDA:
        reason = cuda_unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        return OnnxRuntimeSampler(manifest, root, _onnx_model(root, manifest, verify), "cuda", threads, device_id, spin)
    return OnnxRuntimeSampler(manifest, root, _onnx_model(root, manifest, verify), "cpu", threads, device_id, spin)


def load(path: str | Path, backend: str = "auto", *, threads: int | None = None, device_id: int = 0,
         verify: bool = True, log=None, spin: bool = True) -> Sampler:
    """Load a compiled sampler from an artifact directory (made by `iia-compile`).

    backend: "auto" (TensorRT > ONNX Runtime CUDA > ONNX Runtime CPU, the first usable here), or one of
    "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu" (BackendUnavailable, a RuntimeError, saying why if it
    cannot run here). threads: ONNX Runtime intra-op threads (None: its default); spin=False: its idle threads
    sleep instead of spin-waiting (for machines whose cores are all busy; no effect on TensorRT). verify: check
    every file's sha256 against the manifest (ArtifactError, a ValueError, naming a corrupted or missing file).
    Skipped backends and why are in `sampler.fallbacks`; `log` (e.g. print) is told about them too.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected auto, {', '.join(BACKENDS)}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or isinstance(threads, bool)
                                or not 1 <= threads <= MAX_THREADS):  # 2.5 or "2" are no thread counts
        raise ValueError(f"threads must lie in [1, {MAX_THREADS}], got {threads!r}")
    root = artifact_root(path)
    manifest = read_manifest(root)
    # The model file a backend loads is checked as it is read (what is checked is what is loaded); the other
    # one (the plan, for an ONNX Runtime backend) after the choice, so corruption anywhere is refused.
    model_files = tuple(name for name in (SAMPLER_ONNX, SAMPLER_PLAN) if name in manifest["files"])
    if verify:
        verify_all(root, manifest, skip=model_files)
    sampler = _choose(backend, root, manifest, threads, device_id, verify, log, spin)
    if verify:
        loaded = SAMPLER_PLAN if sampler.backend == TENSORRT else SAMPLER_ONNX
        try:
            for name in model_files:
                if name != loaded:
                    verify_file(root, manifest, name)
        except BaseException:
            sampler.close()
            raise
    return sampler


def _choose(backend, root, manifest, threads, device_id, verify, log, spin=True) -> Sampler:
    if backend != "auto":
        try:
            return _build(backend, root, manifest, threads, device_id, verify, spin)
        except BackendUnavailable as err:
            raise BackendUnavailable(f"backend {backend!r} is unavailable: {err}") from None
    skipped: list[tuple[str, str]] = []
    for name in BACKENDS:
        try:
            sampler = _build(name, root, manifest, threads, device_id, verify, spin)
        except BackendUnavailable as err:
            skipped.append((name, str(err)))
            if log is not None:
                log(f"{name} skipped: {err}")
            continue
        sampler.fallbacks = skipped
        return sampler
    raise BackendUnavailable("no backend can run this artifact here: "
                             + "; ".join(f"{name}: {why}" for name, why in skipped))


def describe(sampler: Sampler) -> str:
    """One line: backend and, for auto, what was skipped."""
    text = f"backend {sampler.backend}"
    if sampler.fallbacks:
        text += " (" + "; ".join(f"{name} skipped: {why}" for name, why in sampler.fallbacks) + ")"
    return text


__all__ = ["BACKENDS", "describe", "load"]
