"""Shared CLI plumbing: one-line errors (tracebacks with IIA_DEBUG=1), timed stages, progress bars."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main`; turn expected errors into one line on stderr and exit status 2 (1 for Ctrl-C)."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError, ImportError) as err:
        if os.environ.get("IIA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
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
    log(f"[{name}] ...")
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = round(seconds, 3)
    log(f"[{name}] done in {seconds:.2f} s")


class ProgressBar:
    """`progress(done, total, text)` callback drawn with tqdm (quiet when disabled)."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int, text: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, leave=False, file=sys.stderr)
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- options dataclasses -> command-line arguments ----------------------------------------------------------
# Each option is declared ONCE, as a dataclass field made by `option(...)`: its default, help, flag, bounds
# and choices. `add_options` generates the argparse arguments of every CLI that takes it; `check_options`
# applies the same bounds to options built in Python, naming the flag.


def option(default, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), lo=None, hi=None,
           choices=None, cli: bool = True):
    """A dataclass field carrying its command-line form (flag and aliases, help, bounds lo..hi inclusive,
    choices; cli=False: settable from Python only)."""
    from dataclasses import field

    meta = {"help": help, "flag": flag, "aliases": aliases, "lo": lo, "hi": hi, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """Add one argument per `option` field of dataclass `cls` (bool fields become on/off switches)."""
    import dataclasses

    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = f.metadata["help"]
        if isinstance(default, bool):
            flag = f.metadata.get("flag") or ("--no-" if default else "--") + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=help_text)
            continue
        kind = {int: int, float: float}.get(type(default) if default is not None else None)
        if kind is None and f.metadata.get("lo") is not None:
            kind = int
        kwargs = {"dest": f.name, "default": default, "help": help_text + (f" (default {default})" if default is not None else "")}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is not None:
            kwargs["type"] = kind  # bounds are checked by check_options: one line naming the flag
        parser.add_argument(flag_of(f), *f.metadata.get("aliases", ()), **kwargs)


def options_from(cls, args: argparse.Namespace, **extra):
    """An instance of dataclass `cls` from parsed arguments (fields the parser lacks keep their defaults)."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(extra)
    return cls(**values)


def check_options(options, error=ValueError) -> None:
    """Apply every `option` field's bounds and choices to an instance; `error` names the flag."""
    import dataclasses

    for f in dataclasses.fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if value is None or "help" not in meta or isinstance(value, bool):
            continue
        lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
        if choices and value not in choices:
            raise error(f"{flag_of(f)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if (lo is not None or hi is not None) and not isinstance(value, (int, float)):
            raise error(f"{flag_of(f)} must be a number, got {value!r}")
        if not ((lo is None or value >= lo) and (hi is None or value <= hi)):  # NaN fails both
            raise error(f"{flag_of(f)} must lie in [{lo}, {hi}], got {value}")
