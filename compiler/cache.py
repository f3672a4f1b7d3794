"""The compiler's one cache: calibrated coefficients and exported graphs under ~/.cache/iia (or $IIA_CACHE_DIR).

An entry is a regular file of bounded size plus a sidecar `<entry>.sha256` written after it: a line
"<hex digest> <bytes>", then a JSON line binding the entry to its key: {"key": the entry's file name (the
key's hash), and what it was made from (model sha256, solver or graph, ...)}. An entry is used only if it is a
regular file (never a FIFO, device or link to one: opened non-blocking and bounded,
`iia.runtime.contract.open_regular`), within its bound, with the digest recorded when it was written, recorded
for THIS key (an entry and sidecar copied from another key's are refused), and if it then loads. Anything else is ONE policy for every cache: dropped (entry and
sidecar), named in the log, and remade. Writing is best effort: a read-only or full cache never fails a compile.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from iia.calibration import artifact
from iia.calibration.fit import GUARD_VERSION, CalibrationOptions
from iia.calibration.solvers import DEFINITION_VERSION
from iia.models.base import Denoiser
from iia.runtime.contract import ArtifactError, atomic_open, read_regular, sha256_bytes

T = TypeVar("T")

# The export code's version in every export cache key: bump it whenever export.py (or the weight
# preprocessing it applies) would write a different graph for the same model, max_batch and libraries.
EXPORT_VERSION = 1
SIDECAR = ".sha256"


def default_cache_dir() -> Path:
    return Path(os.environ.get("IIA_CACHE_DIR") or Path.home() / ".cache" / "iia")


def cache_dir(configured: str | None) -> Path:
    """The cache root: `configured` (CompileOptions.cache_dir), else default_cache_dir()."""
    return Path(configured) if configured else default_cache_dir()


SIDECAR_LIMIT = 4096  # bytes of a sidecar: the digest line and the key record


def seal(path: Path, data: bytes | None = None, made_from: dict | None = None) -> None:
    """Record `path`'s digest and size in its sidecar (after the entry itself is in place), with its key (the
    file name) and `made_from` (JSON values: what the key was computed from, named when an entry is refused)."""
    data = read_regular(path, 1 << 40) if data is None else data
    record = json.dumps({"key": path.name, **(made_from or {})}, sort_keys=True, default=str)
    with atomic_open(Path(str(path) + SIDECAR)) as f:
        f.write(f"{sha256_bytes(data)} {len(data)}\n{record}\n".encode())


def _made_from(record: dict) -> str:
    """" (model_sha256 ..., what denoiser)": what a key record says it was made from ("" for nothing)."""
    made = ", ".join(f"{k} {v}" for k, v in sorted(record.items()) if k != "key")
    return f" ({made})" if made else ""


def _verified(path: Path, limit: int) -> bytes:
    """The entry's bytes, if they are what its sidecar recorded for this key (ArtifactError saying why not)."""
    try:
        lines = read_regular(Path(str(path) + SIDECAR), SIDECAR_LIMIT).decode("utf-8").splitlines()
    except FileNotFoundError:
        raise ArtifactError(f"no digest was recorded for it ({path.name}{SIDECAR} is missing)") from None
    except UnicodeDecodeError:
        lines = []
    recorded = lines[0].split() if lines else []
    if len(recorded) != 2 or not recorded[1].isdigit():
        raise ArtifactError(f"its digest record {path.name}{SIDECAR} is malformed")
    try:
        record = json.loads(lines[1]) if len(lines) == 2 else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise ArtifactError(f"its digest record {path.name}{SIDECAR} names no key (written by an older iia, or "
                            f"damaged)")
    if record["key"] != path.name:  # another key's entry and sidecar, copied or renamed here
        raise ArtifactError(f"it was made for another key, {record['key']}{_made_from(record)}, not {path.name}")
    data = read_regular(path, min(limit, int(recorded[1])))  # regular, bounded: never a FIFO or /dev/zero
    if sha256_bytes(data) != recorded[0]:
        raise ArtifactError("its sha256 differs from the one recorded when it was written")
    return data


def _drop(path: Path, log: Callable[[str], None]) -> None:
    """Remove an entry and its sidecar, whatever they are (a link is removed, not followed)."""
    for victim in (path, Path(str(path) + SIDECAR)):
        try:
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim)
            else:
                victim.unlink(missing_ok=True)
        except OSError as err:
            log(f"  could not remove {victim}: {err}")


def get_or_make(path: Path | None, make: Callable[[], T], load: Callable[[bytes, Path], T],
                save: Callable[[T], bytes | None], log: Callable[[str], None], *, limit: int,
                what: str, redo: str, made_from: dict | None = None) -> T:
    """The value cached at `path` (checked as the module says, then `load(bytes, path)`), else `make()`,
    stored as `save(value)` when that gives bytes within `limit` (None: not cacheable), its sidecar recording
    `path.name` as its key and `made_from` (see `seal`). A bad entry is dropped and logged as
    "dropping unusable {what}, {redo}: PATH (why)". `path` None: no caching."""
    if path is None:
        return make()
    if path.exists() or path.is_symlink() or Path(str(path) + SIDECAR).exists():
        try:
            return load(_verified(path, limit), path)
        except Exception as err:  # unreadable, unverified, or refused by its loader: the entry is unusable
            log(f"  dropping unusable {what}, {redo}: {path} ({type(err).__name__}: {err})")
            _drop(path, log)
    value = make()
    data = save(value)
    if data is not None and len(data) <= limit:
        try:
            with atomic_open(path) as f:
                f.write(data)
            seal(path, data, made_from)
        except OSError as err:  # a read-only or full cache must not fail the compile
            log(f"  could not cache {what} at {path}: {err}")
    return value


# ---- keys ----------------------------------------------------------------------------------------------
def coefficients_key(denoiser: Denoiser, solver: str, nfe: int, options: CalibrationOptions,
                     extra: dict | None = None) -> str:
    """Cache file name of a calibration: model identity, solver and its definition version, NFE, the resolved
    calibration options, the guard's version (+ `extra`: the auto search's settings)."""
    ident = artifact.model_identity(denoiser)
    payload = {"model": ident, "solver": solver, "solver_definition": DEFINITION_VERSION, "nfe": nfe,
               "options": vars(options), "guard": GUARD_VERSION}
    if extra:
        payload["extra"] = extra
    text = json.dumps(payload, sort_keys=True)
    return f"{solver}-nfe{nfe}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"


def export_cache_key(denoiser: Denoiser, what: str, max_batch: int) -> str | None:
    """Cache file name of an exported graph ("denoiser" or "decoder"), or None when the model has no content
    hash to key on. The key covers the model identity (weights' sha256, guidance, options), the decode stage
    (its VAE folder's sha256), max_batch, EXPORT_VERSION and the library versions."""
    ident = artifact.model_identity(denoiser)
    if not ident.get("sha256"):
        return None
    stage_module = denoiser.decode_stage() if what == "decoder" else None
    payload = {"what": what, "model": ident, "max_batch": max_batch,
               "decode": None if stage_module is None else stage_module.describe(),
               "export_version": EXPORT_VERSION,
               "versions": {k: v for k, v in artifact.library_versions().items() if k != "tensorrt"}}
    if getattr(stage_module, "kind", None) == "latent" and not payload["decode"].get("vae_sha256"):
        return None
    return f"{what}-{hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]}.onnx"
