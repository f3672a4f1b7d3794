"""Triton model configs for `iia-export-triton` (compiler/triton.py): built as `tritonclient` `ModelConfig`
protobufs from an artifact's manifest, written as text, parsed back and checked against the manifest.

`standard_config` (tensorrt_plan / onnxruntime_onnx: the graph's own inputs and outputs), `python_config` (the
python-backend model: `noise` OR a `seed` per image), `check_config` (names, dtypes, dims after the batch axis,
max_batch_size), `parse_config` / `config_text` / `config_summary`; the export's options (`TritonOptions`) and
error (`TritonExportError`). A [B] tensor in the graph is dims [1] with `reshape { shape: [] }` on the wire.
torch-free: the standard library, tritonclient[grpc] (its protobuf definitions) and iia.runtime.contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iia.cli import option
from iia.runtime.contract import GUIDANCE, MAX_THREADS, NOISE

BACKENDS = ("tensorrt", "onnxruntime", "python")
KINDS = ("gpu", "cpu")
# manifest dtype -> Triton DataType name (model_config.proto)
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
SEED = "seed"  # python backend only: int64 [B, 1], one seed per image (iia.runtime.draw_noise's convention)


class TritonExportError(ValueError):
    """An export that cannot be done as asked; the message names the option or file."""


@dataclass
class TritonOptions:
    """`iia-export-triton` settings, each declared once with its flag and bounds (see iia.cli.option).
    `backends` None: tensorrt (when the artifact has a plan and kind is gpu), onnxruntime and python."""

    name: str | None = option(None, "model name prefix (default: the artifact directory's name); models are "
                                    "NAME_tensorrt, NAME_onnxruntime, NAME_python")
    version: int = option(1, "model version directory", lo=1, hi=2**31 - 1)
    instances: int = option(1, "instance_group count", lo=1, hi=1024)
    max_queue_delay_us: int = option(1000, "dynamic batching: longest wait to form a batch, microseconds",
                                     lo=0, hi=10**8)
    preferred_batch: list = option([], "dynamic batching: preferred batch sizes, e.g. 4,8", cli=False)
    kind: str = option("gpu", "instance kind", choices=KINDS)
    backends: list | None = option(None, "comma-separated subset of " + ",".join(BACKENDS), cli=False)
    threads: int | None = option(None, "ONNX Runtime intra-op threads per instance (onnxruntime_onnx: "
                                       "intra_op_thread_count; python: iia.runtime.load(threads=)); default: "
                                       "ONNX Runtime's, one per core", lo=1, hi=MAX_THREADS)
    force: bool = option(False, "replace models of the same name in the repository")


def _model_config_pb2():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise ImportError(f"iia-export-triton needs tritonclient's protobuf definitions ({err}); "
                          f"pip install 'tritonclient[grpc]' (or iia[triton])") from None
    return model_config_pb2, text_format


# ---- configs --------------------------------------------------------------------------------------------
def _dims(entry: dict) -> list[int]:
    """An input/output's dims without the leading batch axis (the manifest writes it as "batch")."""
    shape = list(entry["shape"])
    if not shape or shape[0] != "batch" or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise TritonExportError(f"manifest.json: {entry['name']} has shape {shape}; expected ['batch', d1, ...] "
                                f"with fixed positive dims")
    return shape[1:]


def _triton_dtype(entry: dict) -> str:
    try:
        return TRITON_DTYPES[entry["dtype"]]
    except KeyError:
        raise TritonExportError(f"manifest.json: {entry['name']} has dtype {entry['dtype']!r}, which this exporter "
                                f"does not map to a Triton type ({', '.join(TRITON_DTYPES)})") from None


def _add_tensor(pb2, repeated, entry: dict, optional: bool = False) -> None:
    """One ModelInput/ModelOutput; a [B] tensor becomes dims [1] + reshape [] (Triton's way for per-item scalars)."""
    tensor = repeated.add()
    tensor.name = entry["name"]
    tensor.data_type = pb2.DataType.Value(_triton_dtype(entry))
    dims = _dims(entry)
    if dims:
        tensor.dims.extend(dims)
    else:
        tensor.dims.append(1)
        tensor.reshape.SetInParent()  # reshape { } : shape [] inside the model
    if optional:
        tensor.optional = True


def _common(pb2, config, manifest: dict, opts: TritonOptions, kind: str) -> None:
    config.max_batch_size = int(manifest["max_batch"])
    batching = config.dynamic_batching
    batching.SetInParent()
    batching.max_queue_delay_microseconds = int(opts.max_queue_delay_us)
    batching.preferred_batch_size.extend(sorted(int(b) for b in opts.preferred_batch))  # order carries no meaning
    group = config.instance_group.add()
    group.count = int(opts.instances)
    group.kind = pb2.ModelInstanceGroup.Kind.Value("KIND_GPU" if kind == "gpu" else "KIND_CPU")
    config.version_policy.specific.versions.append(int(opts.version))


