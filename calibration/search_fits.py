"""The `auto` search's two end-to-end fits: learned time steps and global coefficients.

Both optimise the END-TO-END error on calibration noises: the final samples against the reference solution
from the same noise (`EvalSet`), never a local per-step target.

- `learn_schedule`: the N+1 sigmas of a solver, in a monotone parametrisation (`ScheduleSpace`: softmax-weighted
  gaps in sigma^(1/rho), endpoints fixed, so the Karras schedule is the all-zero point), fitted by derivative-free
  Nelder-Mead (each evaluation is one sampling run; no gradient through the schedule-dependent solver weights is
  needed, and N - 1 <= ~10 parameters is where it works well). LD3 (ICLR 2025) fits time steps the same way
  against a teacher; the reference ODE solution is ours.
- `fit_global`: the per-step coefficients of an IIA program (`global_program`: the family's IIA basis, or its
  linear form, every state any combination of the noise and the denoiser outputs so far) fitted by L-BFGS,
  backpropagating through the
  executor (`sample_with_coefficients`) and the denoiser's own autograd, on unit-scaled coefficient offsets with
  a ridge toward the base solver, each coefficient kept within `coefficient_limit` of its base. Its memory is
  bounded (`gradient_plan`): the calibration noises are taken a chunk at a time with the gradient accumulated,
  and where NFE calls' activations of a chunk would not fit, each denoiser call is recomputed in the backward
  pass (torch.utils.checkpoint) instead of kept.
Each stops at `deadline` (a time.perf_counter() value; None: only its evaluation count bounds it).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from iia.cli import Ticker
from iia.models.base import Denoiser
from iia.models.device import release_free_memory, resident_bytes
from iia.runtime.program import execute

from .evalset import EvalSet
from .sampling import TORCH
from .search_plan import GLOBAL_FIT_EVALS
from .search_space import Candidate, SearchOptions, schedule_space
from .solvers import Program, build_program, linear_name


class FitProgress:
    """A fit's progress for a Ticker: evaluations done, and the total its deadline or count allows."""

    def __init__(self, what: str, log, max_evals: int, deadline: float | None):
        self.tick, self.max_evals, self.deadline = Ticker(what, log), max_evals, deadline
        self.started = time.perf_counter()

    def __call__(self, evals: int) -> None:
        total = self.max_evals
        if self.deadline is not None and evals:
            per = (time.perf_counter() - self.started) / evals
            total = min(total, evals + max(int((self.deadline - time.perf_counter()) / per), 0))
        self.tick(evals, max(total, evals))


def lbfgs_evals(iterations: int) -> int:
    """The evaluations a global fit of `iterations` L-BFGS iterations is expected to take (its line search
    evaluates ~GLOBAL_FIT_EVALS per iteration): the total its progress counts toward."""
    return math.ceil(GLOBAL_FIT_EVALS * iterations)


class OutOfTime(Exception):
    """The deadline passed: the fit returns its best point so far."""


def calib_loss(err: torch.Tensor, kind: str) -> torch.Tensor:
    """"mse": mean squared per-sample RMSE (its root is the reported RMSE); "l2": mean per-sample RMSE (less
    tail-driven). `err`: [n] per-sample RMSE."""
    return (err**2).mean() if kind == "mse" else err.mean()


# Nelder-Mead from Karras creeps toward the schedules networks learn, which jump from sigma_max far down (digits
# NFE 5 UniPC-3: 80 -> 3.03, Karras 24.4) and spends most of its evaluations getting there: 128 noises, UniPC-3
# NFE 5 reached its loss 0.00537 after ~300 evaluations from Karras, ~100 from the best jump (sigma_max / 16 or
# / 32 here); iPNDM NFE 7 0.00211 after 400 from Karras, 0.00156 after 150 from the best jump (sigma_max / 16).
# Six more evaluations; Karras stays the start where no jump beats it (gmm's schedules step as Karras does).
JUMP_FRACTIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64)


