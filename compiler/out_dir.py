"""The artifact directory `iia-compile --out` names: checked before any work (`check_out_dir`: a new path, or
with --force an existing iia artifact) and the finished work folder moved there (`publish_artifact`, through
`compiler/publish.py`)."""

from __future__ import annotations

from pathlib import Path

from iia.runtime.contract import MANIFEST, SCHEMA, is_artifact_dir, refuse_inside_artifact

from .options import CompileError
from .publish import check_directory, publish, refuse_mount_point


def check_container_dir(raw: str | Path, flag: str, error: type[Exception]) -> Path:
    """A directory that will HOLD new folders (iia-export-triton's --repo), before any work: named ('' would be
    the working directory, '-' standard output), `publish.check_directory`'s checks, not inside an artifact, not
    an artifact itself and not holding one (Triton would take it for a model and refuse to start)."""
    if str(raw).strip() in ("", "-"):
        raise error(f"{flag} {str(raw)!r}: name a directory")
    path = check_directory(Path(raw), flag, error)
    refuse_inside_artifact(path, flag, error)
    if _holds_manifest(path):
        raise error(f"{flag} {path}: is an iia artifact; name a model repository of its own (outside the artifact)")
    nested = [child for child in sorted(path.iterdir()) if _holds_manifest(child)] if path.is_dir() else []
    if nested:
        raise error(f"{flag} {path}: holds the iia artifact {nested[0]}, which Triton would take for a model; "
                    f"export into a repository of its own")
    return path


def _holds_manifest(path: Path) -> bool:
    return (path / MANIFEST).is_file() and is_artifact_dir(path)


def check_out_dir(out: Path, force: bool) -> None:
    """Before any work: `out` must be a new path, or (with --force) an existing iia artifact directory.
    '.', '..', the working directory or one of its parents, a path inside an artifact, a mount point, a file, a
    symlink, or a directory of anything else is refused (CompileError naming it)."""
    if str(out) == "-":
        raise CompileError("--out -: writing to standard output is not supported; name a new artifact directory")
    if out.name in ("", ".", ".."):  # "/" has no name either: it is the root, not "."
        what = "the root directory" if out.anchor and out == Path(out.anchor) else "'.' or '..'"
        raise CompileError(f"--out {out}: name a new artifact directory, not {what}")
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise CompileError(f"--out {out}: is the working directory or one of its parents")
    refuse_inside_artifact(out, "--out", CompileError)
    if not out.exists() and not out.is_symlink():
        return
    refuse_mount_point(out, "--out", CompileError)  # with or without --force: it cannot be replaced by rename
    if not is_artifact_dir(out):  # --force would not replace it either: say so, not "pass --force"
        what = "a symlink" if out.is_symlink() else "a file" if not out.is_dir() else "a directory that is not an iia artifact"
        raise CompileError(f"--out {out}: exists and is {what} (no manifest.json of schema {SCHEMA}); --force "
                           f"replaces only an iia artifact: remove it yourself or choose another --out")
    if not force:
        raise CompileError(f"output directory {out} exists: pass --force to replace it")


def publish_artifact(work: Path, out: Path, force: bool) -> None:
    """Move the finished `work` folder to `out` (compiler.publish.publish: an existing artifact swapped out
    atomically where the filesystem allows, else restored if the second rename fails)."""

    def may_replace(dst: Path) -> None:
        if not force:
            raise CompileError(f"{dst} appeared while compiling; pass --force to replace it")
        if not is_artifact_dir(dst):
            raise CompileError(f"--force refuses to replace {dst}: it is not an iia artifact (it appeared while "
                               f"compiling)")

    publish([(work, out)], may_replace, out)
