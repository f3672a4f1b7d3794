"""iia runtime: load a compiled sampler artifact and run it. numpy + onnxruntime (or tensorrt) only: no torch.

    import iia.runtime
    sampler = iia.runtime.load("gmm-iia-edm-nfe9")          # backend="auto": TensorRT > ORT CUDA > ORT CPU
    x = sampler(seed=0, batch_size=16)                       # float32 [16, C, H, W]
    x = sampler(noise, class_labels=[3] * len(noise))        # your own standard-normal noise
    png = sampler.images(seed=0, batch_size=16, class_labels=3)   # uint8 [16, H, W, C]

A sampler is cheap to keep and safe to call from several threads at once (ONNX Runtime: one shared session;
TensorRT: one context behind a lock). Bad inputs raise ValueError naming what was expected.
"""

from .contract import BACKENDS, SCHEMA, SCHEMA_VERSION, ArtifactError, draw_labels, draw_noise

# The loader and backends are imported on first use, so `iia.runtime.contract` (the bottom layer every package
# may import) costs only itself: `import iia.models` must not pull in ONNX Runtime's wrappers.
_LAZY = {"describe": "loader", "load": "loader", "BackendUnavailable": "sampler", "Sampler": "sampler",
         "Samples": "sampler"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ArtifactError", "BACKENDS", "BackendUnavailable", "SCHEMA", "SCHEMA_VERSION", "Sampler", "Samples",
           "describe", "draw_labels", "draw_noise", "load"]
