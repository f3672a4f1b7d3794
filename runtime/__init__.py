"""iia runtime: load a compiled sampler artifact and run it. numpy + onnxruntime (or tensorrt) only: no torch.

    import iia.runtime
    sampler = iia.runtime.load("gmm-iia-edm-nfe9")          # backend="auto": TensorRT > ORT CUDA > ORT CPU
    x = sampler(seed=0, batch_size=16)                       # float32 [16, C, H, W]
    x = sampler(noise, class_labels=[3] * len(noise))        # your own standard-normal noise
    png = sampler.images(seed=0, batch_size=16, class_labels=3)   # uint8 [16, H, W, C]

A sampler is cheap to keep and safe to call from several threads at once (ONNX Runtime: one shared session;
TensorRT: one context behind a lock). Bad inputs raise ValueError naming what was expected.
"""

from .contract import SCHEMA, SCHEMA_VERSION, ArtifactError, draw_labels, draw_noise
from .loader import BACKENDS, describe, load
from .sampler import BackendUnavailable, Sampler, Samples

__all__ = ["ArtifactError", "BACKENDS", "BackendUnavailable", "SCHEMA", "SCHEMA_VERSION", "Sampler", "Samples",
           "describe", "draw_labels", "draw_noise", "load"]
