"""Long work is never silent (issue 24 item 4): the log ticker, the export heartbeat, parity's and the bench's
progress."""

from __future__ import annotations

import threading
import time

import torch

from iia.cli import Ticker, heartbeat
from iia.compiler.check import PARITY_BATCH, PARITY_BATCH_LARGE, counting_calls, parity_batch
from iia.evaluation.bench import time_interleaved
from iia.models import from_callable


def test_the_ticker_logs_elapsed_and_eta_only_when_work_runs_long():
    lines = []
    quiet = Ticker("quick", lines.append, every=10.0)
    for k in range(1, 5):
        quiet(k, 4)
    assert lines == []
    loud = Ticker("slow", lines.append, every=0.0)
    time.sleep(0.01)
    loud(1, 4)
    assert lines and lines[0].startswith("  slow: 1/4,") and "elapsed" in lines[0] and "left" in lines[0]


def test_the_heartbeat_beats_during_the_body_and_its_thread_stops():
    lines = []
    with heartbeat("exporting", lines.append, every=0.05, estimate_s=3):
        time.sleep(0.3)
    n = len(lines)
    assert n >= 2 and "elapsed" in lines[0] and "~3 s in all" in lines[0], lines
    time.sleep(0.2)
    assert len(lines) == n  # stopped
    assert not any(t.name.startswith("heartbeat:") for t in threading.enumerate())
    late = []  # past 1.5x its estimate the line stops repeating the estimate as if it still held
    with heartbeat("exporting", late.append, every=0.05, estimate_s=0.1):
        time.sleep(0.4)
    assert "~0 s in all" in late[0] and late[-1].endswith("(past the ~0 s estimated: the machine may be busy)"), late


def test_parity_counts_denoiser_calls_and_removes_its_hook():
    d = from_callable(lambda x, s, l: x * 0.5, (1, 2, 2))
    seen = []
    with counting_calls(d, seen.append):
        for _ in range(3):
            d(torch.zeros(2, 1, 2, 2), 1.0)
    d(torch.zeros(2, 1, 2, 2), 1.0)  # after the block: not counted
    assert seen == [1, 2, 3]
    assert parity_batch(d) == PARITY_BATCH  # a small model keeps the batch its golden files were made at
    big = from_callable(lambda x, s, l: x, (1, 2, 2))
    big.net.weight = torch.nn.Parameter(torch.zeros(11_000_000))
    assert parity_batch(big) == PARITY_BATCH_LARGE == 2


def test_the_bench_ticks_every_call_outside_the_timed_spans():
    ticks = []
    times = time_interleaved({"a": lambda: None, "b": lambda: None}, warmup=1, iters=3,
                             tick=lambda done, total: ticks.append((done, total)))
    assert ticks == [(k, 8) for k in range(1, 9)] and all(len(t) == 3 for t in times.values())


def test_a_piped_calibration_writes_log_lines_not_carriage_returns(tmp_path):
    """tqdm's bar on a pipe or a log file piles up carriage returns; there the progress is Ticker lines."""
    import os
    import subprocess
    import sys

    out = tmp_path / "c.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "iia.calibration.cli", "gmm", "--solver", "iia-edm", "--nfe", "5",
                          "--calib-batch", "32", "--holdout", "64", "--reference-steps", "32", "--out", str(out)],
                         capture_output=True, env=env, timeout=600)  # bytes: text mode would turn \r into \n
    assert run.returncode == 0, run.stderr
    assert out.is_file() and b"\r" not in run.stderr and b"\x1b" not in run.stderr, run.stderr[-500:]


def test_the_search_watchdog_names_the_phase_it_is_still_in():
    """Minutes inside one phase (a large model's evaluations on a CPU) print lines that say which work is still
    running: what the last progress ticker started counting (tester-40: quoting the last line named the phase
    that had just ended)."""
    from iia.calibration.search import _Watchdog

    lines: list[str] = []
    with _Watchdog(lines.append, every=0.5) as watched:
        time.sleep(1.6)
        watched("  references: 128 calibration + 1024 held-out noises (9.9 s)")
        Ticker("schedule unipc-3/sigma_min", watched)  # a fit starts; its first tick comes after an evaluation
        time.sleep(2.6)
    beats = [line for line in lines if "still working" in line]
    assert beats[0].startswith("  search: still working on timing and planning, 1 s in"), beats
    assert beats[-1].startswith("  search: still working on schedule unipc-3/sigma_min, ") and \
        beats[-1].endswith("s since the last line)"), beats