def learn_schedule(denoiser: Denoiser, solver: str, nfe: int, final: str, calib: EvalSet, r: int = 1,
                   coefficients: list | None = None, loss: str = "mse", max_evals: int = 400,
                   deadline: float | None = None, on_eval: Callable[[int], None] | None = None,
                   ) -> tuple[list[float], dict]:
    """Fit the sigmas of `solver` at `nfe` to the end-to-end error on `calib` by Nelder-Mead from the best of
    Karras and its JUMP_FRACTIONS jumps (`ScheduleSpace.jump_theta`), at most `max_evals` evaluations in all;
    `on_eval(evals)` after each evaluation (progress).

    Returns (sigmas, info) with info = {evals, loss_karras, loss, seconds, cut}.
    """
    space = schedule_space(denoiser, solver, nfe, final)
    started = time.perf_counter()
    x0 = space.karras_theta()
    best = {"f": math.inf, "theta": x0}
    evals = 0

    def f(theta):
        nonlocal evals
        if deadline is not None and time.perf_counter() > deadline and evals > 0:
            raise OutOfTime
        evals += 1
        program = build_program(solver, space.sigmas(theta), r)
        if coefficients is not None:
            program = program.with_coefficients(coefficients)
        try:
            value = float(calib_loss(calib.errors(program, reference=calib.reference), loss))
        except ValueError:  # a denoiser NaN on a degenerate grid
            value = math.inf
        if not math.isfinite(value):
            value = 1e30
        if value < best["f"]:
            best.update(f=value, theta=list(map(float, theta)))
        if on_eval is not None:
            on_eval(evals)
        return value

    f0 = f(x0)
    cut = deadline is not None and time.perf_counter() > deadline  # stopped before it converged
    if space.n_params >= 1 and not cut:
        from scipy.optimize import minimize  # (its import takes seconds: not when the budget is spent)

        try:
            for fraction in JUMP_FRACTIONS:
                if evals < max_evals:
                    f(space.jump_theta(space.sigma_max * fraction))
            x0 = best["theta"]
            simplex = [x0] + [[x + (0.7 if k == j else 0.0) for j, x in enumerate(x0)] for k in range(space.n_params)]
            if evals < max_evals:
                minimize(f, x0, method="Nelder-Mead", options={"maxfev": max_evals - evals, "initial_simplex": simplex,
                                                               "xatol": 1e-3, "fatol": 1e-5 * f0, "adaptive": True})
        except OutOfTime:
            cut = True
    info = {"evals": evals, "loss_karras": f0, "loss": best["f"], "seconds": round(time.perf_counter() - started, 2),
            "cut": cut}
    return space.sigmas(best["theta"]), info


def schedule_candidate(denoiser: Denoiser, nfe: int, family: str, final: str, calib: EvalSet, opts: SearchOptions,
                       deadline: float | None, log, round: int = 1) -> tuple[Candidate, dict]:
    """`learn_schedule` of family/final on `calib` (progress in `log`) as a candidate of fit round `round`, and the
    fit's info (the first round's schedules and the later rounds' alike)."""
    what = f"{'' if round == 1 else f'round {round} '}schedule {family}/{final}"
    sigmas, info = learn_schedule(denoiser, family, nfe, final, calib, loss=opts.loss, max_evals=opts.max_evals,
                                  deadline=deadline, on_eval=FitProgress(what, log, opts.max_evals, deadline))
    return Candidate(family, final, "learned", "base", build_program(family, sigmas), info["loss"],
                     seconds=info["seconds"], note=f"{info['evals']} evals", round=round), info


def global_program(family: str, sigmas, opts: SearchOptions, linear: bool = False) -> Program:
    """The program a global fit of `family` on `sigmas` fits, with the family's base coefficients (extra ones 0):
    its linear form (`solvers.linear_step`) when `linear` and the family has one, else the family's IIA program
    with opts.r history terms."""
    return build_program((linear and linear_name(family)) or "iia-" + family, sigmas, opts.r)


def global_candidate(denoiser: Denoiser, on: Candidate, calib: EvalSet, opts: SearchOptions, deadline: float | None,
                     log, round: int = 1, linear: bool = False) -> tuple[Candidate, dict]:
    """`fit_global` of `global_program` of `on`'s family on `on`'s sigmas to `calib`, as a candidate of fit round
    `round` (coefficients "linear" for the linear form, else "global"), and the fit's info."""
    program = global_program(on.family, on.program.sigmas, opts, linear)
    kind = "linear" if program.solver != "iia-" + on.family else "global"
    what = f"{'' if round == 1 else f'round {round} '}{kind} fit {on.family}/{on.final}/{on.schedule}"
    program, info = fit_global(denoiser, program, calib, opts.loss, max_iter=opts.max_iter, deadline=deadline,
                               on_eval=FitProgress(what, log, lbfgs_evals(opts.max_iter), deadline))
    return Candidate(on.family, on.final, on.schedule, kind, program, info["loss"], seconds=info["seconds"],
                     note=f"{info['evals']} evals", round=round, evals=info["evals"]), info


