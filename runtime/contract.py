"""The artifact contract: the ONE definition that the compiler, the Python runtime, the C++ runtime
(`runtime/native`) and the Triton export all follow.

* graph tensor names (the sampler's interface and the exported denoiser's);
* the artifact's file names and its manifest: schema, version, required fields, how it is written
  (`write_json_atomic`) and read (`read_manifest`), and each listed file's sha256 (`verify_file`);
* `ArtifactError`, the one error type for an artifact a runtime must not use;
* the noise convention (`draw_noise`): EDM's per-image seeds, image k of seed s is reproducible at any batch;
* the CUDA / TensorRT availability probes (CUDA through the driver API: TensorRT's runtime can crash a
  process that has no GPU, so it is never imported before a device is found).

Standard library + numpy only: no torch, no onnx, nothing else of iia.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# ---- graph tensor names ---------------------------------------------------------------------------
NOISE = "noise"  # float32 [B, *sample_shape], standard normal (the graph scales it to sigma_max)
LABELS = "class_labels"  # int64 [B], conditional models only
IMAGES = "images"  # float32 [B, *sample_shape]
IMAGES_U8 = "images_uint8"  # uint8 [B, H, W, C], image models only
# the once-exported denoiser D(x, sigma, class_labels) -> denoised
DENOISER_X, DENOISER_SIGMA, DENOISER_LABELS, DENOISED = "x", "sigma", "class_labels", "denoised"

# ---- files --------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
SAMPLER_ONNX = "sampler.onnx"
SAMPLER_ONNX_DATA = SAMPLER_ONNX + ".data"  # its tensors, when the graph is over protobuf's 2 GB
SAMPLER_PLAN = "sampler.plan"
DENOISER_ONNX = "denoiser.onnx"  # one denoiser call, for the overhead benchmark
COEFFICIENTS = "coefficients.json"
GOLDEN_INPUTS = "golden_inputs.json"
GOLDEN_OUTPUTS = "golden_outputs.json"

# ---- backends (what `load(backend=...)`, iia-sample/iia-bench --backend and iia-run --backend take) ----------
TENSORRT, ORT_CUDA, ORT_CPU = "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"
BACKENDS = (TENSORRT, ORT_CUDA, ORT_CPU)  # "auto" tries them in this order

# ---- manifest -----------------------------------------------------------------------------------
SCHEMA = "iia.artifact"
SCHEMA_VERSION = 1
REQUIRED = ("inputs", "outputs", "files", "sample_shape", "label_dim", "max_batch", "nfe")


class ArtifactError(ValueError):
    """An artifact (or coefficient file) that must not be used: missing, foreign, newer, corrupted."""


def io_spec(sample_shape, label_dim: int, is_image: bool) -> tuple[list[dict], list[dict]]:
    """The manifest's `inputs` and `outputs`: names, dtypes, shapes ("batch" is the dynamic axis)."""
    shape = [int(s) for s in sample_shape]
    inputs = [{"name": NOISE, "dtype": "float32", "shape": ["batch", *shape]}]
    if label_dim > 0:
        inputs.append({"name": LABELS, "dtype": "int64", "shape": ["batch"], "range": [0, label_dim - 1]})
    outputs = [{"name": IMAGES, "dtype": "float32", "shape": ["batch", *shape]}]
    if is_image:
        c, h, w = shape
        outputs.append({"name": IMAGES_U8, "dtype": "uint8", "shape": ["batch", h, w, c]})
    return inputs, outputs


def make_manifest(**fields) -> dict:
    """A manifest dict: schema and version first, then `fields` (which must include every REQUIRED key)."""
    missing = [key for key in REQUIRED if key not in fields]
    if missing:
        raise ValueError(f"manifest lacks required field(s) {', '.join(missing)}")
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **fields}


def artifact_root(path: str | Path) -> Path:
    """The artifact directory for DIR or DIR/manifest.json."""
    path = Path(path)
    if path.name == MANIFEST and path.is_file():
        return path.parent
    return path


def read_manifest(root: str | Path) -> dict:
    """Parse and check DIR/manifest.json: schema, schema version, required fields and their types."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} not found (make one with iia-compile)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{root} is not an iia artifact: it has no {MANIFEST} (make one with iia-compile)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ArtifactError(f"{path} is not an iia artifact manifest (schema {schema!r}, expected {SCHEMA!r})")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path} has an invalid schema_version {version!r} (this runtime reads {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{path} was written by a newer iia: schema version {version}, this runtime reads "
                            f"{SCHEMA_VERSION} (upgrade iia, or recompile the model with this version)")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise ArtifactError(f"{path} lacks required field(s) {', '.join(missing)}")
    try:
        shape = tuple(int(s) for s in data["sample_shape"])
        ok = (all(s > 0 for s in shape) and len(shape) >= 1 and int(data["label_dim"]) >= 0
              and int(data["max_batch"]) >= 1 and int(data["nfe"]) >= 1 and isinstance(data["files"], dict))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ArtifactError(f"{path} is inconsistent: sample_shape, label_dim, max_batch, nfe or files malformed")
    return data


# ---- files: sha256 and atomic writes -------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expected(manifest: dict, name: str) -> dict:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ArtifactError(f"manifest.json lists no sha256 for {name}")
    return entry


def check_digest(root: Path, manifest: dict, name: str, digest: str, size: int) -> None:
    entry = _expected(manifest, name)
    if entry.get("bytes") is not None and entry["bytes"] != size:
        raise ArtifactError(f"{root / name} is corrupted or was modified: {size} bytes, the manifest says "
                            f"{entry['bytes']} (recompile or re-copy the artifact)")
    if digest != entry["sha256"]:
        raise ArtifactError(f"{root / name} is corrupted or was modified: sha256 {digest[:16]}..., the manifest "
                            f"says {entry['sha256'][:16]}... (recompile or re-copy the artifact)")


def verify_file(root: Path, manifest: dict, name: str) -> None:
    path = root / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (listed in manifest.json)")
    check_digest(root, manifest, name, sha256_file(path), path.stat().st_size)


def read_verified(root: Path, manifest: dict, name: str, verify: bool = True) -> bytes:
    """The bytes of a listed file, checked against the manifest: what is checked is what gets loaded."""
    path = root / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (listed in manifest.json)" if name in manifest["files"]
                            else f"{path} is missing")
    data = path.read_bytes()
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
    text = (json.dumps(data, indent=2) + "\n").encode()
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
