"""Staging and publishing of outputs (iia-compile's artifact directory, iia-export-triton's model folders).

Work happens in a fresh folder BESIDE the output (same filesystem, so it moves in by rename), named
`.NAME.TAG-HOST-PID-XXXX` after the output, this host and this process; such folders left by dead processes of
this host (SIGKILL, power loss) are removed before new work starts. Publishing moves finished folders into
place: a replaced one is swapped out atomically with renameat2(RENAME_EXCHANGE) where the filesystem allows (no
instant without it), else renamed aside first (beside the finished folder, on its filesystem); Ctrl-C/SIGTERM
are held during the moves, and a failure puts back everything moved so far. Folders this made on the way to
the output (a new `--repo`, missing parents) are removed again when the work fails: a failure leaves nothing new.

Mount points: an output that is itself a mount point (a tmpfs, a Docker volume) is on another filesystem than
its parent, so nothing can be renamed onto it from beside it. An artifact directory (`--out`) is replaced as a
whole, which a mount point cannot be: refused up front, naming the option. A model repository (`--repo`)
CONTAINS the published folders, so its work folder goes inside it, the one place on its filesystem. Triton
does not skip dot-folders in a repository (triton-inference-server/core, LocalFileSystem::GetDirectorySubdirs
lists every subdirectory), so only there, and only while an export runs, a server polling the repository
may log a failed load of `.NAME.building-*`; beside the repository (every other case) it never sees one.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

from iia.cli import pid_alive, signals_deferred
from iia.runtime.contract import public_mode

BUILDING, OLD = "building", "old"  # work in progress; a replaced output on its way out
# a write that failed for lack of room: said as such, naming the output's option and folder
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def work_prefix(out: Path, tag: str = BUILDING) -> str:
    """The name every staging folder of `out` with `tag` starts with: `.NAME.TAG-HOST-` (then PID-XXXX)."""
    return f".{out.name}.{tag}-{socket.gethostname()}-"


def is_mount_point(path: Path) -> bool:
    """Whether the directory `path` is a mount point: another device than its parent (os.path.ismount), or
    listed in /proc/self/mountinfo (a bind mount of the same filesystem, which rename cannot cross either)."""
    if not path.is_dir():
        return False
    if os.path.ismount(path):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    return any(len(fields) > 4 and _unescape(fields[4]) == real for fields in map(str.split, lines))


def _unescape(field: str) -> str:
    """A mountinfo path field as the path: the kernel writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def work_location(out: Path, container: bool) -> Path:
    """Where `out`'s work folders go: beside it, or inside it for a container output that is a mount point."""
    return out if container and is_mount_point(out) else (out.parent if str(out.parent) else Path("."))


def refuse_mount_point(out: Path, flag: str, error: type[Exception]) -> None:
    """An output replaced as a whole (`--out DIR`) must not be a mount point: `error` naming `flag` if it is."""
    if is_mount_point(out):
        raise error(f"{flag} {out} is a mount point (another filesystem than {out.parent}): the output is built "
                    f"beside it and renamed into place, which cannot replace a mount point; give a new directory "
                    f"inside it, e.g. {flag} {out / 'NAME'}")


def clean_stale(out: Path, log: Callable[[str], None] | None = None, parent: Path | None = None) -> list[Path]:
    """Remove this host's staging folders of `out` (any tag) in `parent` (default: beside `out`) whose process
    no longer runs; those of live processes (a concurrent compile) stay. Returns what went."""
    parent = parent or (out.parent if str(out.parent) else Path("."))
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    host = f"-{socket.gethostname()}-"
    for path in parent.glob(glob.escape(f".{out.name}.") + "*"):
        tag, sep, rest = path.name[len(out.name) + 2:].partition(host)
        pid = rest.split("-", 1)[0]
        if (sep and tag in (BUILDING, OLD) and pid.isdigit() and not pid_alive(int(pid)) and path.is_dir()
                and not path.is_symlink()):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            if log:
                log(f"  removed {path} (left by process {pid}, which no longer runs)")
    return removed


def check_parent(out: Path, flag: str, error: type[Exception]) -> None:
    """Before any work: `out`'s parent must be a directory we can write, or its nearest existing ancestor one
    (the missing folders are made by `Staging`); `error` naming `flag` and the real cause otherwise (a path
    component that is a file, a read-only folder)."""
    parent = out.parent if str(out.parent) else Path(".")
    for folder in [parent, *parent.parents]:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                kind = "a file" if folder.is_file() else "a dangling link" if folder.is_symlink() else "not a directory"
                raise error(f"{flag} {out}: {folder} is {kind}, not a directory")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise error(f"{flag} {out}: {folder} is not writable")
            return


def check_directory(path: Path, flag: str, error: type[Exception]) -> Path:
    """An output DIRECTORY before any work: an existing directory, or a new path whose parent can hold one
    (`error` naming `flag` and the cause otherwise: a file, a dangling link); made by `Staging`."""
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        kind = "a file" if path.is_file() else "a dangling link" if path.is_symlink() else "not a directory"
        raise error(f"{flag} {path} is {kind}, not a directory")
    check_parent(path, flag, error)
    return path


def make_folders(path: Path) -> list[Path]:
    """mkdir -p `path`; returns the folders it made, outermost first (to remove again on failure)."""
    missing = [folder for folder in [path, *path.parents] if not (folder.exists() or folder.is_symlink())]
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing[::-1]