class GradDenoiser:
    """The denoiser as the executor calls it, D(x, sigma, labels), but differentiable (no torch.no_grad), on
    the denoiser's device. `recompute`: each call's activations are not kept for the backward pass but
    recomputed there from its input (torch.utils.checkpoint): memory of one call instead of NFE calls."""

    def __init__(self, denoiser: Denoiser, recompute: bool = False):
        self.denoiser, self.recompute = denoiser, recompute

    def _net(self, x: torch.Tensor, sig: torch.Tensor, *labels) -> torch.Tensor:
        return self.denoiser.forward(x.to(torch.float32), sig, *labels).to(torch.float64)

    def __call__(self, x: torch.Tensor, sigma: float, labels) -> torch.Tensor:
        device = self.denoiser.device
        sig = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=device)
        args = [x.to(device), sig]
        if self.denoiser.conditional:
            args.append(self.denoiser.labels_or_error(labels, x.shape[0]).to(device))
        if self.recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._net, *args, use_reentrant=False)
        return self._net(*args)


def sample_with_coefficients(program: Program, denoiser: Denoiser, noise: torch.Tensor, labels,
                             coefficients: list[torch.Tensor], basis_rms: list | None = None,
                             recompute: bool = False) -> torch.Tensor:
    """The executor with coefficient TENSORS (differentiable in them and through the denoiser); optionally
    records each basis term's RMS per step into `basis_rms`; `recompute`: see GradDenoiser."""
    def record(k, view):
        basis_rms.append([float(b.detach().pow(2).mean().sqrt()) for b in view.basis])

    return execute(program.plan(), GradDenoiser(denoiser, recompute), noise.to(torch.float64), labels,
                   coefficients=coefficients, on_step=None if basis_rms is None else record, arrays=TORCH)


# Memory for the global fit's backward pass. On a CUDA device: half its free memory at the fit's start. On the
# CPU the whole process is held to CPU_RSS_WEIGHTS x the network's float32 weight bytes + CPU_RSS_BASE (the peak
# RSS iia-compile is held to, scripts/real_size.py): the backward pass gets what the process does not hold yet,
# at most CPU_GRAD_MEMORY_BYTES. A chunk keeps, per noise, each call's saved activations (unless recomputed) and
# ~STATE_COPIES float64 states per call (the executor's combination terms, the call's input); the backward pass
# of a call also holds the gradients of its activations, about as many bytes again (GRAD_COPIES).
CUDA_GRAD_MEMORY_SHARE, CPU_GRAD_MEMORY_BYTES, STATE_COPIES, GRAD_COPIES = 0.5, 1 << 30, 6, 1
CPU_RSS_WEIGHTS, CPU_RSS_BASE = 4, 3 << 29  # 1.5 GiB
# a process that holds more than the target for reasons of its own (a caller's other models) still fits, at this
MIN_CPU_GRAD_MEMORY_BYTES = 1 << 28
MIN_PLAIN_CHUNK = 32  # below this many noises per chunk, recomputing calls beats smaller chunks (batching)


def float32_weight_bytes(net: torch.nn.Module) -> int:
    """The network's parameters and buffers as float32 bytes (what the memory target is counted in)."""
    return 4 * sum(t.numel() for t in (*net.parameters(), *net.buffers()) if t.is_floating_point())


