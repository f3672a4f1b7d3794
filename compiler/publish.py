"""Staging and publishing of outputs (iia-compile's artifact directory, iia-export-triton's model folders).

Work happens in a fresh folder BESIDE the output (same filesystem, so it moves in by rename; never inside
it, where Triton would take it for a model), named `.NAME.TAG-HOST-PID-XXXX` after the output, this host and
this process; such folders left by dead processes of this host (SIGKILL, power loss) are removed before
new work starts. Publishing moves finished folders into place: a replaced one is swapped out atomically with
renameat2(RENAME_EXCHANGE) where the filesystem allows (no instant without it), else renamed aside first;
Ctrl-C/SIGTERM are held during the moves, and a failure puts back everything moved so far.
"""

from __future__ import annotations

import errno
import glob
import os
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


def clean_stale(out: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove this host's staging folders of `out` (any tag) whose process no longer runs; those of live
    processes (a concurrent compile) stay. Returns what went."""
    parent = out.parent if str(out.parent) else Path(".")
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
    """Before any work: `out`'s parent must be (or become) a directory we can write; `error` naming `flag`
    and the real cause otherwise (a path component that is a file, a read-only folder)."""
    parent = out.parent if str(out.parent) else Path(".")
    for folder in [parent, *parent.parents]:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                kind = "a file" if folder.is_file() else "a dangling link" if folder.is_symlink() else "not a directory"
                raise error(f"{flag} {out}: {folder} is {kind}, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(f"{flag} {out}: cannot create {parent} ({err.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{flag} {out}: {parent} is not writable")


def check_directory(path: Path, flag: str, error: type[Exception]) -> Path:
    """An output DIRECTORY before any work: an existing directory, or a new path whose parent can hold one
    (`error` naming `flag` and the cause otherwise: a file, a dangling link); created here."""
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        kind = "a file" if path.is_file() else "a dangling link" if path.is_symlink() else "not a directory"
        raise error(f"{flag} {path} is {kind}, not a directory")
    check_parent(path, flag, error)
    try:
        path.mkdir(exist_ok=True)
    except OSError as err:
        raise error(f"{flag} {path}: cannot create it ({err.strerror})") from None
    return path


class Staging:
    """`with Staging(out, flag, error, log) as work:` a fresh folder beside `out` (stale ones cleaned first),
    removed when the block ends whatever happens (after `publish` it holds at most what was replaced). Inside
    it a failure to write for lack of room becomes `error` naming `flag`, `out` and the cause. Its checks of
    the location run before the folder is made: call it before long work."""

    def __init__(self, out: Path, flag: str, error: type[Exception], log: Callable[[str], None] | None = None):
        self.out, self.flag, self.error, self.log = Path(out), flag, error, log
        self.work: Path | None = None

    def __enter__(self) -> Path:
        check_parent(self.out, self.flag, self.error)
        clean_stale(self.out, self.log)
        try:
            with signals_deferred():  # no Ctrl-C/SIGTERM between creating the folder and owning its cleanup
                self.work = Path(tempfile.mkdtemp(prefix=f"{work_prefix(self.out)}{os.getpid()}-",
                                                  dir=self.out.parent))
        except OSError as err:
            raise self.error(f"{self.flag} {self.out}: cannot make a work folder beside it in {self.out.parent} "
                             f"({err.strerror})") from None
        return self.work

    def __exit__(self, kind, err, tb) -> None:
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            where = f" writing {err.filename}" if err.filename else ""
            raise self.error(f"{self.flag} {self.out}: no room to write the output in {self.out.parent}{where} "
                             f"({err.strerror}); nothing was published") from None


def publish(moves: list[tuple[Path, Path]], may_replace: Callable[[Path], None], out: Path) -> None:
    """Move each finished folder `src` onto `dst` (see the module); `may_replace(dst)` raises where an existing
    `dst` must stay; a folder renamed aside goes beside `out`. All or nothing: a failure puts every `dst` back."""
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
    aside = Path(tempfile.mkdtemp(prefix=f"{work_prefix(out, OLD)}{os.getpid()}-", dir=out.parent)) / dst.name
    os.replace(dst, aside)
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