def remove_made(folders: list[Path]) -> None:
    """Remove the folders `make_folders` made, innermost first, each only while empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


class Staging:
    """`with Staging(out, flag, error, log, container=False) as work:` a fresh folder beside `out` (stale ones
    cleaned first), removed when the block ends whatever happens (after `publish` it holds at most what was
    replaced). `container`: `out` is a directory that HOLDS the published folders (made here if missing; a
    mount point gets its work folder inside, see the module); else `out` itself is published (a mount point is
    refused). Inside the block a failure to write for lack of room, or to move across filesystems, becomes
    `error` naming `flag`, `out` and the cause, and the folders made on the way to `out` are removed again.
    Its checks of the location run before the folder is made: call it before long work."""

    def __init__(self, out: Path, flag: str, error: type[Exception], log: Callable[[str], None] | None = None,
                 container: bool = False):
        self.out, self.flag, self.error, self.log, self.container = Path(out), flag, error, log, container
        self.work: Path | None = None
        self.where = self.out.parent  # where the work folder goes (set on entry)
        self.made: list[Path] = []

    def __enter__(self) -> Path:
        check_parent(self.out, self.flag, self.error)
        if not self.container:
            refuse_mount_point(self.out, self.flag, self.error)
        try:
            self.made = make_folders(self.out if self.container else self.out.parent)
        except OSError as err:
            raise self.error(f"{self.flag} {self.out}: cannot create {err.filename or self.out} "
                             f"({err.strerror})") from None
        self.where = where = work_location(self.out, self.container)
        clean_stale(self.out, self.log, where)
        try:
            with signals_deferred():  # no Ctrl-C/SIGTERM between creating the folder and owning its cleanup
                self.work = Path(tempfile.mkdtemp(prefix=f"{work_prefix(self.out)}{os.getpid()}-", dir=where))
        except OSError as err:
            remove_made(self.made)
            raise self.error(f"{self.flag} {self.out}: cannot make a work folder in {where} ({err.strerror})") from None
        return self.work

    def __exit__(self, kind, err, tb) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        if err is not None:
            remove_made(self.made)
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            where = f" writing {err.filename}" if err.filename else ""
            raise self.error(f"{self.flag} {self.out}: no room to write the output in {self.where}{where} "
                             f"({err.strerror}); nothing was published") from None
        if isinstance(err, OSError) and err.errno in (errno.EXDEV, errno.EBUSY):  # a mount appeared meanwhile
            raise self.error(f"{self.flag} {self.out}: cannot move the output into place ({err.strerror}: "
                             f"{err.filename}); nothing was published") from None


def publish(moves: list[tuple[Path, Path]], may_replace: Callable[[Path], None], out: Path) -> None:
    """Move each finished folder `src` onto `dst` (see the module); `may_replace(dst)` raises where an existing
    `dst` must stay; a folder renamed aside goes beside `src`, named after `out`. All or nothing: a failure puts
    every `dst` back."""
    for src, _ in moves:
        public_tree(src)
    done: list[tuple[Path, Path, str | Path]] = []
    with signals_deferred():
        try:
            for src, dst in moves:
                done.append((src, dst, _move(src, dst, may_replace, out)))
        except BaseException:
            for src, dst, how in reversed(done):
                _undo(src, dst, how)
            raise
    for src, _, how in done:  # the replaced folders, now out of the way
        if how != MOVED:
            shutil.rmtree(src if how == SWAPPED else how.parent, ignore_errors=True)


def public_tree(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give `folder` and the folders under it the modes a plain mkdir would."""
    public_mode(folder, directory=True)
    for sub in folder.rglob("*"):
        if sub.is_dir() and not sub.is_symlink():
            public_mode(sub, directory=True)


def copy_public(src: Path, dst: Path) -> None:
    """Copy a file into a staging folder with the mode a plain open would give it."""
    shutil.copyfile(src, dst)
    public_mode(dst)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux >= 3.15, glibc >= 2.28, a filesystem
    that supports it); False where unavailable."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


MOVED, SWAPPED = "moved", "swapped"  # how a `publish` move went (else: the Path the old folder went to)


def _move(src: Path, dst: Path, may_replace: Callable[[Path], None], out: Path) -> str | Path:
    """One move of `publish`; returns how it went, for `_undo`."""
    if not (dst.exists() or dst.is_symlink()):
        os.replace(src, dst)
        return MOVED
    may_replace(dst)
    if exchange(src, dst):
        return SWAPPED  # src now holds the old dst
    # aside on src's filesystem (= dst's: beside the output, or inside a mount-point repository)
    holder = Path(tempfile.mkdtemp(prefix=f"{work_prefix(out, OLD)}{os.getpid()}-", dir=src.parent))
    aside = holder / dst.name
    try:
        os.replace(dst, aside)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)  # never an empty .NAME.old-* left behind
        raise
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside, dst)  # put the old one back
        shutil.rmtree(aside.parent, ignore_errors=True)
        raise
    return aside


def _undo(src: Path, dst: Path, how: str | Path) -> None:
    if how == SWAPPED:
        if not exchange(src, dst):
            raise OSError(f"could not swap {dst} back from {src}")
        return
    os.replace(dst, src)
    if how != MOVED:
        os.replace(how, dst)
        shutil.rmtree(how.parent, ignore_errors=True)