def grad_memory_budget(device: torch.device, weight_bytes: int = 0) -> int:
    """Bytes the global fit's backward pass may hold on `device` (see CUDA_GRAD_MEMORY_SHARE, CPU_RSS_BASE):
    `weight_bytes` the network's float32 weight bytes. On the CPU, where the resident set cannot be read, the
    fixed CPU_GRAD_MEMORY_BYTES; never below MIN_CPU_GRAD_MEMORY_BYTES."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_GRAD_MEMORY_SHARE * free)
    release_free_memory()  # what was freed still counts in the resident set until the heap hands it back
    rss = resident_bytes()
    if rss is None:
        return CPU_GRAD_MEMORY_BYTES
    room = CPU_RSS_WEIGHTS * weight_bytes + CPU_RSS_BASE - rss
    return max(MIN_CPU_GRAD_MEMORY_BYTES, min(CPU_GRAD_MEMORY_BYTES, room))


def call_activation_bytes(denoiser: Denoiser, calib: EvalSet, sigma: float) -> float:
    """Bytes one differentiable denoiser call saves for its backward pass, per noise: counted with
    saved_tensors_hooks on 2 and 4 calibration noises (the difference: what the batch adds, not the weights)."""
    saved = {}
    for m in (2, 4):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            # not t: a saved OUTPUT returned here would hold its own grad_fn, a cycle through C++ that Python's
            # gc cannot see (CIFAR size: 0.8 GB of activations kept for the rest of the compile); never unpacked
            return None

        n = min(m, len(calib))
        labels = None if calib.labels is None else calib.labels[:n]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            x = (calib.noise[:n] * sigma).requires_grad_(True)
            GradDenoiser(denoiser)(x, sigma, labels)
        saved[n] = total
    (n0, b0), (n1, b1) = min(saved.items()), max(saved.items())  # one item where the set has <= 2 noises
    return max(b1 - b0, 0) / max(n1 - n0, 1) if n1 > n0 else b1 / n1


def gradient_plan(per_call: float, state_bytes: int, nfe: int, chunk: int, budget: int) -> tuple[int, bool]:
    """(noises per chunk, recompute) for the global fit's backward pass within `budget` bytes: `per_call` saved
    bytes per noise and call, `state_bytes` one float64 state. Keeps every call's activations when a chunk of
    at least min(chunk, MIN_PLAIN_CHUNK) noises fits that way; else recomputes each call (one call's activations
    at a time) with the largest chunk that fits (at least 1)."""
    states, grads = nfe * STATE_COPIES * state_bytes, GRAD_COPIES * per_call
    plain = int(budget // max(nfe * per_call + grads + states, 1))
    if plain >= min(chunk, MIN_PLAIN_CHUNK):
        return min(chunk, plain), False
    return max(1, min(chunk, int(budget // max(per_call + grads + states, 1)))), True


def end_to_end_gradient(program: Program, denoiser: Denoiser, calib: EvalSet,
                        coefficients: Callable[[], list[torch.Tensor]], loss: str, chunk: int,
                        recompute: bool = False) -> float:
    """The calibration loss of `program` over all of `calib`, its gradient ACCUMULATED into the .grad of the
    leaves behind `coefficients()` (the per-step coefficient tensors, made anew for each chunk since a backward
    pass frees the graph that made them), `chunk` noises at a time: memory of one chunk. Returns the loss.
    `recompute`: each call recomputed in the backward pass (GradDenoiser). The per-sample RMSE is clamped
    before the root so that its gradient stays finite."""
    n, total = len(calib), 0.0
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        labels = None if calib.labels is None else calib.labels[part]
        x = sample_with_coefficients(program, denoiser, calib.noise[part], labels, coefficients(),
                                     recompute=recompute)
        err = ((x - calib.reference[part]) ** 2).reshape(x.shape[0], -1).mean(1)
        err = err.clamp_min(1e-30).sqrt()
        value = (err**2).sum() / n if loss == "mse" else err.sum() / n
        value.backward()
        total += float(value.detach())
    return total


def _unit_scales(program: Program, denoiser: Denoiser, calib: EvalSet, chunk: int) -> list[torch.Tensor]:
    """Per step, each basis term's RMS on the base trajectory of the first `chunk` calibration noises."""
    base = [torch.tensor(s.coefficients, dtype=torch.float64, device=denoiser.device) for s in program.steps]
    with torch.no_grad():
        rms: list = []
        n0 = min(len(calib), chunk)
        sample_with_coefficients(program, denoiser, calib.noise[:n0],
                                 None if calib.labels is None else calib.labels[:n0], base, rms)
    return [torch.tensor([max(v, 1e-12) for v in step_rms], dtype=torch.float64) for step_rms in rms]


# A fitted coefficient stays within LARGE_COEFFICIENT x the largest of its solver's base coefficients (at least 1)
# of its base value (`fit_global`). The compiled graph merges each update into one combination of the states and
# the denoiser outputs, where a large coefficient multiplies nearly equal tensors (an unbounded last step to sigma 0
# on gmm: -2094 x iPNDM's newest slope, x + 2094 (x - D); DEIS-3's: 7129), and float32 rounding of each is
# amplified as much. Bounded, on 8000 gmm test noises: iPNDM NFE 8 0.0349 (unbounded 0.0367), DEIS-3 NFE 7 0.0507
# (a penalty past the limit instead stalled L-BFGS at its base, 0.0953). `search_choice` runs a fit with a
# coefficient past LARGE_COEFFICIENT x its base's largest once more in float64 before shipping it.
LARGE_COEFFICIENT = 10.0


def largest_coefficient(program: Program) -> float:
    """The largest |coefficient| of `program` (0 without any)."""
    return max((abs(v) for step in program.coefficients() for v in step), default=0.0)


