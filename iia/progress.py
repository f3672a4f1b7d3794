"""Progress on long work, never minutes of silence: tqdm bars on a terminal, log lines with an ETA elsewhere."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable


class ProgressBar:
    """`progress(done, total, text)` callback drawn with tqdm on a terminal, else (a log, a pipe: no carriage
    returns piling up) a `Ticker` line every ~10 s; quiet when disabled. A new total starts it over (a
    calibration's fit, then its guard's reference and scoring, each with its own count)."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None
        self.ticker: Ticker | None = None  # off a terminal: the log lines of the current count
        self.ticker_total = 0

    def __call__(self, done: int, total: int, text: str = "") -> None:
        if not self.enabled:
            return
        if not sys.stderr.isatty():
            if self.ticker is None or total != self.ticker_total:
                self.ticker, self.ticker_total = Ticker(self.desc), total
            self.ticker.what = self.desc + (f" ({text})" if text else "")  # the step it is at now
            self.ticker(done, total)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, leave=False, file=sys.stderr)
        elif total != self.bar.total:
            self.bar.reset(total=total)
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.ticker = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Ticker:
    """`tick(done, total)`: a log line with the elapsed time and an ETA at most every `every` seconds (none for
    work that ends sooner), so that long work is never silent, in a log file or on a terminal."""

    def __init__(self, what: str, log: Callable[[str], None] | None = None, every: float = 10.0):
        self.what, self.every = what, every
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.started = self.last = time.perf_counter()
        # a log that names the work in progress (the search's watchdog, `starting(what)`) is told what starts here
        getattr(self.log, "starting", lambda what: None)(what)

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every or done <= 0:
            return
        self.last = now
        eta = (now - self.started) / done * max(total - done, 0)
        self.log(f"  {self.what}: {done}/{total}, {now - self.started:.0f} s elapsed, ~{eta:.0f} s left")


@contextmanager
def heartbeat(what: str, log: Callable[[str], None] | None = None, every: float = 10.0,
              estimate_s: float | None = None):
    """A log line every `every` seconds with the elapsed time (and `estimate_s`, a rough total, when given)
    while the body runs one opaque call (e.g. torch.onnx.export); a daemon thread, stopped and joined on exit."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    stop, started = threading.Event(), time.perf_counter()

    def beat():
        while not stop.wait(every):
            elapsed = time.perf_counter() - started
            guess = ("" if not estimate_s else f" (estimated ~{estimate_s:.0f} s in all)" if elapsed <= 1.5 * estimate_s
                     else f" (past the ~{estimate_s:.0f} s estimated: the machine may be busy)")
            log(f"  {what}: {elapsed:.0f} s elapsed{guess}")

    thread = threading.Thread(target=beat, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def counted(progress: Callable[[int, int, str], None] | None, total: int, count: Callable[[], int],
            every: float = 1.0):
    """While the body runs, `progress(count() - its value at entry, total, text)` every `every` seconds from a
    daemon thread (stopped and joined on exit), `text` being what the body last named through the yielded
    setter: progress by units of work that each take seconds (a denoiser's image-calls), where the body's own
    milestones can be minutes apart (tester-42: a CIFAR-size calibration was silent for 236 s)."""
    if progress is None:
        yield lambda what: None
        return
    text, stop, start = [""], threading.Event(), count()

    def report():
        while not stop.wait(every):
            progress(min(count() - start, total), total, text[0])

    thread = threading.Thread(target=report, name="progress: counted", daemon=True)
    thread.start()
    try:
        yield lambda what: text.__setitem__(0, what)
    finally:
        stop.set()
        thread.join()
        progress(min(count() - start, total), total, text[0])
