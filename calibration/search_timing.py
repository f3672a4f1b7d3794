"""The `auto` search's clock of work: what one denoiser call costs on this machine, timed before the plan
(`call_cost`, `time_call`), and how much slower the work measured since runs than timed (`Pace`), which
re-plans the references and sizes the scoring and the fits (`search_plan`, `search_budget`)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from iia.models.base import Denoiser

from .sampling import reference_solution

PACE_WINDOW_S = 15.0  # seconds of the latest measured work that set the pace (`Pace`)
PROBE_BATCH = 2  # noises of the first timed denoiser call (it decides which finer timing the budget affords)
PRECISE_TIMING_SHARE = 0.05  # of --budget, at most, for the precise timing (4416 image-calls, see call_cost)
PRECISE_CALLS = 18 * 32 + 15 * 256  # image-calls of the precise timing


def time_call(denoiser: Denoiser, m: int) -> float:
    """Seconds of ONE denoiser call on m noises (at sigma_max)."""
    x = torch.randn(m, *denoiser.shape, generator=torch.Generator().manual_seed(0)).to(denoiser.device) * denoiser.sigma_max
    labels = torch.zeros(m, dtype=torch.int64) if denoiser.conditional else None
    t0 = time.perf_counter()
    with torch.no_grad():
        denoiser(x, denoiser.sigma_max, labels)
    return time.perf_counter() - t0


# On a busy machine PyTorch's intra-op threads wait on each other: with another PyTorch process on both cores, one
# call of the digits model on 2 noises took 1.26 s with 2 threads and 0.004 s with 1 (gmm on 32: 0.04 s vs 0.0002
# s; beside two processes of 1024 x 1024 matmuls on 2 threads: 0.02-0.9 s vs 0.004-0.03 s, varying by the call);
# the search's plan then dropped the search or its fits, and the parity check took 23 s instead of 0.2 s
FEWER_THREADS_GAIN = 2.0  # one thread is used when it runs a call at least this many times faster
THREADS_CHECK_SHARE, THREADS_CHECK_S = 0.02, 2.0  # of --budget at most (without one: seconds) for that check


def _one_thread_faster(denoiser: Denoiser, threads: int, limit: float) -> tuple[float, float] | None:
    """(seconds of a call on PROBE_BATCH noises with 1 thread, with `threads`: the median of up to 3 each, in
    turns after a warm-up on 1 thread, as many as `limit` seconds allow) when 1 thread is FEWER_THREADS_GAIN x
    faster; else None (also when the warm-up took over a quarter of `limit`). Leaves `threads` set."""
    started = time.perf_counter()
    one: list[float] = []
    many: list[float] = []
    try:
        torch.set_num_threads(1)  # the warm-up on 1 thread: on busy cores a call on more can take 100x as long
        if time_call(denoiser, PROBE_BATCH) > limit / 4:  # a call too slow to time several of
            return None
        while len(one) < 3 and time.perf_counter() - started + 2 * max(one + many, default=0.0) <= limit:
            torch.set_num_threads(1)
            one.append(time_call(denoiser, PROBE_BATCH))
            torch.set_num_threads(threads)
            many.append(time_call(denoiser, PROBE_BATCH))
    finally:
        torch.set_num_threads(threads)
    if not one:
        return None
    mid = sorted(one)[len(one) // 2], sorted(many)[len(many) // 2]
    return mid if mid[0] * FEWER_THREADS_GAIN <= mid[1] else None


@contextmanager
def busy_machine_threads(denoiser: Denoiser, log: Callable[[str], None],
                         budget_s: float | None = None) -> Iterator[None]:
    """PyTorch on 1 intra-op thread inside the block, when a call on a CPU runs FEWER_THREADS_GAIN x faster so
    (the other cores are busy: see there), said in one line; the count before is restored after. The check takes
    at most THREADS_CHECK_SHARE of `budget_s` (THREADS_CHECK_S without one); `recheck_threads` repeats it once
    inside the block where the work later runs far slower than timed. Nothing is changed where OMP_NUM_THREADS
    is set (the user's count), on a GPU, or at 1 thread already."""
    threads = torch.get_num_threads()
    if _state["checked"] or _threads_fixed(denoiser, threads):
        yield  # (inside an outer block, e.g. the search inside a compile: checked there already)
        return
    limit = THREADS_CHECK_S if budget_s is None else THREADS_CHECK_SHARE * budget_s
    faster = _one_thread_faster(denoiser, threads, limit)
    if faster is not None:
        _said_one_thread(log, threads, faster, "")
        torch.set_num_threads(1)
    before = dict(_state)
    _state.update(checked=True, rechecked=False, limit=limit, busy=None if faster is None else _busy(faster, threads))
    try:
        yield
    finally:
        _state.update(before)
        torch.set_num_threads(threads)


# inside a `busy_machine_threads` block that timed the threads: whether `recheck_threads` ran, the check's time,
# and why the machine was found busy (`machine_busy`)
_state: dict = {"checked": False, "rechecked": False, "limit": THREADS_CHECK_S, "busy": None}
# a pace this many times slower than timed re-checks the threads: other processes took the cores after the check
# (tester: one that started just after it left 2 threads on 1 free core, the references ran at 80x the timed cost,
# the held-out noises were cut 1024 -> 32, no base but one was scored and an unfitted base shipped)
RECHECK_SLOWER = 4.0


def recheck_threads(denoiser: Denoiser, log: Callable[[str], None], slow: float) -> bool:
    """Once inside a `busy_machine_threads` block that kept more than 1 thread: when the work measured since runs
    `slow` >= RECHECK_SLOWER x the timed cost, time 1 thread against the count again and switch to 1 where it is
    FEWER_THREADS_GAIN x faster (said in one line; the block restores the count). Returns whether it switched:
    the pace measured before then says nothing of the work after."""
    threads = torch.get_num_threads()
    if not _state["checked"] or _state["rechecked"] or slow < RECHECK_SLOWER or _threads_fixed(denoiser, threads):
        return False
    _state["rechecked"] = True
    faster = _one_thread_faster(denoiser, threads, _state["limit"])
    if faster is None:
        return False
    _said_one_thread(log, threads, faster, f" (the work ran {slow:.2g}x slower than timed: checked again)")
    _state["busy"] = _busy(faster, threads)
    torch.set_num_threads(1)
    return True


def _busy(faster: tuple[float, float], threads: int) -> str:
    """`machine_busy`'s reason from a thread check that found 1 thread faster."""
    return f"a call ran {faster[1] / faster[0]:.2g}x faster on 1 thread than on {threads}"


def machine_busy() -> str | None:
    """Inside a `busy_machine_threads` block: why the machine was found busy (other processes held the cores:
    1 thread ran a call FEWER_THREADS_GAIN x faster, at the check or its re-check), else None; a pace slower
    than timed alone is not (an idle machine's work runs several times slower than its short timings: helper-41,
    5-10x on digits at --budget 30). A search made there is searched again on an idle machine."""
    return _state["busy"]


def machine_idle() -> bool:
    """Inside a `busy_machine_threads` block that timed the threads: nothing found busy (so far). False where
    the count was not ours to check (`_threads_fixed`) or outside a block: nothing is known."""
    return _state["checked"] and _state["busy"] is None


def _threads_fixed(denoiser: Denoiser, threads: int) -> bool:
    """Whether the thread count is not ours to change: 1 already, the user's (OMP_NUM_THREADS), or a GPU's work."""
    return threads <= 1 or bool(os.environ.get("OMP_NUM_THREADS")) or denoiser.device.type != "cpu"


def _said_one_thread(log, threads: int, faster: tuple[float, float], why: str) -> None:
    log(f"  PyTorch on 1 thread, not {threads}: a denoiser call on {PROBE_BATCH} noises took {faster[0]:.2g} s on 1 "
        f"and {faster[1]:.2g} s on {threads}{why} (other processes hold the cores; OMP_NUM_THREADS sets the count)")


def _chunked(per_call: Callable[[int], float]) -> Callable[[int], float]:
    """cost(n) of one step on n noises, 256 at a time (as the samplers chunk), from the cost of one call."""
    def cost(n: int) -> float:
        full, rest = divmod(n, 256)
        return full * per_call(256) + (per_call(rest) if rest else 0.0)
    return cost


def call_cost(denoiser: Denoiser, budget_s: float) -> tuple[Callable[[int], float], float, str]:
    """(cost, seconds per image-call, how it was timed): cost(n) = seconds of one executor step (a denoiser call
    and its combinations) on n noises. First ONE call on PROBE_BATCH noises (warm-up included: an upper bound);
    then, each only when it costs <= PRECISE_TIMING_SHARE of `budget_s` at that rate, the finest affordable of:
    short Heun integrations of 32 and 256 noises after a warm-up (PRECISE_CALLS image-calls), extrapolated
    linearly; calls on PROBE_BATCH and on 32 noises (the fastest of 3 each), extrapolated linearly; the fastest of
    up to 3 more calls (as many as affordable) on the most of 32, 16, 8, 4 or PROBE_BATCH noises; else the probe's
    own. The last two: that cost per image times n (the per-call overhead counted per image: an over-estimate, on
    the safe side)."""
    rate = time_call(denoiser, PROBE_BATCH) / PROBE_BATCH
    share = PRECISE_TIMING_SHARE * budget_s
    if rate * PRECISE_CALLS <= share:
        times = {}
        for m, steps in ((32, 2), (32, 8), (256, 8)):  # the first is the warm-up
            x = torch.randn(m, *denoiser.shape, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0)).to(denoiser.device)
            labels = torch.zeros(m, dtype=torch.int64) if denoiser.conditional else None
            t0 = time.perf_counter()
            reference_solution(denoiser, x, labels, steps=steps)
            times[m] = (time.perf_counter() - t0) / (2 * steps - 1)
        slope = max(times[256] - times[32], 0.0) / 224

        def cost(n: int) -> float:
            full, rest = divmod(n, 256)
            return full * times[256] + (times[32] + slope * max(rest - 32, 0) if rest else 0.0)
        return cost, times[256] / 256, "Heun runs on 32 and 256 noises"
    if rate * 3 * (PROBE_BATCH + 32) <= share:  # the fastest of 3 of each: one load spike would skew a slope
        small = min(time_call(denoiser, PROBE_BATCH) for _ in range(3))
        large = min(time_call(denoiser, 32) for _ in range(3))
        slope = max(large - small, 0.0) / (32 - PROBE_BATCH)
        return (_chunked(lambda m: small + slope * max(m - PROBE_BATCH, 0)), large / 32,
                f"calls on {PROBE_BATCH} and 32 noises")
    # the first call paid the warm-up (allocations, kernels): time one more, on the most noises affordable (a
    # small network's cost per call on 2 noises is mostly overhead: 10x its cost per image at 32)
    m = next((m for m in (32, 16, 8, 4) if rate * m <= share), PROBE_BATCH)
    if rate * m <= share:
        # the fastest of up to 3 where affordable: on a loaded machine one call of a cheap model can take 100x
        # its cost (threads waiting on each other), and the plan then dropped the search. Each next call is
        # afforded at the fastest rate so far, not the probe's (warm-up and a wait included: gmm on a busy
        # machine, 0.02 s per image at the probe, allowed one call, itself 0.005 s per image: search dropped)
        tries, spent = 0, 0.0
        while tries < 3 and spent + rate * m <= share:
            took = time_call(denoiser, m)
            tries, spent, rate = tries + 1, spent + took, min(rate, took / m)
        how = f"the fastest of {tries} more calls" if tries > 1 else "one more call"
        return (lambda n: rate * n), rate, f"{how} on {m} noises"
    return (lambda n: rate * n), rate, f"one call on {PROBE_BATCH} noises, warm-up included"



