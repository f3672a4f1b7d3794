"""The best sampler at a given NFE: learned time steps, end-to-end coefficient fits, and the `auto` search.

Everything here optimises or scores the END-TO-END error: the RMSE of the final samples against a
high-accuracy reference solution from the same noise (`reference_solution`), never a local per-step target.

- `learn_schedule`: the N+1 sigmas of a solver, in a monotone parametrisation (softmax-weighted gaps in
  sigma^(1/rho), rho = 7, endpoints fixed, so the Karras schedule is the all-zero point), fitted to the
  calibration noises by derivative-free Nelder-Mead (each evaluation is one sampling run; no gradient through
  the schedule-dependent solver weights is needed, and N - 1 <= ~10 parameters is where it works well).
  The time steps are constants of the program like the coefficients (LD3, ICLR 2025, fits them the same way
  against a teacher; we use the reference ODE solution as the teacher).
- `fit_global`: the per-step coefficients of an IIA program fitted to the end-to-end error by L-BFGS,
  backpropagating through the PyTorch sampler (the denoiser's own autograd), on unit-scaled coefficient
  offsets with a ridge toward the base solver.
- `auto_search`: for one NFE, candidates = solver families x final-step convention x schedule (Karras /
  learned) x coefficients (base / local IIA / global), scored on HELD-OUT noise by mean AND median per-sample
  error; a candidate is eligible only if it is no worse than its own base (same family and final step, Karras,
  base coefficients) in both; the best eligible one ships. `budget_s` bounds the search.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from iia.models.base import Denoiser

from .fit import HOLDOUT_SEED_OFFSET, CalibrationOptions, CalibrationResult, calibrate, draw_noise
from .sampling import (combine, finish_step, live_after, program_for, reference_solution, run_calls, sample,
                       start)
from .solvers import Program, build_program, get_solver, valid_nfe

FAMILIES = ("ipndm", "deis-3", "unipc-3", "dpm-solver++3m", "unipc-2", "deis-2")
RHO = 7.0


class SearchError(ValueError):
    pass


@dataclass
class EvalSet:
    """Noises (float64), labels and the reference solution from the same noises."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    reference: torch.Tensor

    def __len__(self) -> int:
        return self.noise.shape[0]


_REFERENCES: dict = {}  # (model, n, seed, steps) -> EvalSet: one process searching several NFEs pays once


def make_eval_set(denoiser: Denoiser, n: int, seed: int, reference_steps: int) -> EvalSet:
    """Noises for images seed..seed+n-1 and their reference solutions from sigma_max * noise, where every
    candidate of the search starts (Karras and learned schedules); memoised per model in this process."""
    key = (id(denoiser.net), repr(sorted(denoiser.identity.items())), n, seed, reference_steps)
    if key not in _REFERENCES:
        noise, lab = draw_noise(denoiser, n, seed)
        if len(_REFERENCES) >= 8:
            _REFERENCES.clear()
        _REFERENCES[key] = EvalSet(noise, lab, reference_solution(denoiser, noise, lab, reference_steps))
    return _REFERENCES[key]


