"""The artifact contract: the ONE definition that the compiler, the Python runtime, the C++ runtime
(`runtime/native`) and the Triton export all follow.

* graph tensor names (the sampler's interface and the exported denoiser's);
* the artifact's file names and its manifest: schema, version, required fields, how it is written
  (`write_json_atomic`) and read (`read_manifest`), and each listed file's sha256 (`verify_file`);
* `ArtifactError`, the one error type for an artifact a runtime must not use;
* the validation every runtime applies before using an artifact: files read only if regular and bounded
  (`open_regular`, the MAX_* bounds), every manifest field's type and bounds (`check_manifest`), the
  graph metadata the compiler stamps on sampler.onnx and load() compares with the manifest (`GRAPH_METADATA`);
* the noise convention (`draw_noise`): EDM's per-image seeds, image k of seed s is reproducible at any batch;
* the CUDA / TensorRT availability probes (CUDA through the driver API: TensorRT's runtime can crash a
  process that has no GPU, so it is never imported before a device is found).

Standard library + numpy only: no torch, no onnx, nothing else of iia.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

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
REQUIRED = ("inputs", "outputs", "files", "sample_shape", "label_dim", "max_batch", "nfe")
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
MAX_STATIC_BATCHES = 64  # entries of "static_batches" (iia-compile --static-batch refuses more)
MAX_RANK, MAX_DIM, MAX_ELEMENTS = 4, 1 << 16, 1 << 28  # sample_shape: rank, each dimension, their product
MAX_LABEL_DIM = 1 << 20
MAX_BATCH = 1 << 16
MAX_NFE = 10_000
UTF8_BOM = b"\xef\xbb\xbf"
BOM_REFUSED = "it starts with a UTF-8 byte order mark; JSON files of an artifact are plain UTF-8"
MAX_SEED = 2**62  # the largest first seed a command or server takes: image k uses default_rng(seed + k)
MAX_THREADS = 1024  # ONNX Runtime intra-op threads a load accepts (more would only exhaust the machine)
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint8")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# graph metadata (ONNX metadata_props) the compiler stamps on sampler.onnx; load() compares it with the manifest
GRAPH_METADATA = ("iia.nfe", "iia.label_dim", "iia.sample_shape")


class ArtifactError(ValueError):
    """An artifact (or coefficient file) that must not be used: missing, foreign, newer, corrupted."""


def io_spec(sample_shape, label_dim: int, decoded=None, latent: bool = False) -> tuple[list[dict], list[dict]]:
    """The manifest's `inputs` and `outputs`: names, dtypes, shapes ("batch" is the dynamic axis).

    `decoded`: (H, W, C) of the decode stage's uint8 images (None: the graph does not decode); `latent`:
    the float output is LATENTS (a latent model's samples) rather than IMAGES."""
    shape = [int(s) for s in sample_shape]
    inputs = [{"name": NOISE, "dtype": "float32", "shape": ["batch", *shape]}]
    if label_dim > 0:
        inputs.append({"name": LABELS, "dtype": "int64", "shape": ["batch"], "range": [0, label_dim - 1]})
    outputs = [{"name": LATENTS if latent else IMAGES, "dtype": "float32", "shape": ["batch", *shape]}]
    if decoded is not None:
        outputs.append({"name": IMAGES_U8, "dtype": "uint8", "shape": ["batch", *(int(d) for d in decoded)]})
    return inputs, outputs


def make_manifest(**fields) -> dict:
    """A manifest dict: schema and version first, then `fields` (which must include every REQUIRED key)."""
    missing = [key for key in REQUIRED if key not in fields]
    if missing:
        raise ValueError(f"manifest lacks required field(s) {', '.join(missing)}")
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **fields}


def artifact_root(path: str | Path) -> Path:
    """The artifact directory for DIR or DIR/manifest.json (ArtifactError for an empty path: it is no directory,
    though pathlib reads it as '.')."""
    if not str(path):
        raise ArtifactError("the artifact path is empty")
    path = Path(path)
    if path.name == MANIFEST and path.is_file():
        return path.parent
    return path


