"""Reading an artifact directory: the manifest (schema, version, required fields) and the files' sha256.

numpy-free and torch-free: only the standard library.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from iia.files import sha256_file

SCHEMA = "iia.artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("inputs", "outputs", "files", "sample_shape", "label_dim", "max_batch", "nfe")


class ArtifactError(ValueError):
    """An artifact directory that this runtime must not use (missing, foreign, newer, corrupted)."""


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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def write_json_atomic(path: Path, data) -> None:
    """JSON via a temp file + rename: never a half-written file."""
    from iia.files import atomic_open

    with atomic_open(path, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