def per_sample_rmse(program: Program, denoiser: Denoiser, es: EvalSet, chunk: int = 256,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[n] float64: RMSE over each final sample's elements against its reference (states in `dtype`)."""
    out = []
    for s in range(0, len(es), chunk):
        part = slice(s, s + chunk)
        labels = None if es.labels is None else es.labels[part]
        x = sample(program, denoiser, es.noise[part], labels, dtype=dtype).to(torch.float64)
        out.append(((x - es.reference[part]) ** 2).reshape(x.shape[0], -1).mean(1).sqrt())
    return torch.cat(out)


def summarize(err: torch.Tensor) -> dict:
    """rmse (of all elements), median and 90th percentile of the per-sample RMSE."""
    return {"rmse": float((err**2).mean().sqrt()), "median": float(err.median()),
            "p90": float(torch.quantile(err, 0.9))}


def _loss(err: torch.Tensor, kind: str) -> torch.Tensor:
    # "mse": mean squared error (its root is the reported RMSE); "l2": mean per-sample RMSE (less tail-driven)
    return (err**2).mean() if kind == "mse" else err.mean()


# ---------------------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True)
class ScheduleSpace:
    """Monotone sigmas from theta in R^(N-1): gaps in t = sigma^(1/rho) are softmax([0, theta]) of the span.

    final "sigma_min": N steps over N + 1 sigmas sigma_max = s_0 > ... > s_N = sigma_min (N gaps).
    final "zero": s_0 = sigma_max > ... > s_{N-1} >= sigma_min, then 0 (N - 1 gaps + the unused remainder down
    to sigma_min, so the last non-zero sigma is free too).
    """

    n_steps: int
    sigma_min: float
    sigma_max: float
    final: str
    rho: float = RHO  # the model's Karras exponent: theta = 0 is its Karras schedule

    @property
    def n_params(self) -> int:
        return self.n_steps - 1

    def karras_theta(self) -> list[float]:
        if self.final == "sigma_min":
            return [0.0] * self.n_params
        return [0.0] * (self.n_params - 1) + [-9.0]  # remainder weight ~1e-4 of a gap: Karras up to 1e-4

    def sigmas(self, theta) -> list[float]:
        logits = torch.cat([torch.zeros(1, dtype=torch.float64), torch.as_tensor(theta, dtype=torch.float64)])
        w = torch.softmax(logits, 0)
        t_max, t_min = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        n_points = self.n_steps + 1 if self.final == "sigma_min" else self.n_steps
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])[:n_points]
        t = t_max - (t_max - t_min) * cum
        sig = (t**self.rho).tolist()
        sig[0] = self.sigma_max
        if self.final == "sigma_min":
            sig[-1] = self.sigma_min
            return sig
        return sig + [0.0]


def schedule_space(denoiser: Denoiser, solver: str, nfe: int, final: str) -> ScheduleSpace:
    n = get_solver(solver).steps_for_nfe(nfe)
    return ScheduleSpace(n, denoiser.sigma_min, denoiser.sigma_max, final, getattr(denoiser, "rho", RHO))


class _OutOfTime(Exception):
    pass


def learn_schedule(denoiser: Denoiser, solver: str, nfe: int, final: str, calib: EvalSet, r: int = 1,
                   coefficients: list | None = None, loss: str = "mse", max_evals: int = 400,
                   deadline: float | None = None) -> tuple[list[float], dict]:
    """Fit the sigmas of `solver` at `nfe` to the end-to-end error on `calib` (Nelder-Mead from Karras).

    Returns (sigmas, info) with info = {evals, loss_karras, loss, seconds}. Stops at `deadline`
    (time.perf_counter() value) with the best point so far.
    """
    from scipy.optimize import minimize

    space = schedule_space(denoiser, solver, nfe, final)
    started = time.perf_counter()
    best = {"f": math.inf, "theta": space.karras_theta()}
    evals = 0

    def f(theta):
        nonlocal evals
        if deadline is not None and time.perf_counter() > deadline and evals > 0:
            raise _OutOfTime
        evals += 1
        program = build_program(solver, space.sigmas(theta), r)
        if coefficients is not None:
            program = program.with_coefficients(coefficients)
        try:
            value = float(_loss(per_sample_rmse(program, denoiser, calib), loss))
        except ValueError:  # a denoiser NaN on a degenerate grid
            value = math.inf
        if not math.isfinite(value):
            value = 1e30
        if value < best["f"]:
            best.update(f=value, theta=list(map(float, theta)))
        return value

    x0 = space.karras_theta()
    f0 = f(x0)
    cut = False  # the deadline stopped the search before it converged
    if space.n_params >= 1:
        simplex = [x0] + [[x + (0.7 if k == j else 0.0) for j, x in enumerate(x0)] for k in range(space.n_params)]
        try:
            minimize(f, x0, method="Nelder-Mead", options={
                "maxfev": max_evals, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-5 * f0, "adaptive": True})
        except _OutOfTime:
            cut = True
    info = {"evals": evals, "loss_karras": f0, "loss": best["f"], "seconds": round(time.perf_counter() - started, 2),
            "cut": cut}
    return space.sigmas(best["theta"]), info


