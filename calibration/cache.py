"""The one cache: calibrated coefficients, exported graphs and reference solutions under ~/.cache/iia (or
$IIA_CACHE_DIR). The mechanism lives here, at the calibration layer, so that calibration caches its reference
solutions through it; the compiler's keys are in `iia.compiler.cache`.

An entry is a regular file of bounded size plus a sidecar `<entry>.sha256` written after it: a line
"<hex digest> <bytes>", then a JSON line binding the entry to its key: {"key": the entry's file name (the
key's hash), and what it was made from (model sha256, solver or graph, ...)}. An entry is used only if it is a
regular file (never a FIFO, device or link to one: opened non-blocking and bounded,
`iia.runtime.contract.open_regular`), within its bound, with the digest recorded when it was written, recorded
for THIS key (an entry and sidecar copied from another key's are refused), and if it then loads. Anything else is ONE policy for every cache: dropped (entry and
sidecar), named in the log, and remade. Writing is best effort: a read-only or full cache never fails a compile.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from iia.cli import cached
from iia.runtime.contract import ArtifactError, atomic_open, read_regular, sha256_bytes

T = TypeVar("T")

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


class Outdated(Exception):
    """Raised by a `lookup` loader for a sound entry that this run should not reuse (e.g. a search made on a busy
    machine, looked up on an idle one): replaced, and said so, not called unusable."""


def lookup(path: Path, load: Callable[[bytes, Path], T], log: Callable[[str], None], *, limit: int, what: str,
           redo: str | None) -> T | None:
    """The value cached at `path` (checked as the module says, then `load(bytes, path)`), or None when there is
    none; a bad entry is dropped and logged as "dropping unusable {what}, {redo}: PATH (why)" ("dropped unusable
    {what}: PATH (why)" when `redo` is None), an `Outdated` one as "replacing {what}, {redo}: PATH (why)"."""
    if path.exists() or path.is_symlink() or Path(str(path) + SIDECAR).exists():
        try:
            return load(_verified(path, limit), path)
        except Outdated as err:
            log(f"  replacing {what}, {redo or 'not reused'}: {path} ({err})")
            _drop(path, log)
        except Exception as err:  # unreadable, unverified, or refused by its loader: the entry is unusable
            # redo None: the caller says later whether it remade the value (it may not need it any more)
            log(f"  dropping unusable {what}, {redo}: {path} ({type(err).__name__}: {err})" if redo else
                f"  dropped unusable {what}: {path} ({type(err).__name__}: {err})")
            _drop(path, log)
    return None


def store(path: Path, data: bytes | None, log: Callable[[str], None], *, limit: int, what: str,
          made_from: dict | None = None) -> None:
    """Cache `data` at `path` when it is bytes within `limit` (None: not cacheable), its sidecar recording
    `path.name` as its key and `made_from` (see `seal`); best effort (a read-only or full cache is logged)."""
    if data is not None and len(data) <= limit:
        try:
            with atomic_open(path) as f:
                f.write(data)
            seal(path, data, made_from)
            cached(path)
        except OSError as err:  # a read-only or full cache must not fail the compile
            log(f"  could not cache {what} at {path}: {err}")


def get_or_make(path: Path | None, make: Callable[[], T], load: Callable[[bytes, Path], T],
                save: Callable[[T], bytes | None], log: Callable[[str], None], *, limit: int,
                what: str, redo: str, made_from: dict | None = None) -> T:
    """The value cached at `path` (`lookup`), else `make()`, stored as `save(value)` (`store`). `path` None: no
    caching."""
    if path is None:
        return make()
    value = lookup(path, load, log, limit=limit, what=what, redo=redo)
    if value is not None:
        return value
    value = make()
    store(path, save(value), log, limit=limit, what=what, made_from=made_from)
    return value