def standard_config(manifest: dict, name: str, backend: str, opts: TritonOptions, plans: dict[str, str] | None = None):
    """ModelConfig for `tensorrt_plan` or `onnxruntime_onnx`: the graph's own inputs and outputs.

    plans: {compute capability: file name} when several TensorRT plans are given (cc_model_filenames)."""
    pb2, _ = _model_config_pb2()
    config = pb2.ModelConfig()
    config.name = name
    config.platform = "tensorrt_plan" if backend == "tensorrt" else "onnxruntime_onnx"
    if plans and len(plans) > 1:
        for cc, filename in plans.items():
            config.cc_model_filenames[cc] = filename
    for entry in manifest["inputs"]:
        _add_tensor(pb2, config.input, entry)
    for entry in manifest["outputs"]:
        _add_tensor(pb2, config.output, entry)
    _common(pb2, config, manifest, opts, opts.kind)
    if backend == "onnxruntime" and opts.threads:
        config.parameters["intra_op_thread_count"].string_value = str(opts.threads)  # Triton's ORT backend
    return config


def python_config(manifest: dict, name: str, opts: TritonOptions):
    """ModelConfig for the python-backend model: `noise` OR `seed` per request, plus the graph's labels/outputs."""
    pb2, _ = _model_config_pb2()
    config = pb2.ModelConfig()
    config.name = name
    config.backend = "python"
    for entry in manifest["inputs"]:
        # noise (or seed) and guidance (absent: the manifest's default scale) may be left out of a request
        _add_tensor(pb2, config.input, entry, optional=entry["name"] in (NOISE, GUIDANCE))
    _add_tensor(pb2, config.input, {"name": SEED, "dtype": "int64", "shape": ["batch", 1]}, optional=True)
    for entry in manifest["outputs"]:
        _add_tensor(pb2, config.output, entry)
    _common(pb2, config, manifest, opts, opts.kind)
    config.parameters["artifact"].string_value = "artifact"
    if opts.threads:
        config.parameters["threads"].string_value = str(opts.threads)  # iia.runtime.load(threads=)
    return config


def config_text(config) -> str:
    _, text_format = _model_config_pb2()
    return text_format.MessageToString(config)


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse a config.pbtxt with tritonclient's ModelConfig (field names, enum values, syntax)."""
    pb2, text_format = _model_config_pb2()
    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise TritonExportError(f"{where} does not parse as a Triton ModelConfig: {err}") from None
    return config


def check_config(config, manifest: dict, where: str = "config.pbtxt") -> None:
    """Raise TritonExportError unless a parsed config serves the manifest's graph interface exactly."""
    pb2, _ = _model_config_pb2()
    problems = []
    if config.max_batch_size != int(manifest["max_batch"]):
        problems.append(f"max_batch_size {config.max_batch_size} != the artifact's max_batch {manifest['max_batch']}")

    def check(kind: str, got, expected: list[dict]) -> None:
        got_by_name = {t.name: t for t in got}
        extra = set(got_by_name) - {e["name"] for e in expected} - ({SEED} if kind == "input" and
                                                                   config.backend == "python" else set())
        if extra:
            problems.append(f"{kind}(s) {sorted(extra)} are not in the manifest")
        for entry in expected:
            tensor = got_by_name.get(entry["name"])
            if tensor is None:
                problems.append(f"{kind} {entry['name']} is missing")
                continue
            dims, want = list(tensor.dims), _dims(entry)
            model_dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else dims
            if model_dims != want or (not want and dims != [1]):
                problems.append(f"{kind} {entry['name']} has dims {dims} (model side {model_dims}); the manifest "
                                f"says {want} after the batch axis")
            if pb2.DataType.Name(tensor.data_type) != _triton_dtype(entry):
                problems.append(f"{kind} {entry['name']} has {pb2.DataType.Name(tensor.data_type)}; the manifest "
                                f"says {entry['dtype']}")

    check("input", config.input, manifest["inputs"])
    check("output", config.output, manifest["outputs"])
    if config.backend == "python" and SEED in {t.name for t in config.input}:
        seed = next(t for t in config.input if t.name == SEED)
        if list(seed.dims) != [1] or pb2.DataType.Name(seed.data_type) != "TYPE_INT64" or not seed.optional:
            problems.append("input seed must be an optional TYPE_INT64 with dims [1]")
    if problems:
        raise TritonExportError(f"{where} does not match the artifact: " + "; ".join(problems))


def config_summary(path: Path) -> str:
    config = parse_config(path.read_text(), str(path))
    kind = config.platform or f"backend {config.backend}"
    ins = ", ".join(f"{t.name}{list(t.dims)}" for t in config.input)
    outs = ", ".join(f"{t.name}{list(t.dims)}" for t in config.output)
    return f"{kind}, max_batch_size {config.max_batch_size}, inputs {ins} -> {outs}"