def read_manifest(root: str | Path) -> dict:
    """Parse and check DIR/manifest.json (a regular file of at most MAX_MANIFEST_BYTES): schema, schema
    version, and every field's type and bounds (`check_manifest`). ArtifactError naming the field otherwise."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} not found (make one with iia-compile)")
    try:
        text = read_regular(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ArtifactError(f"{root} is not an iia artifact: it has no {MANIFEST} (make one with iia-compile)") from None
    data = parse_json(text, path)
    check_manifest(data, path)
    return data


def parse_json(data: bytes, path) -> object:
    """JSON from bytes; ArtifactError naming `path` for bad encoding, bad syntax, absurd nesting or numbers."""
    def no_constant(name):  # NaN/Infinity are not JSON: the C++ runtime's parser refuses them too
        raise ValueError(f"{name} is not a JSON number")

    if data.startswith(UTF8_BOM):  # json refuses it and nlohmann would skip it: one verdict, stated once
        raise ArtifactError(f"{path} is not readable JSON ({BOM_REFUSED})")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, int too long
        raise ArtifactError(f"{path} is not readable JSON ({err})") from None
    except RecursionError:
        raise ArtifactError(f"{path} is not usable JSON (nested too deeply)") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(data: dict, key: str, lo: int, hi: int, where) -> int:
    value = data[key]
    if not _is_int(value) or not lo <= value <= hi:
        raise ArtifactError(f"{where}: field '{key}' must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _short(value) -> str:
    """A value for a one-line message: its repr (a list of at most 8 scalars too), "a dict", "a list of N
    items" for other containers; cut to 40 characters (the C++ runtime's short_repr says the same)."""
    if isinstance(value, dict):
        text = "a dict"
    elif isinstance(value, list):
        scalars = len(value) <= 8 and not any(isinstance(item, (list, dict)) for item in value)
        text = repr(value) if scalars else ""
        if not scalars or len(text) > 40:
            text = f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    else:
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_manifest(data, path="manifest.json") -> None:
    """Every field a runtime reads, checked for type and bounds (ArtifactError naming the field).

    schema / schema_version; sample_shape: 1..MAX_RANK ints in [1, MAX_DIM], product <= MAX_ELEMENTS;
    label_dim in [0, MAX_LABEL_DIM]; max_batch in [1, MAX_BATCH]; nfe in [1, MAX_NFE]; files: 1..MAX_FILES
    plain file names -> {"sha256": 64 lowercase hex, "bytes": int in [0, MAX_LISTED_BYTES] (required)};
    inputs / outputs: lists of {"name": str, "dtype": one of DTYPES, "shape": ["batch", ints...]} with input
    `noise` [batch, *sample_shape] first, `class_labels` [batch] (range [0, label_dim - 1]) iff label_dim > 0,
    output `images`; optional solver (str), model / engine (dicts), sigmas (finite numbers), r (int).
    """
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ArtifactError(f"{path} is not an iia artifact manifest (schema {_short(schema)}, expected {SCHEMA!r})")
    version = data.get("schema_version")
    if not _is_int(version) or version < 1:
        raise ArtifactError(f"{path} has an invalid schema_version: {_short(version)} (this runtime reads {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{path} was written by a newer iia: schema version {version}, this runtime reads "
                            f"{SCHEMA_VERSION} (upgrade iia, or recompile the model with this version)")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise ArtifactError(f"{path} lacks required field(s) {', '.join(missing)}")
    shape = data["sample_shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK
            or not all(_is_int(s) and 1 <= s <= MAX_DIM for s in shape)):
        raise ArtifactError(f"{path}: field 'sample_shape' must be a list of 1..{MAX_RANK} integers in [1, {MAX_DIM}], "
                            f"got {_short(shape)}")
    if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
        raise ArtifactError(f"{path}: field 'sample_shape' {shape} has more than {MAX_ELEMENTS} elements")
    label_dim = _int_field(data, "label_dim", 0, MAX_LABEL_DIM, path)
    _int_field(data, "max_batch", 1, MAX_BATCH, path)
    _int_field(data, "nfe", 1, MAX_NFE, path)
    _check_files(data["files"], path)
    inputs = _check_tensors(data, "inputs", path)
    outputs = _check_tensors(data, "outputs", path)
    want = [NOISE, LABELS] if label_dim > 0 else [NOISE]
    if [t["name"] for t in inputs] != want:
        raise ArtifactError(f"{path}: field 'inputs' names {[t['name'] for t in inputs]}, expected {want} for "
                            f"label_dim {label_dim}")
    if inputs[0]["dtype"] != "float32" or inputs[0]["shape"] != ["batch", *shape]:
        raise ArtifactError(f"{path}: field 'inputs' gives noise {inputs[0]['dtype']} {inputs[0]['shape']}, expected "
                            f"float32 {['batch', *shape]} (sample_shape)")
    if label_dim > 0:
        labels = inputs[1]
        if labels["dtype"] != "int64" or labels["shape"] != ["batch"] or labels.get("range", [0, label_dim - 1]) != [0, label_dim - 1]:
            raise ArtifactError(f"{path}: field 'inputs' gives class_labels {labels['dtype']} {labels['shape']} range "
                                f"{_short(labels.get('range'))}, expected int64 ['batch'] range [0, {label_dim - 1}] (label_dim)")
    names = [t["name"] for t in outputs]
    samples = [n for n in names if n in (IMAGES, LATENTS)]
    if len(samples) != 1 or len(set(names)) != len(names) or (samples[0] == LATENTS and IMAGES_U8 not in names):
        raise ArtifactError(f"{path}: field 'outputs' names {names}: expected '{IMAGES}' once (and '{IMAGES_U8}'), "
                            f"or '{LATENTS}' and '{IMAGES_U8}' (a latent model's samples and their decoded images)")
    for key, kind in (("solver", str), ("model", dict), ("engine", dict)):
        if key in data and data[key] is not None and not isinstance(data[key], kind):
            raise ArtifactError(f"{path}: field '{key}' must be a {kind.__name__}, got {_short(data[key])}")
    if "r" in data:
        _int_field(data, "r", 0, 64, path)
    sigmas = data.get("sigmas")
    if sigmas is not None and (not isinstance(sigmas, list) or len(sigmas) > MAX_NFE + 1 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in sigmas)):
        raise ArtifactError(f"{path}: field 'sigmas' must be a list of finite numbers, got {_short(sigmas)}")
    static = data.get(STATIC_BATCHES, [])
    if not isinstance(static, list) or len(static) > MAX_STATIC_BATCHES or not all(
            _is_int(b) and 1 <= b <= data["max_batch"] for b in static):
        raise ArtifactError(f"{path}: field '{STATIC_BATCHES}' must be a list of batch sizes in 1..max_batch "
                            f"{data['max_batch']}, got {_short(static)}")


