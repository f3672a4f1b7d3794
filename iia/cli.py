"""Shared CLI plumbing: one-line errors (tracebacks with IIA_DEBUG=1), timed stages; progress (`ProgressBar`,
`Ticker`, `heartbeat`) lives in iia/progress.py and is re-exported here."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .progress import ProgressBar, Ticker, heartbeat  # noqa: F401 (re-exported: CLIs import them from here)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (temp files, build dirs) runs for it too."""


_TERMINATED = threading.Event()  # set by SIGTERM: a library that swallows or wraps the exception cannot hide it


def _on_sigterm(signum, frame):
    _TERMINATED.set()
    raise Terminated()


_WRITTEN: list[str] = []  # outputs completed in this run_cli call: an interrupt afterwards must not deny them


def written(path) -> None:
    """Record a finished output (file or artifact directory) so that an interrupt after it says so."""
    _WRITTEN.append(str(path))


_CACHED: list[str] = []  # cache entries completed in this run_cli call (not outputs, but an interrupt says so)


def cached(path) -> None:
    """Record a cache entry written whole (data + sidecar), so that an interrupt afterwards does not deny it."""
    _CACHED.append(str(path))


def _nothing_else() -> str:
    done = list(dict.fromkeys(_WRITTEN))
    said = "no output was written" if not done else f"{', '.join(done)} complete, no other output was written"
    if _CACHED:  # complete entries, kept: each is checked against its recorded sha256 before any use
        said += (f" ({len(_CACHED)} cache entr{'y' if len(_CACHED) == 1 else 'ies'} completed before it kept, under "
                 f"{os.path.commonpath([os.path.dirname(p) for p in _CACHED])})")
    return said


