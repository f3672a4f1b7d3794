"""Artifact files on disk: bounded reads of regular files only, containment in the artifact directory, sha256,
atomic writes with the permissions a plain open would give, and what an artifact directory is (outputs are
refused inside one: `refuse_inside_artifact`).

Standard library only (the bounds and ArtifactError are the contract's). The C++ runtime applies the same rules
(runtime/native/src/artifact.cpp: RegularFile, inside_root).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .contract import MANIFEST, MAX_LISTED_BYTES, MAX_MANIFEST_BYTES, SCHEMA, ArtifactError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message ("a FIFO", "a character device", ...), from its st_mode."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def contained(root: str | Path, name: str) -> Path:
    """The real path of `root`/`name` when it resolves (links followed) to an existing entry inside the real
    `root`; else ArtifactError naming the listed path only. A link is followed only to an existing entry inside
    `root`: one that leads outside or to nothing (dangling, a loop, no permission) gets ONE message, checked before
    anything is opened, so nothing about what lies outside (its content, size, digest or existence) shows.
    FileNotFoundError when there is no entry `root`/`name` at all. Reading the returned path with
    `open_regular(..., follow=False)` cannot be redirected by a link swapped in afterwards at the last component.
    The C++ runtime applies the same rule (runtime/native/src/artifact.cpp contained)."""
    path = os.path.join(root, name)
    try:  # absent: FileNotFoundError (nothing to read)
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ArtifactError(str(err)) from None
    outside = ArtifactError(f"{Path(root) / name} leads outside the artifact directory or to no file (a link is "
                            f"followed only to a file inside it)")
    if stat.S_ISLNK(st.st_mode):
        try:
            os.stat(path)
        except OSError:  # what is (not) at the far end of a link is not reported
            raise outside from None
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise outside
    return Path(real)


@contextmanager
def open_regular(path: str | Path, limit: int, follow: bool = True, shown=None):
    """Open `path` for reading if it is a regular file of at most `limit` bytes (symlinks are followed unless
    `follow` is False, so a symlink to /dev/zero is refused); opened non-blocking so that a FIFO cannot hang the
    reader. FileNotFoundError if absent; ArtifactError for a device, FIFO, directory or a larger file, naming
    `shown` (default `path`)."""
    shown = path if shown is None else shown
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags if follow else flags | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as err:  # a symlink loop, no permission...: the artifact cannot be used (the C++ runtime says the same)
        raise ArtifactError(str(OSError(err.errno, err.strerror, str(shown)))) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{shown} is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise ArtifactError(f"{shown} is {st.st_size} bytes, more than the {limit} allowed")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_regular(path: str | Path, limit: int, follow: bool = True, shown=None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see open_regular); a file that grows past the
    limit while being read is refused too."""
    blocks, total = [], 0
    with open_regular(path, limit, follow, shown) as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # in blocks: never one allocation of `limit` bytes
            total += len(block)
            if total > limit:
                raise ArtifactError(f"{path if shown is None else shown} is more than the {limit} bytes allowed")
            blocks.append(block)
    return b"".join(blocks)


def sha256_file(path: str | Path, limit: int = MAX_LISTED_BYTES, follow: bool = True, shown=None) -> str:
    """Hex sha256 of a regular file of at most `limit` bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path, limit, follow, shown) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def is_artifact_dir(path: Path) -> bool:
    """True for a directory holding an iia artifact manifest (its schema field; a regular file, not a link), or an
    empty directory."""
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        if not any(path.iterdir()):
            return True
        if (path / MANIFEST).is_symlink():  # ours are plain files; a link (maybe outside) is not followed
            return False
        with open_regular(path / MANIFEST, MAX_MANIFEST_BYTES) as f:
            data = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError, ArtifactError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def refuse_inside_artifact(path: str | Path, flag: str, error: type[Exception] = ValueError,
                           directory: bool = False) -> None:
    """`error` naming `flag` when `path` (through links and '..') lies inside an existing iia artifact (or, for an
    output `directory` that will hold files, is one): the runtimes verify an artifact's files, and one nested in
    it is a stray file there (or, as DIR/manifest.json, destroys it). Every output option of every command is
    checked with it before any work."""
    path = Path(path)
    resolved = path.resolve()
    places = [resolved, *resolved.parents] if directory else resolved.parents
    inside = next((a for a in places if (a / MANIFEST).is_file() and is_artifact_dir(a)), None)
    if inside is not None:
        raise error(f"{flag} {path}: is inside the iia artifact {inside}; choose a path outside it")