def _check_files(files, path) -> None:
    if not isinstance(files, dict) or not 1 <= len(files) <= MAX_FILES:
        raise ArtifactError(f"{path}: field 'files' must map 1..{MAX_FILES} file names to their sha256, got {_short(files)}")
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", "..") or "\\" in name or "\0" in name:
            raise ArtifactError(f"{path}: field 'files' lists a file outside the artifact directory: {_short(name)}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not SHA256_HEX.fullmatch(entry["sha256"]):
            raise ArtifactError(f"{path}: field 'files.{name}.sha256' must be 64 lowercase hex digits")
        size = entry.get("bytes")
        if not _is_int(size) or not 0 <= size <= MAX_LISTED_BYTES:  # required: it bounds every read of the file
            raise ArtifactError(f"{path}: field 'files.{name}.bytes' must be an integer in [0, {MAX_LISTED_BYTES}], "
                                f"got {_short(size)}")


def _check_tensors(data: dict, key: str, path) -> list[dict]:
    tensors = data[key]
    if not isinstance(tensors, list) or not 1 <= len(tensors) <= 8:
        raise ArtifactError(f"{path}: field '{key}' must be a list of 1..8 tensor descriptions, got {_short(tensors)}")
    for i, t in enumerate(tensors):
        where = f"{key}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("dtype") not in DTYPES:
            raise ArtifactError(f"{path}: field '{where}' must be {{name: str, dtype: one of {', '.join(DTYPES)}, "
                                f"shape: [...]}}, got {_short(t)}")
        shape = t.get("shape")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK + 1 or shape[0] != "batch"
                or not all(_is_int(s) and 1 <= s <= MAX_DIM for s in shape[1:])):
            raise ArtifactError(f"{path}: field '{where}.shape' must be ['batch', dimensions...], got {_short(shape)}")
    return tensors