def check_terminated() -> None:
    """Raise Terminated if SIGTERM arrived under run_cli (even if a library caught the first exception)."""
    if _TERMINATED.is_set():
        raise Terminated()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a stale work folder's owner is gone when it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(err).split()) or type(err).__name__


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main`; every failure becomes ONE line on stderr: expected errors (ValueError, OSError,
    RuntimeError, ImportError) exit 2, anything else exits 2 naming its type; Ctrl-C exits 130 and SIGTERM 143
    (both after the same cleanup; the codes shells give a process those signals end). IIA_DEBUG=1 re-raises,
    keeping the traceback."""
    debug = bool(os.environ.get("IIA_DEBUG"))
    previous = None
    _WRITTEN.clear()
    _CACHED.clear()
    if threading.current_thread() is threading.main_thread():
        _TERMINATED.clear()
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = main(argv) or 0
        if _TERMINATED.is_set():  # caught and swallowed inside a library; the work still completed
            print("terminated (SIGTERM) as the work completed: its outputs are complete", file=sys.stderr)
            return 143
        return rc
    except BaseException as err:
        if _TERMINATED.is_set() and not isinstance(err, SystemExit):  # maybe wrapped by a library (torch.export)
            if debug:
                raise
            print(f"terminated (SIGTERM): {_nothing_else()}", file=sys.stderr)
            return 143
        return _report(err, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _from_argparse(err: SystemExit) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("argparse.py"):
            return True
        tb = tb.tb_next
    return False


def _report(err: BaseException, debug: bool) -> int:
    if isinstance(err, KeyboardInterrupt):
        print(f"interrupted: {_nothing_else()}", file=sys.stderr)
        return 130
    if isinstance(err, SystemExit) and not debug and not _from_argparse(err):  # e.g. sys.exit(3) in a model's code
        print(f"error: code run by iia called sys.exit({err.code!r}) (IIA_DEBUG=1 shows where)", file=sys.stderr)
        return 2
    if debug or not isinstance(err, Exception):  # IIA_DEBUG=1; argparse's SystemExit (--help, usage) passes through
        raise err
    if isinstance(err, (ValueError, OSError, RuntimeError, ImportError)):
        print(f"error: {one_line(err)}", file=sys.stderr)
    else:  # a failure nobody anticipated: still one line
        print(f"error: {type(err).__name__}: {one_line(err)} (unexpected; IIA_DEBUG=1 shows the traceback)",
              file=sys.stderr)
    return 2


@contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends (a rename pair that must not be split); delivered after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def default_output(model, solver: str, nfe: int, suffix: str = "") -> Path:
    """The default output name of iia-compile (an artifact directory) and iia-calibrate (`suffix` ".json"):
    <model>-<solver>-nfe<N>, <model> the file or folder name without its extension, or a bundled model's name
    with its ':' options as letters, digits and dots ("gmm:components=4,d=16" -> "gmm-components4-d16"), so that
    two models compiled or calibrated in one folder get two names."""
    text = str(model)
    if ":" in text and not os.path.exists(text):  # a bundled model with options, not a path
        name, options = text.split(":", 1)
        name = "-".join([name] + [part for part in re.split(r"[^A-Za-z0-9.]+", options.replace("=", "")) if part])
    else:
        name = Path(text).stem
    return Path(f"{name}-{solver}-nfe{nfe}{suffix}")


def check_output_file(path: str | Path | None, flag: str) -> Path | None:
    """An output FILE path checked before any work, one rule for every CLI (iia-run's C++ check says the same):
    not '-' (standard output is not supported), not '.', '..' or an existing directory, in an existing directory
    this process may write in (no directory is made: a mistyped path is refused, not created). ValueError naming
    `flag`, the path and the cause (iia-run's words); None passes through."""
    if path is None:
        return None
    if str(path) == "-":
        raise ValueError(f"{flag} -: writing to standard output is not supported; give a file name")
    if not str(path).strip():
        raise ValueError(f"{flag} {str(path)!r}: empty, expected a file name")
    path = Path(path)
    if path.name in ("", ".", "..") or path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory, expected a file name")
    parent = path.parent
    try:
        os.stat(parent)
    except OSError as err:
        raise ValueError(f"{flag} {path}: its directory {parent} cannot be used ({os.strerror(err.errno)})") from None
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    denied = _write_denied(parent)
    if denied:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({denied})")
    return path


def _write_denied(directory: Path) -> str | None:
    """Why this process may not create files in `directory` (strerror's words), or None."""
    import errno

    if os.access(directory, os.W_OK | os.X_OK):
        return None
    read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)  # access() says EROFS then; Python drops errno
    return os.strerror(errno.EROFS if read_only else errno.EACCES)


class OutputFiles:
    """The output files of one run (`paths`), published together: each is written to a temp file beside it
    (`writing`), then `publish` renames them all into place with SIGINT/SIGTERM
    deferred, and a failed rename puts back the files the earlier ones replaced (kept as hard links until then):
    a reader finds all of this run's outputs or none (iia-sample's new .npz beside an older PNG was the fault).
    Leaving the `with` block removes every temp not published. An OSError is re-raised naming `flag`, the output
    and the cause, never a temp file."""

    def __init__(self, flag: str, paths: list[Path]):
        self.flag, self.paths, self.temps = flag, paths, {}  # temps: output -> its temp file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for temp in self.temps.values():
            temp.unlink(missing_ok=True)

    @contextmanager
    def writing(self, path: Path):
        """Yield the temp file that holds `path`'s new content until `publish`."""
        try:
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            self.temps[path] = Path(temp)
            yield Path(temp)
        except OSError as err:
            raise self._failed(path, err) from err

    def publish(self) -> None:
        kept, done = {}, []
        with signals_deferred():
            try:
                for path, temp in self.temps.items():
                    if os.path.lexists(path):
                        try:
                            os.link(path, temp.with_name(temp.name + ".old"), follow_symlinks=False)
                            kept[path] = temp.with_name(temp.name + ".old")
                        except OSError:  # no hard links on this file system: a later failure cannot restore it
                            pass
                    os.replace(temp, path)
                    done.append(path)
            except OSError as err:
                for replaced in done:
                    if replaced in kept:
                        os.replace(kept.pop(replaced), replaced)
                    else:
                        replaced.unlink(missing_ok=True)
                raise self._failed(path, err) from err
            finally:
                for old in kept.values():
                    old.unlink(missing_ok=True)
        self.temps.clear()

    def _failed(self, path: Path, err: OSError) -> OSError:
        return cannot_write(self.flag, path, err, self.paths)


def cannot_write(flag: str, path, err: OSError, outputs: list | None = None) -> OSError:
    """The one-line error of a failed output write: `flag`, the output, the cause (strerror's words, never a temp
    file's name) and the `outputs` (default [path]) the atomic write left as they were."""
    outputs = [path] if outputs is None else outputs
    return OSError(f"{flag} {path}: cannot write it ({err.strerror or one_line(err)}); "
                   f"{' and '.join(map(str, outputs))} left as {'it was' if len(outputs) == 1 else 'they were'}")


@contextmanager
def writing_output(flag: str, path):
    """Around an atomic write of output file `path` (a temp file renamed into place): an OSError it raises is
    re-raised by `cannot_write`, naming `flag` (a full disk said only '[Errno 28] No space left on device')."""
    try:
        yield
    except OSError as err:
        raise cannot_write(flag, path, err) from err


def int_list(text: str) -> list[int]:
    try:  # an empty item ("1,,2", "1,") is a typo, not nothing
        values = [int(v) for v in text.split(",")] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


@contextmanager
def stage(name: str, timings: dict | None = None, log: Callable[[str], None] | None = None):
    """Log a stage's name, then its time when it ends (to stderr unless `log` is given)."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    check_terminated()
    log(f"[{name}] ...")
    start = time.perf_counter()
    yield
    check_terminated()  # a SIGTERM that a library swallowed during the stage still stops the work here
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = round(seconds, 3)
    log(f"[{name}] done in {seconds:.2f} s")


# ---- options dataclasses -> command-line arguments ----------------------------------------------------------
# Each option is declared ONCE, as a dataclass field made by `option(...)`: its default, help, flag, bounds
# and choices. `add_options` generates the argparse arguments of every CLI that takes it; `check_options`
# applies the same bounds to options built in Python, naming the flag.


def option(default, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), lo=None, hi=None,
           choices=None, cli: bool = True, parse: Callable[[str], object] | None = None, role: str | None = None):
    """A dataclass field carrying its command-line form (flag and aliases, help, bounds lo..hi inclusive,
    choices; cli=False: settable from Python only). parse: argparse type of a list option (int_list,
    str_list): bounds and choices then apply to each element. role: what the option sets (e.g. "fit",
    "guard", "search", "engine"; each options class lists its roles), read by the policies that refuse a
    flag the chosen path would ignore (`with_role`)."""
    from dataclasses import field

    meta = {"help": help, "flag": flag, "aliases": aliases, "lo": lo, "hi": hi, "choices": choices, "cli": cli,
            "parse": parse, "role": role}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def with_role(cls, *roles: str) -> tuple[str, ...]:
    """Names of the `option` fields of dataclass `cls` (or of an instance) whose role is one of `roles`, in
    declaration order."""
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("role") in roles)


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None,
                only: tuple[str, ...] | None = None) -> None:
    """Add one argument per `option` field of dataclass `cls` (bool fields become on/off switches); `only`
    restricts to the named fields."""
    import dataclasses

    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip or only is not None and f.name not in only:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = f.metadata["help"]
        if isinstance(default, bool):
            flag = f.metadata.get("flag") or ("--no-" if default else "--") + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=help_text)
            continue
        kind = {int: int, float: float}.get(type(default) if default is not None else None)
        if kind is None and f.metadata.get("lo") is not None:
            kind = float if isinstance(f.metadata["lo"], float) else int
        kind = f.metadata.get("parse") or kind
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        said = default is None or f"(default {shown}" in help_text  # a help text that gives this default itself
        kwargs = {"dest": f.name, "default": default, "help": help_text + ("" if said else f" (default {shown})")}
        if f.metadata.get("choices") and not f.metadata.get("parse"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is not None:
            kwargs["type"] = kind  # bounds are checked by check_options: one line naming the flag
        parser.add_argument(flag_of(f), *f.metadata.get("aliases", ()), **kwargs)


def given_options(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dests of the options `argv` sets explicitly, whatever their value (aliases and abbreviations
    included): argparse fills a default only where the namespace lacks the attribute, so a namespace
    pre-filled with a marker keeps the marker exactly where nothing was given."""
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not marker}


def options_from(cls, args: argparse.Namespace, **extra):
    """An instance of dataclass `cls` from parsed arguments (fields the parser lacks keep their defaults)."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(extra)
    return cls(**values)


def check_options(options, error=ValueError) -> None:
    """Apply every `option` field's bounds and choices to an instance (to each element of a list option);
    `error` names the flag. Numbers must be finite: NaN is refused, not compared."""
    import dataclasses
    import math

    for f in dataclasses.fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if value is None or "help" not in meta or isinstance(value, bool):
            continue
        values = list(value) if isinstance(value, (list, tuple)) and meta.get("parse") else [value]
        if not values:
            raise error(f"{flag_of(f)} needs at least one value")
        for item in values:
            _check_value(flag_of(f), item, meta, error, math)


def _check_value(flag: str, value, meta, error, math) -> None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices and value not in choices:
        raise error(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if lo is None and hi is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, float) and math.isnan(value):
        raise error(f"{flag} must be a number, got {value!r}")
    if isinstance(lo, int) and isinstance(hi, int) and not isinstance(value, int) and not float(value).is_integer():
        raise error(f"{flag} must be an integer, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise error(f"{flag} must lie in [{lo}, {hi}], got {value}")


def _entry(module: str, name: str) -> Callable[[], int]:
    """A console script's main (pyproject.toml [project.scripts]), imported when the script runs: Ctrl-C in the
    seconds of importing torch exits 130 with one line, as it does after (Python would print a traceback)."""
    def run() -> int:
        try:
            main = getattr(importlib.import_module(module), name)
        except KeyboardInterrupt:  # nothing ran yet: run_cli's line would read its state from an earlier call
            print("interrupted: no output was written", file=sys.stderr)
            return 130
        return main()
    run.__qualname__ = f"entry({module}:{name})"
    return run


calibrate_entry = _entry("iia.calibration.cli", "calibrate_main")
accuracy_entry = _entry("iia.evaluation.cli", "accuracy_main")
compile_entry = _entry("iia.compiler.cli", "main")
export_triton_entry = _entry("iia.compiler.triton", "main")
sample_entry = _entry("iia.runtime.cli", "sample_main")
bench_entry = _entry("iia.evaluation.cli", "bench_main")
quality_entry = _entry("iia.evaluation.quality", "main")