# ---------------------------------------------------------------------------------------------------------
# End-to-end coefficient fit (backpropagation through the sampler)


class _GradDenoiser:
    """The denoiser as the interpreter calls it, D(x, sigma, labels), but differentiable (no torch.no_grad)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma: float, labels) -> torch.Tensor:
        sig = torch.full((x.shape[0],), float(sigma), dtype=torch.float32)
        args = [x.to(torch.float32), sig]
        if self.denoiser.conditional:
            args.append(self.denoiser.labels_or_error(labels, x.shape[0]))
        return self.denoiser.net(*args).to(torch.float64)


def sample_with_coefficients(program: Program, denoiser: Denoiser, noise: torch.Tensor, labels,
                             coefficients: list[torch.Tensor], basis_rms: list | None = None) -> torch.Tensor:
    """The interpreter's step-at-a-time executor with coefficient TENSORS (differentiable in them and through
    the denoiser); optionally records each basis term's RMS per step."""
    values = start(program, noise.to(torch.float64))
    live = live_after(program)
    grad_denoiser = _GradDenoiser(denoiser)
    for step, c in zip(program.steps, coefficients):
        run_calls(step, values, grad_denoiser, labels)
        new = combine(step.anchor, values)
        rms = []
        for j, (_, terms) in enumerate(step.basis):
            b = combine(terms, values)
            rms.append(float(b.detach().pow(2).mean().sqrt()))
            new = new + c[j] * b
        if basis_rms is not None:
            basis_rms.append(rms)
        finish_step(step, values, new, live[step.index])
    return values[program.output]


def fit_global(denoiser: Denoiser, program: Program, calib: EvalSet, loss: str = "mse", ridge: float = 1e-4,
               max_iter: int = 60, chunk: int = 128, deadline: float | None = None) -> tuple[Program, dict]:
    """Fit every step's coefficients to the end-to-end error on `calib` (L-BFGS, strong Wolfe line search).

    Parametrisation c = c_base + u / s with s the basis term's RMS on the base trajectory (so u is the
    state change it causes) and penalty ridge * |u|^2 in the loss's units. Returns (program, info).
    """
    started = time.perf_counter()
    base = [torch.tensor(s.coefficients, dtype=torch.float64) for s in program.steps]
    with torch.no_grad():
        rms: list = []
        n0 = min(len(calib), chunk)
        sample_with_coefficients(program, denoiser, calib.noise[:n0],
                                 None if calib.labels is None else calib.labels[:n0], base, rms)
    scale = [torch.tensor([max(v, 1e-12) for v in step_rms], dtype=torch.float64) for step_rms in rms]
    sizes = [len(b) for b in base]
    u = torch.zeros(sum(sizes), dtype=torch.float64, requires_grad=True)
    if u.numel() == 0:
        return program, {"iterations": 0, "seconds": 0.0}

    def coefs(u_vec):
        out, k = [], 0
        for b, s, n in zip(base, scale, sizes):
            out.append(b + u_vec[k:k + n] / s)
            k += n
        return out

    n = len(calib)
    parts = [slice(s, s + chunk) for s in range(0, n, chunk)]
    best = {"f": math.inf, "u": u.detach().clone()}
    evals = 0

    def closure():
        nonlocal evals
        if deadline is not None and time.perf_counter() > deadline and evals > 0:
            raise _OutOfTime
        evals += 1
        opt.zero_grad()
        total = 0.0
        for part in parts:
            labels = None if calib.labels is None else calib.labels[part]
            x = sample_with_coefficients(program, denoiser, calib.noise[part], labels, coefs(u))
            err = ((x - calib.reference[part]) ** 2).reshape(x.shape[0], -1).mean(1)
            err = err.clamp_min(1e-30).sqrt()
            value = (err**2).sum() / n if loss == "mse" else err.sum() / n
            value.backward()
            total += float(value.detach())
        penalty = ridge * (u**2).sum()
        penalty.backward()
        total += float(penalty.detach())
        if not math.isfinite(total):
            total = 1e30
        if total < best["f"]:
            best.update(f=total, u=u.detach().clone())
        return total

    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-12)
    f0 = None
    try:
        f0 = closure()
        opt.step(closure)
        cut = False
    except _OutOfTime:
        cut = True  # the deadline stopped the fit before it converged
    fitted = program.with_coefficients([c.detach().tolist() for c in coefs(best["u"])])
    return fitted, {"evals": evals, "loss_base": f0, "loss": best["f"], "seconds": round(time.perf_counter() - started, 2),
                    "cut": cut}