def graph_metadata(manifest: dict) -> dict[str, str]:
    """The ONNX metadata_props the compiler stamps on sampler.onnx (GRAPH_METADATA keys), from the manifest's
    values: load() compares the graph's with the manifest's, so an edited manifest cannot describe another graph."""
    return {"iia.nfe": str(int(manifest["nfe"])), "iia.label_dim": str(int(manifest["label_dim"])),
            "iia.sample_shape": ",".join(str(int(s)) for s in manifest["sample_shape"])}


def check_graph_metadata(found: dict, manifest: dict, where) -> None:
    """ArtifactError unless the graph's metadata (GRAPH_METADATA keys) equals what the manifest says."""
    want = graph_metadata(manifest)
    if not any(key in found for key in want):
        raise ArtifactError(f"{where} records no iia graph metadata ({', '.join(GRAPH_METADATA)}): it was compiled by "
                            f"an older iia or by another tool; recompile it with iia-compile")
    for key, value in want.items():
        if found.get(key) != value:
            field = key.split(".", 1)[1]
            raise ArtifactError(f"{where} was compiled with {field} {found.get(key, '(not recorded)')}, but manifest.json "
                                f"says {value} (the manifest was edited, or belongs to another graph)")


# ---- files: sha256 and atomic writes -------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message ("a FIFO", "a character device", ...), from its st_mode."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


@contextmanager
def open_regular(path: str | Path, limit: int):
    """Open `path` for reading if it is a regular file of at most `limit` bytes (symlinks are followed, so a
    symlink to /dev/zero is refused); opened non-blocking so that a FIFO cannot hang the reader.
    FileNotFoundError if absent; ArtifactError for a device, FIFO, directory or a larger file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as err:  # a symlink loop, no permission...: the artifact cannot be used (the C++ runtime says the same)
        raise ArtifactError(str(err)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path} is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise ArtifactError(f"{path} is {st.st_size} bytes, more than the {limit} allowed")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see open_regular); a file that grows past the
    limit while being read is refused too."""
    blocks, total = [], 0
    with open_regular(path, limit) as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # in blocks: never one allocation of `limit` bytes
            total += len(block)
            if total > limit:
                raise ArtifactError(f"{path} is more than the {limit} bytes allowed")
            blocks.append(block)
    return b"".join(blocks)


def sha256_file(path: str | Path, limit: int = MAX_LISTED_BYTES) -> str:
    """Hex sha256 of a regular file of at most `limit` bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path, limit) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expected(manifest: dict, name: str) -> dict:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ArtifactError(f"manifest.json lists no sha256 for {name}")
    return entry


def _limit(manifest: dict, name: str) -> int:
    """The listed file's byte size, which bounds every read of it (required: the compiler always writes it)."""
    entry = manifest["files"].get(name)
    size = entry.get("bytes") if isinstance(entry, dict) else None
    if not (_is_int(size) and 0 <= size <= MAX_LISTED_BYTES):
        raise ArtifactError(f"manifest.json field files.{name}.bytes must be the file's size in bytes "
                            f"(an integer in [0, {MAX_LISTED_BYTES}]), got {size!r}")
    return size


def check_digest(root: Path, manifest: dict, name: str, digest: str, size: int) -> None:
    entry = _expected(manifest, name)
    if entry.get("bytes") is not None and entry["bytes"] != size:
        raise ArtifactError(f"{root / name} is corrupted or was modified: {size} bytes, the manifest says "
                            f"{entry['bytes']} (recompile or re-copy the artifact)")
    if digest != entry["sha256"]:
        raise ArtifactError(f"{root / name} is corrupted or was modified: sha256 {digest[:16]}..., the manifest "
                            f"says {entry['sha256'][:16]}... (recompile or re-copy the artifact)")


