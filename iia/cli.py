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
