"""The ONE TensorRT engine builder (through polygraphy), used by `iia-compile` for `sampler.plan` and by
`iia-bench` for the one-denoiser-call plan, so both are built under the same rules.

The plan of a build (inputs and their profile, precision flags, layers kept in fp32) is plain data, testable
anywhere; only `build_engine` touches TensorRT, after `tensorrt_unavailable_reason()` found a CUDA device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .contract import DENOISER_LABELS, DENOISER_SIGMA, DENOISER_X, GUIDANCE, LABELS, NOISE
from .devices import gpu_compute_capability, tensorrt_unavailable_reason

# fp16 overflow points of diffusion nets (normalisation statistics, pow): kept in fp32 under fp16/bf16
NORMALIZATION_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "ReduceMean", "Pow")
PRECISIONS = ("fp32", "fp16", "bf16")


class EngineUnavailable(RuntimeError):
    """TensorRT or a CUDA device is missing; the message says which."""


def sampler_inputs(sample_shape, conditional: bool, guided: bool = False) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (no batch axis) of the sampler graph's inputs; `guided`: a guidance range's graph, which
    also takes one guidance scale per image."""
    inputs = {NOISE: tuple(sample_shape)}
    if conditional:
        inputs[LABELS] = ()
    if guided:
        inputs[GUIDANCE] = ()
    return inputs


def denoiser_inputs(sample_shape, conditional: bool, guided: bool = False) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the exported denoiser's inputs (`guided`: plus one guidance scale per image)."""
    inputs = {DENOISER_X: tuple(sample_shape), DENOISER_SIGMA: ()}
    if conditional:
        inputs[DENOISER_LABELS] = ()
    if guided:
        inputs[GUIDANCE] = ()
    return inputs


@dataclass
class EnginePlan:
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> per-sample shape (no batch axis)
    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
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
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        return {name: tuple((b, *shape) for b in batches) for name, shape in self.inputs.items()}

    def config_kwargs(self) -> dict:
        """Keyword arguments for polygraphy's `CreateConfig` (profiles added by `build_engine`)."""
        kwargs = {"fp16": self.precision == "fp16", "bf16": self.precision == "bf16",
                  "builder_optimization_level": self.builder_optimization_level}
        if self.precision != "fp32" and self.fp32_layers:
            kwargs["precision_constraints"] = "obey"
        if self.timing_cache:
            kwargs["load_timing_cache"] = self.timing_cache
        return kwargs


def fp32_layer_names(model) -> list[str]:
    """Normalisation and pow nodes of an ONNX model (a ModelProto or a path), kept in fp32 under fp16/bf16."""
    if isinstance(model, str):
        import onnx  # compile-time tooling, imported only to build a reduced-precision engine

        model = onnx.load(model, load_external_data=False)
    return _normalization_nodes(model.graph)


def _normalization_nodes(graph) -> list[str]:
    """NORMALIZATION_OPS node names of `graph` and its subgraphs (a loop-form sampler's Loop body)."""
    names = []
    for n in graph.node:
        if n.op_type in NORMALIZATION_OPS:
            names.append(n.name)
        for a in n.attribute:
            names += [name for g in ([a.g] if a.HasField("g") else list(a.graphs)) for name in _normalization_nodes(g)]
    return names


def build_engine(onnx_path: str, plan: EnginePlan, engine_path: str | None = None) -> tuple[bytes, dict]:
    """Build a TensorRT engine (saved to `engine_path` when given); returns its bytes and its TensorRT
    version and GPU compute capability (what the manifest records). EngineUnavailable without TensorRT/GPU."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise EngineUnavailable(reason)
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile,
                                        SetLayerPrecisions)

    profile = Profile()
    for name, (lo, opt, hi) in plan.profile_shapes().items():
        profile.add(name, min=lo, opt=opt, max=hi)
    network = NetworkFromOnnxPath(onnx_path)
    if plan.precision != "fp32" and plan.fp32_layers:
        network = SetLayerPrecisions(network, {name: trt.float32 for name in plan.fp32_layers})
    config = CreateConfig(profiles=[profile], **plan.config_kwargs())
    data = bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=plan.timing_cache)())
    if engine_path is not None:
        from .files import atomic_open

        with atomic_open(engine_path) as f:
            f.write(data)
    return data, {"tensorrt": trt.__version__, "compute_capability": gpu_compute_capability()}
