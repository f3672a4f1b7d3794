"""Shared CLI plumbing: one-line errors (tracebacks with IIA_DEBUG=1), the parsers (`cli_parser`), timed stages;
progress (`ProgressBar`, `Ticker`, `heartbeat`) lives in iia/progress.py and options declared once (`option`,
`add_options`, ...) in iia/options.py, both re-exported here."""

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

from .options import (add_options, check_options, flag_of, given_options, option, options_from,  # noqa: F401
                      with_role)  # re-exported, as are the next: CLIs import them from here
from .progress import ProgressBar, Ticker, counted, heartbeat  # noqa: F401


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


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviated flags and with a usage error on one line (`cli_parser`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def cli_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of every iia command: a flag must be spelled out (argparse took `--budge 30` for --budget,
    and a prefix that a later flag makes ambiguous would change meaning), and a usage error is one line
    ("iia-compile: error: ... (see iia-compile --help)", exit 2) rather than the whole usage block."""
    return _Parser(prog=prog, description=description, allow_abbrev=False, **kwargs)


@contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends (a rename pair that must not be split); delivered after, to the
    handlers before. Python runs signal handlers in the main thread whichever thread the kernel gave the signal
    to, so the block swaps the handlers (a signal mask covers the calling thread only: a process-directed SIGINT
    taken by a PyTorch or ONNX Runtime worker thread still interrupted the block)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in caught[:1]:
            signal.raise_signal(s)


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


def repeated(values: list) -> list:
    """The values given more than once in a list option, sorted (a repeat is a typo: refused, not run twice)."""
    return sorted({v for v in values if values.count(v) > 1})


def distinct_int_list(text: str) -> list[int]:
    """`int_list` where each value may come once (batch sizes, NFEs): a repeat is a typo, refused, not run twice
    (tester-42: `iia-bench --batch 1,1` printed two rows for one batch size; as iia-compile's --static-batch)."""
    values = int_list(text)
    twice = repeated(values)
    if twice:
        raise argparse.ArgumentTypeError(f"{twice[0]} is given more than once in {text!r}; give each value once")
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


def _entry(module: str, name: str) -> Callable[[], int]:
    """A console script's main (pyproject.toml [project.scripts]), imported when the script runs: Ctrl-C or
    SIGTERM in the seconds of importing torch exits 130 or 143 with one line, as they do after (Python would
    print a traceback for one and nothing for the other); once the work returned, `_finish` ends the process."""
    def run() -> int:
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            _TERMINATED.clear()
            previous = signal.signal(signal.SIGTERM, _on_sigterm)  # run_cli installs it again, for its own call
        try:
            # importing torch takes ~1.5 s idle and ran 43 s silent on a loaded machine (tester-40): a line each 10 s
            with heartbeat("starting: importing PyTorch (slow on a busy machine)"):
                main = getattr(importlib.import_module(module), name)
            check_terminated()  # a SIGTERM whose exception the imported library swallowed
        except KeyboardInterrupt as err:  # nothing ran yet: run_cli's line would read its state from an earlier call
            term = isinstance(err, Terminated) or _TERMINATED.is_set()
            print(f"{'terminated (SIGTERM)' if term else 'interrupted'}: no output was written", file=sys.stderr)
            if on_main:
                signal.signal(signal.SIGTERM, previous)
            return 143 if term else 130
        try:
            rc = main()
        except KeyboardInterrupt as err:  # after run_cli returned (its own handler has said nothing)
            rc = _late_interrupt(signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
        return _finish(rc) if on_main else rc
    run.__qualname__ = f"entry({module}:{name})"
    return run


def _late_interrupt(signum: int, frame=None) -> int:
    """Say that an interrupt came after the command's work returned, and what it had written; its exit code."""
    done = [f"{p}/" if os.path.isdir(p) and not p.endswith("/") else p for p in dict.fromkeys(_WRITTEN)]
    said = "as the command ended: no output was written" if not done else (
        f"after {', '.join(done)} {'was' if len(done) == 1 else 'were'} written "
        f"({'it is' if len(done) == 1 else 'they are'} complete)")
    term = signum == signal.SIGTERM
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.write(2, f"{'terminated (SIGTERM)' if term else 'interrupted'} {said}\n".encode())  # safe in a handler
    return 143 if term else 130


def _finish(rc: int) -> int:
    """End a console script whose work returned `rc`: flush, run the atexit callbacks, os._exit. The interpreter's
    own teardown (torch's modules: ~0.5 s) is skipped, and with it a window where Ctrl-C killed the process with
    130 and no line (finalisation puts back SIGINT's default action); an interrupt until the exit says what was
    written and exits 130 (SIGTERM 143)."""
    import atexit

    def late(signum, frame):
        os._exit(_late_interrupt(signum))

    for signum in (signal.SIGINT, signal.SIGTERM):
        # a signal the parent set to be ignored stays ignored (a script's background job without job control
        # ignores Ctrl-C, as POSIX has it, for the whole run: so here too)
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, late)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: Python's own exit would say nothing more useful
            pass
    atexit._run_exitfuncs()
    os._exit(rc)


calibrate_entry = _entry("iia.calibration.cli", "calibrate_main")
accuracy_entry = _entry("iia.evaluation.cli", "accuracy_main")
compile_entry = _entry("iia.compiler.cli", "main")
export_triton_entry = _entry("iia.compiler.triton", "main")
sample_entry = _entry("iia.runtime.cli", "sample_main")
bench_entry = _entry("iia.evaluation.cli", "bench_main")
quality_entry = _entry("iia.evaluation.quality", "main")
