"""The artifact contract's NAMES: the ONE definition that the compiler, the Python runtime, the C++ runtime
(`runtime/native`) and the Triton export all follow.

* graph tensor names (the sampler's interface and the exported denoiser's), file names, backend names;
* the manifest's schema and version, and the bounds every reader applies (MAX_*);
* `ArtifactError`, the one error type for an artifact a runtime must not use.

The rest of the contract lives beside it, by concern (re-exported here for existing importers):
`runtime/program.py` (the program plan, program.json: its ops, strict reader and executor),
`runtime/manifest.py` (the manifest's field table FIELDS, its writer and checker, the strict JSON profile,
listed files read against the manifest), `runtime/files.py` (bounded reads of regular files, containment in
the artifact directory, sha256, atomic writes), `runtime/noise.py` (the noise convention), `runtime/devices.py`
(CUDA / TensorRT probes).

Standard library + numpy only: no torch, no onnx, nothing else of iia.
"""

from __future__ import annotations

# ---- graph tensor names ---------------------------------------------------------------------------
NOISE = "noise"  # float32 [B, *sample_shape], standard normal (the graph scales it to sigma_max)
LABELS = "class_labels"  # int64 [B], conditional models only
GUIDANCE = "guidance"  # float32 [B], one guidance scale per image: artifacts compiled for a range (--guidance LO:HI)
IMAGES = "images"  # float32 [B, *sample_shape]
IMAGES_U8 = "images_uint8"  # uint8 [B, H, W, C], models with a decode stage (image models)
LATENTS = "latents"  # float32 [B, *sample_shape]: latent models output this instead of IMAGES (then decode it)
# the once-exported denoiser D(x, sigma, class_labels) -> denoised
DENOISER_X, DENOISER_SIGMA, DENOISER_LABELS, DENOISED = "x", "sigma", "class_labels", "denoised"
# the once-exported decode stage: samples [B, *sample_shape] -> images_uint8 [B, H, W, C]
DECODER_SAMPLES = "samples"

# the symbolic batch dimension of sampler.onnx's and denoiser.onnx's inputs and outputs
BATCH_AXIS = "batch"

# ---- files --------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
SAMPLER_ONNX = "sampler.onnx"
SAMPLER_ONNX_DATA = SAMPLER_ONNX + ".data"  # its tensors, when the graph is over protobuf's 2 GB
SAMPLER_PLAN = "sampler.plan"
DENOISER_ONNX = "denoiser.onnx"  # one denoiser call, for the overhead benchmark
DECODER_ONNX = "decoder.onnx"  # one call of the model's decode stage (when the graph decodes), for the benchmark
COEFFICIENTS = "coefficients.json"
PROGRAM = "program.json"  # the sampler as a per-call plan, for a loop around denoiser.onnx (runtime/program.py)
GOLDEN_INPUTS = "golden_inputs.json"
GOLDEN_OUTPUTS = "golden_outputs.json"

# ---- backends (what `load(backend=...)`, iia-sample/iia-bench --backend and iia-run --backend take) ----------
TENSORRT, ORT_CUDA, ORT_CPU = "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"
BACKENDS = (TENSORRT, ORT_CUDA, ORT_CPU)  # "auto" tries them in this order

# ---- manifest -----------------------------------------------------------------------------------
SCHEMA = "iia.artifact"
SCHEMA_VERSION = 1
# Optional: "static_batches": [B, ...] (iia-compile --static-batch), batch sizes 1..max_batch for which an ONNX
# Runtime runtime specialises sampler.onnx: a session with the free dimension BATCH_AXIS fixed to B (ONNX
# Runtime's SessionOptions.add_free_dimension_override_by_name / C API AddFreeDimensionOverrideByName), so every
# shape computation folds to a constant when the session is created. Same file, weights stored once. A call
# whose batch is listed runs its specialised session, any other batch the dynamic one (never padded). The
# compiler checks each specialisation against the dynamic graph ("static_parity": {B: max abs difference}).
STATIC_BATCHES = "static_batches"

# ---- bounds every reader applies (the C++ runtime mirrors them) -----------------------------------
# An artifact file must be a regular file (a symlink to one is followed; /dev/zero, a FIFO or a directory is
# refused before reading) of at most its bound: the manifest's "bytes" for a listed file, else these.
MAX_MANIFEST_BYTES = 4 << 20
MAX_COEFFICIENTS_BYTES = 64 << 20
MAX_LISTED_BYTES = 1 << 40  # a listed file's "bytes" above this is absurd
MAX_FILES = 64  # entries of "files"
MAX_TENSORS = 8  # entries of "inputs", of "outputs"
MAX_STATIC_BATCHES = 64  # entries of "static_batches" (the compiler refuses more: iia-compile --static-batch)
MAX_JSON_DEPTH = 64  # containers nested in any JSON file of an artifact (the strict profile: runtime/manifest.py)
MAX_RANK, MAX_DIM, MAX_ELEMENTS = 4, 1 << 16, 1 << 28  # sample_shape: rank, each dimension, their product
MAX_LABEL_DIM = 1 << 20
MAX_BATCH = 1 << 16
MAX_NFE = 10_000
UTF8_BOM = b"\xef\xbb\xbf"
BOM_REFUSED = "it starts with a UTF-8 byte order mark; JSON files of an artifact are plain UTF-8"
MAX_SEED = 2**62  # the largest seed of any image (image k of seed s uses default_rng(s + k)): runtimes, commands, server
MAX_THREADS = 1024  # ONNX Runtime intra-op threads a load accepts (more would only exhaust the machine)
NO_CUDA = "no CUDA device found (libcuda missing or no GPU)"
# graph metadata (ONNX metadata_props) the compiler stamps on sampler.onnx; load() compares it with the manifest
GRAPH_METADATA = ("iia.nfe", "iia.label_dim", "iia.sample_shape")


class ArtifactError(ValueError):
    """An artifact (or coefficient file) that must not be used: missing, foreign, newer, corrupted."""



# ---- the rest of the contract, by concern (imported last: those modules read the names above) -----------------
from .devices import cuda_device_count, gpu_compute_capability, tensorrt_unavailable_reason  # noqa: E402
from .files import (atomic_open, file_kind, is_artifact_dir, open_regular, public_mode, read_regular,  # noqa: E402
                    refuse_inside_artifact, sha256_bytes, sha256_file, write_json_atomic)
from .manifest import (REQUIRED, artifact_root, check_graph_metadata, check_manifest, graph_metadata,  # noqa: E402
                       io_spec, make_manifest, parse_json, read_manifest, read_verified, verify_all, verify_file)
from .noise import draw_labels, draw_noise  # noqa: E402