# ---------------------------------------------------------------------------------------------------------
# auto


@dataclass
class SearchOptions:
    budget_s: float = 180.0  # wall-clock bound of the whole search (references included)
    batch: int | None = None  # calibration noises for schedules and global fits (None: 512 analytic, 128 networks)
    families: tuple[str, ...] = FAMILIES
    finals: tuple[str, ...] = ("zero", "sigma_min")
    top_k: int = 2  # (family, final) pairs that get a learned schedule
    global_fits: int = 2  # global coefficient fits: the best learned schedule, the best Karras base, then more learned
    r: int = 1  # history terms of the global fit's basis
    loss: str = "mse"
    local: bool = True  # also score the paper's local IIA fit (families that support it, Karras)
    max_evals: int = 400  # Nelder-Mead evaluations per schedule

    def validate(self) -> None:
        if self.budget_s <= 0:
            raise SearchError(f"--budget must be > 0 seconds, got {self.budget_s}")
        if self.batch is not None and self.batch < 2:
            raise SearchError(f"search batch must be >= 2, got {self.batch}")
        if self.loss not in ("mse", "l2"):
            raise SearchError(f"search loss must be 'mse' or 'l2', got {self.loss!r}")
        for f in self.families:
            spec = get_solver(f)
            if spec.fitted or spec.nfe_rule != "one":
                raise SearchError(f"search family '{f}' must be a base solver with one denoiser call per step")


@dataclass
class Candidate:
    family: str
    final: str
    schedule: str  # karras | learned
    coefficients: str  # base | local | global
    program: Program
    calib_loss: float | None = None
    holdout: dict = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.family}/{self.final}/{self.schedule}/{self.coefficients}"


@dataclass
class SearchResult:
    program: Program
    chosen: Candidate
    candidates: list[Candidate]
    table: list[dict]
    seconds: float
    timings: dict


def _karras_program(denoiser, solver, nfe, final, r=1):
    return program_for(denoiser, solver, nfe, r, "karras", final)