def coefficient_limit(base: Program) -> float:
    """LARGE_COEFFICIENT x the largest |coefficient| of `base`, a solver with its base coefficients (at least 1):
    how far a fit may move a coefficient from its base value, and past which `search_choice` checks a fit's
    float32 run."""
    return LARGE_COEFFICIENT * max(1.0, largest_coefficient(base))


def bounded_coefficients(origin: torch.Tensor, limit: float, v: torch.Tensor) -> torch.Tensor:
    """origin + limit * tanh(v / limit): v itself while |v| << limit, never `limit` or more from `origin` (a
    smooth bound: L-BFGS's curvature model holds everywhere)."""
    return origin + limit * torch.tanh(v / limit)


def _start_offsets(start: torch.Tensor, origin: torch.Tensor, limit: float) -> torch.Tensor:
    """The v of `bounded_coefficients` that gives `start` (clamped just inside the bound)."""
    ratio = ((start - origin) / limit).clamp(-1 + 1e-12, 1 - 1e-12)
    return limit * torch.atanh(ratio)


def fit_global(denoiser: Denoiser, program: Program, calib: EvalSet, loss: str = "mse", ridge: float = 1e-4,
               max_iter: int = 60, chunk: int = 128, deadline: float | None = None,
               on_eval: Callable[[int], None] | None = None) -> tuple[Program, dict]:
    """Fit every step's coefficients to the end-to-end error on `calib` (L-BFGS, strong Wolfe line search);
    `on_eval(evals)` after each evaluation (progress). `program` gives the starting coefficients: its solver's
    base ones, or an earlier fit's to continue.

    Parametrisation c = `bounded_coefficients`(c_base, coefficient_limit, v_start + u / s) with c_base the
    solver's base coefficients, v_start where the program's coefficients are and s the basis term's RMS on the
    starting trajectory (so that u is about the state change it causes) and penalty ridge * |u|^2 in the loss's
    units. Returns (program, info).
    """
    started = time.perf_counter()
    start = [torch.tensor(s.coefficients, dtype=torch.float64) for s in program.steps]
    solver_base = build_program(program.solver, program.sigmas, program.r)
    limit = coefficient_limit(solver_base)
    origin = [torch.tensor(s.coefficients, dtype=torch.float64) for s in solver_base.steps]
    base = [_start_offsets(c, o, limit) for c, o in zip(start, origin)]
    scale = _unit_scales(program, denoiser, calib, chunk)
    sizes = [len(b) for b in base]
    u = torch.zeros(sum(sizes), dtype=torch.float64, requires_grad=True)
    if u.numel() == 0:
        return program, {"iterations": 0, "seconds": 0.0}

    device = denoiser.device

    def coefs(u_vec):  # on the states' device (u stays on the CPU with L-BFGS; a no-op there)
        out, k = [], 0
        for o, b, s, n in zip(origin, base, scale, sizes):
            out.append(bounded_coefficients(o, limit, b + u_vec[k:k + n] / s).to(device))
            k += n
        return out

    state_bytes = 8 * math.prod(denoiser.shape)
    per_call = call_activation_bytes(denoiser, calib, float(program.sigmas[0]))
    budget = grad_memory_budget(device, float32_weight_bytes(denoiser.net))
    chunk, recompute = gradient_plan(per_call, state_bytes, program.nfe, chunk, budget)
    best = {"f": math.inf, "u": u.detach().clone()}
    evals = 0

    def closure():
        nonlocal evals
        if deadline is not None and time.perf_counter() > deadline and evals > 0:
            raise OutOfTime
        evals += 1
        opt.zero_grad()
        total = end_to_end_gradient(program, denoiser, calib, lambda: coefs(u), loss, chunk, recompute)
        penalty = ridge * (u**2).sum()
        penalty.backward()
        total += float(penalty.detach())
        if not math.isfinite(total):
            total = 1e30
        if total < best["f"]:
            best.update(f=total, u=u.detach().clone())
        if on_eval is not None:
            on_eval(evals)
        return total

    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-12)
    f0 = None
    try:
        f0 = closure()
        opt.step(closure)
        cut = False
    except OutOfTime:
        cut = True  # the deadline stopped the fit before it converged
    fitted = program.with_coefficients([c.detach().tolist() for c in coefs(best["u"])])
    release_free_memory()  # the backward passes' freed activations: not counted again by the scoring that follows
    return fitted, {"evals": evals, "loss_base": f0, "loss": best["f"], "seconds": round(time.perf_counter() - started, 2),
                    "cut": cut, "chunk": chunk, "recompute": recompute}