class Pace:
    """How much slower the machine runs than it was timed: the seconds the batches of work measured since took
    over what `plan.cost` predicted for them, over the latest PACE_WINDOW_S seconds of them (at least the last
    batch); 1 until measured. One short batch alone misled it: on a busy machine the last base scored (~1 s) ran
    at 0.5x the pace of the 16 s before it, and the fits planned on it ran 3x slower than planned."""

    def __init__(self, plan):
        self.plan, self.slow = plan, 1.0
        self._seen: list[tuple[float, float]] = []  # (seconds, predicted) per batch, the latest last

    def predict(self, n: int, calls: int) -> float:
        """Seconds of `calls` executor steps on n noises at the current pace (0 without a timed cost)."""
        return 0.0 if self.plan.cost is None or n <= 0 else self.slow * calls * self.plan.cost(n)

    def restart(self) -> None:
        """Forget the work measured so far (the threads changed: it says nothing of the work after)."""
        self._seen.clear()
        self.slow = 1.0

    def observe(self, n: int, calls: int, seconds: float) -> None:
        predicted = 0.0 if self.plan.cost is None else calls * self.plan.cost(n)
        if predicted <= 0:
            return
        self._seen.append((seconds, predicted))
        while len(self._seen) > 1 and sum(s for s, _ in self._seen[1:]) >= PACE_WINDOW_S:
            self._seen.pop(0)
        self.slow = max(sum(s for s, _ in self._seen) / sum(p for _, p in self._seen), 0.05)