def auto_search(denoiser: Denoiser, nfe: int, options: SearchOptions | None = None,
                calibration: CalibrationOptions | None = None, log: Callable[[str], None] | None = None) -> SearchResult:
    """Search for the best sampler at `nfe` (see the module docstring); returns the chosen program and the table."""
    opts = options or SearchOptions()
    opts.validate()
    cal = (calibration or CalibrationOptions()).resolved(denoiser)
    log = log or (lambda text: None)
    started = time.perf_counter()
    deadline = started + opts.budget_s
    timings: dict[str, float] = {}

    def lap(name, t0):
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 2)

    families = [f for f in opts.families if valid_nfe(f, nfe)]
    if not families:
        raise SearchError(f"no solver family can spend exactly NFE {nfe}")
    t0 = time.perf_counter()
    batch = opts.batch or (512 if denoiser.identity.get("kind") == "gmm" else 128)
    calib = make_eval_set(denoiser, batch, cal.seed, cal.reference_steps)
    hold = make_eval_set(denoiser, cal.holdout, cal.seed + HOLDOUT_SEED_OFFSET, cal.reference_steps)
    lap("references", t0)
    log(f"  references: {batch} calibration + {len(hold)} held-out noises, {cal.reference_steps} Heun steps "
        f"({timings['references']:.1f} s)")

    # 1. every base on the Karras schedule
    t0 = time.perf_counter()
    cands: list[Candidate] = []
    for fam in families:
        for final in opts.finals:
            prog = _karras_program(denoiser, fam, nfe, final)
            c = Candidate(fam, final, "karras", "base", prog)
            c.calib_loss = float(_loss(per_sample_rmse(prog, denoiser, calib), opts.loss))
            cands.append(c)
    lap("bases", t0)
    bases = sorted(cands, key=lambda c: c.calib_loss)
    # keep time for what runs after the searches: the local fit (~M + 1 calls per step on its batch) and scoring
    # every candidate on the held-out noises, estimated from what one calibration evaluation just cost
    per_eval = timings["bases"] / max(len(cands), 1)
    n_final = len(cands) + opts.top_k + opts.global_fits + int(opts.local)
    reserve = per_eval * (len(hold) / len(calib) * n_final + (cal.M + 1) * cal.batch / len(calib) * int(opts.local))
    deadline = max(deadline - reserve, time.perf_counter())
    discrete = denoiser.sigma_table is not None

    # 2. learned schedules for the top-k bases (the remaining budget is shared; ~25% kept for fits and scoring)
    learned: list[Candidate] = []
    if not discrete:
        top = bases[:opts.top_k]
        for k, b in enumerate(top):
            remaining = deadline - time.perf_counter()
            share = remaining * 0.55 / (len(top) - k)
            t0 = time.perf_counter()
            sig, info = learn_schedule(denoiser, b.family, nfe, b.final, calib, loss=opts.loss,
                                       max_evals=opts.max_evals, deadline=time.perf_counter() + share)
            c = Candidate(b.family, b.final, "learned", "base", build_program(b.family, sig), info["loss"],
                          seconds=info["seconds"], note=f"{info['evals']} evals")
            learned.append(c)
            lap("schedules", t0)
            log(f"  schedule {b.family}/{b.final}: calibration loss {info['loss_karras']:.4g} -> {info['loss']:.4g} "
                f"({info['evals']} evals, {info['seconds']:.1f} s{', cut short by the budget' if info['cut'] else ''})")
    else:
        log("  learned schedules skipped: the model is discrete (its sigmas are a table of training timesteps)")
    cands += learned

    # 3. global coefficient fits: the best learned schedules and the best Karras base
    ranked = sorted(learned, key=lambda c: c.calib_loss)
    to_fit = (ranked[:1] + bases[:1] + ranked[1:])[:opts.global_fits]
    for k, c in enumerate(to_fit):
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            log(f"  global fits: {len(to_fit) - k} of {len(to_fit)} skipped, the budget is spent (raise --budget)")
            break
        t0 = time.perf_counter()
        fitted_solver = "iia-" + c.family
        prog = build_program(fitted_solver, c.program.sigmas, opts.r)
        # the base coefficients of the iia program are the family's (all extra ones 0)
        prog, info = fit_global(denoiser, prog, calib, opts.loss,
                                deadline=time.perf_counter() + remaining * 0.6 / (len(to_fit) - k))
        cands.append(Candidate(c.family, c.final, c.schedule, "global", prog, info["loss"], seconds=info["seconds"],
                               note=f"{info['evals']} evals"))
        lap("global fits", t0)
        log(f"  global fit {c.family}/{c.final}/{c.schedule}: calibration loss {info['loss_base']:.4g} -> "
            f"{info['loss']:.4g} ({info['evals']} evals, {info['seconds']:.1f} s"
            f"{', cut short by the budget' if info.get('cut') else ''})")

    # 4. the paper's local fit on the best Karras base that supports it
    if opts.local and time.perf_counter() >= deadline:
        log("  local IIA fit skipped: the budget is spent (raise --budget)")
    elif opts.local:
        for b in bases:
            if b.final == "zero":
                t0 = time.perf_counter()
                res = calibrate(denoiser, "iia-" + b.family, nfe,
                                CalibrationOptions(**{**vars(cal), "guard": False, "r": opts.r}))
                cands.append(Candidate(b.family, b.final, "karras", "local", res.program, seconds=round(res.seconds, 2)))
                lap("local fit", t0)
                break

    # 5. score everything on held-out noise; eligible = no worse than its own base in RMSE and median
    t0 = time.perf_counter()
    for c in cands:
        # float32 states, as the compiled graph runs: a fit whose large coefficients amplify rounding pays for it
        c.holdout = summarize(per_sample_rmse(c.program, denoiser, hold, dtype=torch.float32))
    lap("held-out scoring", t0)
    base_of = {(c.family, c.final): c for c in cands if c.schedule == "karras" and c.coefficients == "base"}
    best_rmse = min(c.holdout["rmse"] for c in cands)
    best_median = min(c.holdout["median"] for c in cands)
    for c in cands:
        b = base_of[(c.family, c.final)].holdout
        c.holdout["eligible"] = c.holdout["rmse"] <= b["rmse"] and c.holdout["median"] <= b["median"]
        # geometric mean of the two ratios to the best candidate: scale-free, neither statistic dominates
        c.holdout["score"] = math.sqrt(c.holdout["rmse"] / best_rmse * c.holdout["median"] / best_median)
    eligible = [c for c in cands if c.holdout["eligible"]]
    chosen = min(eligible, key=lambda c: c.holdout["score"])
    table = [{"candidate": c.label, "solver": c.program.solver, "family": c.family, "final": c.final,
              "schedule": c.schedule, "coefficients": c.coefficients, "calib_loss": c.calib_loss,
              "seconds": c.seconds, "note": c.note, "chosen": c is chosen, **c.holdout} for c in cands]
    return SearchResult(chosen.program, chosen, cands, table, round(time.perf_counter() - started, 2), timings)