def _missing(root: Path, manifest: dict, name: str) -> ArtifactError:
    return ArtifactError(f"{root / name} is missing (listed in manifest.json)" if name in manifest["files"]
                         else f"{root / name} is missing")


def verify_file(root: Path, manifest: dict, name: str) -> None:
    path = root / name
    try:
        digest = sha256_file(path, _limit(manifest, name))
        size = path.stat().st_size
    except FileNotFoundError:
        raise _missing(root, manifest, name) from None
    except ArtifactError as err:
        raise ArtifactError(f"{err} (listed in manifest.json with {_limit(manifest, name)} bytes)") from None
    check_digest(root, manifest, name, digest, size)


def read_verified(root: Path, manifest: dict, name: str, verify: bool = True) -> bytes:
    """The bytes of a listed file, checked against the manifest: what is checked is what gets loaded.
    Only a regular file of at most the manifest's "bytes" is read."""
    path = root / name
    try:
        data = read_regular(path, _limit(manifest, name))
    except FileNotFoundError:
        raise _missing(root, manifest, name) from None
    except ArtifactError as err:
        raise ArtifactError(f"{err} (listed in manifest.json with {_limit(manifest, name)} bytes)") from None
    if verify:
        check_digest(root, manifest, name, sha256_bytes(data), len(data))
    return data


def verify_all(root: Path, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists (except `skip`, verified while being read)."""
    for name in manifest["files"]:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"manifest.json lists a file outside the artifact directory: {name!r}")
        if name not in skip:
            verify_file(root, manifest, name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the modes a plain open/mkdir would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Open a temp file for writing; on success it replaces `path`, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        public_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data) -> str:
    """JSON via a temp file + rename (never a half-written file); returns the sha256 of the bytes written."""
    text = (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()  # strict JSON: NaN is no number
    with atomic_open(path) as f:
        f.write(text)
    return sha256_bytes(text)


# ---- the noise convention ------------------------------------------------------------------------
def draw_noise(seed: int | None, batch_size: int, shape) -> np.ndarray:
    """Standard-normal float32 noise [batch_size, *shape]: image k is drawn from its own generator
    `numpy.random.default_rng(seed + k)` (EDM generate.py's per-image seeds), so image k of seed s equals
    image 0 of seed s + k and does not depend on the batch size. seed None draws fresh entropy.

    Raises ValueError for a negative seed or batch_size < 0.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    shape = tuple(int(s) for s in shape)
    out = np.empty((batch_size, *shape), dtype=np.float32)
    for k in range(batch_size):
        out[k] = np.random.default_rng(seed + k).standard_normal(shape, dtype=np.float32)
    return out


def draw_labels(seed: int, batch_size: int, label_dim: int) -> np.ndarray:
    """The default class ids int64 [batch_size] when none are given: image k of seed s gets (s + k) mod
    label_dim. Balanced over any label_dim consecutive images and, like the noise, fixed per image whatever
    the batch; every tool that draws labels for a seed (iia-sample, iia-bench, calibration, the parity check,
    iia-quality) uses this."""
    if batch_size < 0 or label_dim < 1:
        raise ValueError(f"need batch_size >= 0 and label_dim >= 1, got {batch_size} and {label_dim}")
    return ((np.uint64(seed) + np.arange(batch_size, dtype=np.uint64)) % np.uint64(label_dim)).astype(np.int64)


# ---- CUDA / TensorRT probes ---------------------------------------------------------------------
NO_CUDA = "no CUDA device found (libcuda missing or no GPU)"


def _cuda_driver():
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib if lib.cuInit(0) == 0 else None
    return None


def cuda_device_count() -> int:
    lib = _cuda_driver()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def gpu_compute_capability(device: int = 0) -> str | None:
    lib = _cuda_driver()
    if lib is None:
        return None
    major, minor, dev = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    return f"{major.value}.{minor.value}"


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can be used here (a CUDA device, then an importable tensorrt), else one line why."""
    if cuda_device_count() == 0:
        return NO_CUDA
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # ImportError, or a stub package that fails on import
        return f"tensorrt is not importable ({type(err).__name__}: {err})"
    return None
