"""TensorRT engine building through polygraphy, where TensorRT and a CUDA device exist.

The plan of the build (profiles, precision flags, layers kept in fp32) is plain data, testable anywhere;
only `build_engine` touches TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from iia.runtime.cuda import cuda_device_count, gpu_compute_capability

NORMALIZATION_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "ReduceMean", "Pow")
PRECISIONS = ("fp32", "fp16", "bf16")


class EngineUnavailable(RuntimeError):
    """TensorRT or a CUDA device is missing; the message says which."""


def engine_unavailable_reason() -> str | None:
    """None when an engine can be built here, else one line saying why not."""
    if cuda_device_count() == 0:
        return "no CUDA device found (libcuda missing or no GPU)"
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # ImportError, or a stub package that fails on import
        return f"tensorrt is not importable ({type(err).__name__}: {err})"
    return None


@dataclass
class EnginePlan:
    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    sample_shape: tuple[int, ...] = ()
    conditional: bool = False
    fp32_layers: list[str] = field(default_factory=list)  # node names kept in fp32 under fp16/bf16
    timing_cache: str | None = None
    builder_optimization_level: int = 3

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise ValueError(f"need 1 <= min <= opt <= max batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input: (min, opt, max) shapes of the one optimisation profile over the batch axis."""
        shapes = {"noise": tuple((b, *self.sample_shape) for b in (self.min_batch, self.opt_batch, self.max_batch))}
        if self.conditional:
            shapes["class_labels"] = ((self.min_batch,), (self.opt_batch,), (self.max_batch,))
        return shapes

    def config_kwargs(self) -> dict:
        """Keyword arguments for polygraphy's `CreateConfig` (profiles added by `build_engine`)."""
        kwargs = {"fp16": self.precision == "fp16", "bf16": self.precision == "bf16",
                  "builder_optimization_level": self.builder_optimization_level}
        if self.precision != "fp32" and self.fp32_layers:
            kwargs["precision_constraints"] = "obey"
        if self.timing_cache:
            kwargs["load_timing_cache"] = self.timing_cache
        return kwargs


def fp32_layer_names(model: onnx.ModelProto) -> list[str]:
    """Normalisation and pow nodes: fp16 overflow points in diffusion nets, kept in fp32."""
    return [n.name for n in model.graph.node if n.op_type in NORMALIZATION_OPS]


def build_engine(onnx_path: str, plan: EnginePlan, engine_path: str) -> dict:
    """Build and save a TensorRT engine; returns its TensorRT version and GPU compute capability."""
    reason = engine_unavailable_reason()
    if reason:
        raise EngineUnavailable(reason)
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, NetworkFromOnnxPath, Profile, SaveEngine, SetLayerPrecisions,
                                        engine_from_network)

    profile = Profile()
    for name, (lo, opt, hi) in plan.profile_shapes().items():
        profile.add(name, min=lo, opt=opt, max=hi)
    network = NetworkFromOnnxPath(onnx_path)
    if plan.precision != "fp32" and plan.fp32_layers:
        network = SetLayerPrecisions(network, {name: trt.float32 for name in plan.fp32_layers})
    config = CreateConfig(profiles=[profile], **plan.config_kwargs())
    engine = engine_from_network(network, config=config, save_timing_cache=plan.timing_cache)
    SaveEngine(engine, engine_path)()
    return {"tensorrt": trt.__version__, "compute_capability": gpu_compute_capability()}