def format_table(table: list[dict]) -> str:
    lines = [f"{'candidate':<40} {'held-out rmse':>13} {'median':>9} {'score':>7}  eligible"]
    for row in sorted(table, key=lambda r: r["score"]):
        mark = "  <- shipped" if row["chosen"] else ""
        lines.append(f"{row['candidate']:<40} {row['rmse']:>13.5f} {row['median']:>9.5f} {row['score']:>7.3f}  "
                     f"{'yes' if row['eligible'] else 'no'}{mark}")
    return "\n".join(lines)


def to_calibration_result(result: SearchResult, calibration: CalibrationOptions, options: SearchOptions,
                          denoiser: Denoiser) -> CalibrationResult:
    """The chosen program as a CalibrationResult (for the coefficient artifact), the table in `search`."""
    chosen = result.chosen
    base = build_program(chosen.program.solver, chosen.program.sigmas, chosen.program.r)
    res = CalibrationResult(chosen.program, chosen.program, base, calibration.resolved(denoiser))
    base_row = next(r for r in result.table if r["family"] == chosen.family and r["final"] == chosen.final
                    and r["schedule"] == "karras" and r["coefficients"] == "base")
    res.guard = {"holdout": int(calibration.resolved(denoiser).holdout), "rmse_base": base_row["rmse"],
                 "median_base": base_row["median"], "rmse_chosen": chosen.holdout["rmse"],
                 "median_chosen": chosen.holdout["median"], "decision": f"auto: {chosen.label}"}
    res.search = {"nfe": chosen.program.nfe, "chosen": chosen.label, "seconds": result.seconds,
                  "timings_s": result.timings, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                           for k, v in vars(options).items()},
                  "candidates": result.table}
    res.seconds = result.seconds
    return res
