"""The artifact contract's NAMES: the ONE definition that the compiler, the Python runtime, the C++ runtime
(`runtime/native`) and the Triton export all follow.

* graph tensor names (the sampler's interface and the exported denoiser's), file names, backend names;
* the manifest's schema and version, and the bounds every reader applies (MAX_*);
* `ArtifactError`, the one error type for an artifact a runtime must not use;
* the program plan (program.json): its schema and checks.

The rest of the contract lives beside it, by concern (re-exported here for existing importers):
`runtime/manifest.py` (the manifest's field table FIELDS, its writer and checker, the strict JSON profile,
listed files read against the manifest), `runtime/files.py` (bounded reads of regular files, containment in
the artifact directory, sha256, atomic writes), `runtime/noise.py` (the noise convention), `runtime/devices.py`
(CUDA / TensorRT probes).

Standard library + numpy only: no torch, no onnx, nothing else of iia.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# ---- graph tensor names ---------------------------------------------------------------------------
NOISE = "noise"  # float32 [B, *sample_shape], standard normal (the graph scales it to sigma_max)
LABELS = "class_labels"  # int64 [B], conditional models only
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
PROGRAM = "program.json"  # the sampler as a per-call plan, for a loop around denoiser.onnx (see read_program)
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
MAX_SEED = 2**62  # the largest first seed a command or server takes: image k uses default_rng(seed + k)
MAX_THREADS = 1024  # ONNX Runtime intra-op threads a load accepts (more would only exhaust the machine)
NO_CUDA = "no CUDA device found (libcuda missing or no GPU)"
# graph metadata (ONNX metadata_props) the compiler stamps on sampler.onnx; load() compares it with the manifest
GRAPH_METADATA = ("iia.nfe", "iia.label_dim", "iia.sample_shape")


class ArtifactError(ValueError):
    """An artifact (or coefficient file) that must not be used: missing, foreign, newer, corrupted."""



# ---- the program plan (program.json) --------------------------------------------------------------
# The unrolled sampler as the flat list of operations the graph was emitted from, so a torch-free loop around
# denoiser.onnx (iia-bench's baseline; any runtime) can run the same sampler with the same coefficients:
#   {"schema": "iia.program", "schema_version": 1, "input": "noise", "output": NAME, "ops": [OP, ...]}
#   OP = {"op": "denoise", "out": NAME, "state": NAME, "sigma": FLOAT}   out = D(values[state]; sigma, labels)
#      | {"op": "combine", "out": NAME, "terms": [[NAME, FLOAT], ...]}  out = sum(w * values[name])
# Values are float32 [B, *sample_shape]; "noise" is the graph's input; ops run in order, each name written once.
PROGRAM_SCHEMA = "iia.program"
PROGRAM_VERSION = 1


def program_plan(ops: list[dict], output: str) -> dict:
    """The program.json document for `ops` (dicts as above) ending in value `output`; checked by check_program."""
    return check_program({"schema": PROGRAM_SCHEMA, "schema_version": PROGRAM_VERSION, "input": NOISE,
                          "output": output, "ops": ops}, PROGRAM)


def check_program(data, where: str) -> dict:
    """`data` if it is a well-formed program plan (every op reads only values defined before it, the output
    is defined), else ArtifactError naming `where` and the first fault."""
    def bad(why: str):
        raise ArtifactError(f"{where} is not a usable program plan: {why}")

    if not isinstance(data, dict) or data.get("schema") != PROGRAM_SCHEMA:
        bad(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, expected {PROGRAM_SCHEMA!r}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= PROGRAM_VERSION:
        bad(f"schema_version {version!r} (this runtime reads {PROGRAM_VERSION})")
    if data.get("input") != NOISE or not isinstance(data.get("ops"), list) or not data["ops"]:
        bad(f"needs input {NOISE!r} and a non-empty list of ops")
    defined = {NOISE}
    for k, op in enumerate(data["ops"]):
        kind = op.get("op") if isinstance(op, dict) else None
        if kind == "denoise":
            reads = [op.get("state")]
            sigma = op.get("sigma")
            if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma < 1e12:
                bad(f"op {k} ({op.get('out')}): sigma must be a finite number > 0")
        elif kind == "combine":
            terms = op.get("terms")
            if not isinstance(terms, list) or not terms or not all(
                    isinstance(t, list) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], (int, float))
                    and not isinstance(t[1], bool) and math.isfinite(t[1]) for t in terms):
                bad(f"op {k} ({op.get('out')}): terms must be a non-empty list of [name, finite weight]")
            reads = [t[0] for t in terms]
        else:
            bad(f"op {k} has kind {kind!r}, expected 'denoise' or 'combine'")
        missing = [name for name in reads if name not in defined]
        if missing:
            bad(f"op {k} ({op.get('out')}) reads {missing[0]!r} before it is defined")
        if not isinstance(op.get("out"), str) or op["out"] in defined:
            bad(f"op {k} writes {op.get('out')!r}, which is not a fresh name")
        defined.add(op["out"])
    if data.get("output") not in defined:
        bad(f"output {data.get('output')!r} is never computed")
    return data


def check_program_nfe(program: dict, manifest: dict, where: str) -> None:
    """The plan must make exactly the manifest's NFE denoiser calls (else its timings would mislead)."""
    calls = sum(op["op"] == "denoise" for op in program["ops"])
    if calls != manifest["nfe"]:
        raise ArtifactError(f"{where} makes {calls} denoiser calls, the manifest's NFE is {manifest['nfe']}")


def read_program(root: Path, manifest: dict, verify: bool = True) -> dict:
    """DIR/program.json, sha256-checked against the manifest and structurally checked (ArtifactError)."""
    if PROGRAM not in manifest["files"]:
        raise ArtifactError(f"{root} has no {PROGRAM} (compiled by an older iia: recompile to get the loop baseline)")
    try:
        data = json.loads(read_verified(root, manifest, PROGRAM, verify))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{root / PROGRAM} is not readable JSON ({err})") from None
    check_program(data, str(root / PROGRAM))
    check_program_nfe(data, manifest, str(root / PROGRAM))
    return data


# ---- the rest of the contract, by concern (imported last: those modules read the names above) -----------------
from .devices import cuda_device_count, gpu_compute_capability, tensorrt_unavailable_reason  # noqa: E402
from .files import (atomic_open, file_kind, open_regular, public_mode, read_regular, sha256_bytes,  # noqa: E402
                    sha256_file, write_json_atomic)
from .manifest import (REQUIRED, artifact_root, check_graph_metadata, check_manifest, graph_metadata,  # noqa: E402
                       io_spec, make_manifest, parse_json, read_manifest, read_verified, verify_all, verify_file)
from .noise import draw_labels, draw_noise  # noqa: E402
