"""Solvers as data: each step is denoiser calls plus ONE linear combination with coefficients.

A sampler is a `Program`: a prelude `z0 = sigma_0 * noise`, then `Step`s. A step holds
  - `ops`: denoiser calls (`Denoise`) and fixed linear combinations (`Combine`, e.g. Heun's predictor),
  - the update `z_{i+1} = anchor + sum_j c_j * basis_j`, each basis term a named linear combination of
    values computed so far (current state, denoiser outputs, history), with `c` the step's coefficients.
The base solver is one coefficient vector; IIA fits another. `Program.plan()` is the flat form every executor
runs (`iia.runtime.program`: the op types, liveness, the linear form, program.json and `execute` live there);
the PyTorch interpreter (`sampling.py`), the calibrator (`fit.py`), the search and the ONNX emitter
(`iia.compiler`) all read this one description.

Here: the EDM, DDIM, PNDM and DPM-Solver++(2M) families and the solver registry; `Step`/`Program` are in
`steps.py`, the DEIS / DPM-Solver++(3M) / UniPC families in `multistep.py`.

Value names: `z{i}` states, `D{i}` = D(z_i; t_i), `zt{i}` Heun's predicted state at t_i and `Dt{i}` its
denoised value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from iia.runtime.program import Combine, Denoise, Op, Terms, linear_form, merge_terms

from .multistep import deis_step, dpmpp_anchor, dpmpp_step, unipc_step
from .steps import Program, Step, slope

__all__ = ["Combine", "Denoise", "Program", "SOLVERS", "DEFINITION_VERSION", "SolverSpec", "Step", "base_program_for_grid",
           "build_program", "check_user_solvers", "get_solver", "linear_name", "merge_terms", "user_solver", "user_solvers", "valid_nfe"]


# ---------------------------------------------------------------------------------------------------------
# EDM family (sigma = t, alpha = 1): Heun with Euler predictor; the last step (to sigma = 0) is Euler.


def _heun_ops(i: int, t: float, t_next: float) -> tuple[Op, ...]:
    h = t_next - t
    ops: list[Op] = [Denoise(f"D{i}", f"z{i}", t)]
    if t_next > 0:
        # Euler predictor z~_{i+1} = z_i + h (z_i - D_i) / t_i, then D(z~_{i+1}; t_{i+1}).
        ops.append(Combine(f"zt{i + 1}", ((f"z{i}", 1.0 + h / t), (f"D{i}", -h / t))))
        ops.append(Denoise(f"Dt{i + 1}", f"zt{i + 1}", t_next))
    return tuple(ops)


def _euler_to_zero(i: int, t: float) -> Step:
    # z_N = z_i + (0 - t)(z_i - D_i)/t = D_i: never fitted.
    return Step(i, t, 0.0, _heun_ops(i, t, 0.0), ((f"z{i}", 1.0),), (("eps0", ((f"z{i}", 1.0), (f"D{i}", -1.0))),),
                (-1.0,), f"z{i + 1}", False)


def iia_edm_step(i: int, sigmas: Sequence[float], r: int) -> Step:
    """Camera-ready IIA-EDM: z_{i+1} = z_i + sum_k b^eps_k (z_{i-k} - D_{i-k}) + b^D_k (D_{i-k} - Dt_{i-k+1}).

    Heun is b^eps_0 = h/t_i, b^D_0 = h/(2 t_{i+1}) and all history coefficients 0 (Lemma 1).
    """
    t, t_next = sigmas[i], sigmas[i + 1]
    if t_next == 0:
        return _euler_to_zero(i, t)
    h = t_next - t
    basis, coefficients = [], []
    for k in range(min(r, i) + 1):
        j = i - k
        basis.append((f"eps{k}", ((f"z{j}", 1.0), (f"D{j}", -1.0))))
        basis.append((f"dD{k}", ((f"D{j}", 1.0), (f"Dt{j + 1}", -1.0))))
        coefficients += [h / t, h / (2 * t_next)] if k == 0 else [0.0, 0.0]
    return Step(i, t, t_next, _heun_ops(i, t, t_next), ((f"z{i}", 1.0),), tuple(basis), tuple(coefficients),
                f"z{i + 1}", True)


def heun_increment(j: int, sigmas: Sequence[float]) -> Terms:
    """Heun's increment of step j: h_j (0.5 (z_j - D_j)/t_j + 0.5 (z~_{j+1} - Dt_{j+1})/t_{j+1})."""
    t, t_next = sigmas[j], sigmas[j + 1]
    h = t_next - t
    a, b = h / (2 * t), h / (2 * t_next)
    return ((f"z{j}", a), (f"D{j}", -a), (f"zt{j + 1}", b), (f"Dt{j + 1}", -b))


def biia_edm_step(i: int, sigmas: Sequence[float], r: int) -> Step:
    """Basic IIA (eq. 11): z_{i+1} = z_i + sum_k gamma_k Delta_{i-k}, Delta_j Heun's increment of step j."""
    t, t_next = sigmas[i], sigmas[i + 1]
    if t_next == 0:
        return _euler_to_zero(i, t)
    basis = tuple((f"heun{k}", heun_increment(i - k, sigmas)) for k in range(min(r, i) + 1))
    coefficients = tuple(1.0 if k == 0 else 0.0 for k in range(len(basis)))
    return Step(i, t, t_next, _heun_ops(i, t, t_next), ((f"z{i}", 1.0),), basis, coefficients, f"z{i + 1}", True)


# ---------------------------------------------------------------------------------------------------------
# DDIM family (alpha = 1): z_{i+1} = x0_i + sigma_{i+1} eps_i, i.e. Euler in x.


def ddim_update(i: int, sigmas: Sequence[float]) -> Terms:
    t, t_next = sigmas[i], sigmas[i + 1]
    ratio = t_next / t
    return ((f"z{i}", ratio), (f"D{i}", 1.0 - ratio))


def iia_ddim_step(i: int, sigmas: Sequence[float], r: int) -> Step:
    """Eq. 22: DDIM + phi_0 (x0_i - x0_{i-1}) + phi_1 (eps_i - eps_{i-1}); eps = (z - D) / sigma."""
    t, t_next = sigmas[i], sigmas[i + 1]
    basis = []
    if t_next > 0:
        for k in range(1, min(r, i) + 1):
            a, b = i - k + 1, i - k  # consecutive pair of earlier evaluations
            ta, tb = sigmas[a], sigmas[b]
            basis.append((f"dx0_{k}", ((f"D{a}", 1.0), (f"D{b}", -1.0))))
            basis.append((f"deps_{k}", ((f"z{a}", 1 / ta), (f"D{a}", -1 / ta), (f"z{b}", -1 / tb), (f"D{b}", 1 / tb))))
    return Step(i, t, t_next, (Denoise(f"D{i}", f"z{i}", t),), ddim_update(i, sigmas), tuple(basis),
                (0.0,) * len(basis), f"z{i + 1}", t_next > 0 and bool(basis))


# ---------------------------------------------------------------------------------------------------------
# PNDM family in x-space (alpha = 1): Adams-Bashforth on d = (z - D) / sigma, the ODE's dz/dsigma.
# With alpha = 1, PNDM's transfer with a combined eps is exactly this Euler-form update.

AB_WEIGHTS = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _multistep_step(i: int, sigmas: Sequence[float], r: int, order: int, ops: tuple[Op, ...],
                    first: Terms | None = None) -> Step:
    """z_{i+1} = z_i + h sum_k w_k d_{i-k}; basis h d_{i-k} for k < max(order, r + 1) (extra ones start at 0)."""
    t, t_next = sigmas[i], sigmas[i + 1]
    h = t_next - t
    if first is not None:  # S-PNDM's first step is Heun: one basis term, its increment
        return Step(i, t, t_next, ops, ((f"z{i}", 1.0),), (("heun0", first),), (1.0,), f"z{i + 1}", t_next > 0)
    weights = AB_WEIGHTS[order - 1]
    n_terms = min(max(order, r + 1), i + 1)
    basis = tuple((f"hd{k}", tuple((n, h * w) for n, w in slope(i - k, sigmas))) for k in range(n_terms))
    coefficients = tuple(weights[k] if k < len(weights) else 0.0 for k in range(n_terms))
    return Step(i, t, t_next, ops, ((f"z{i}", 1.0),), basis, coefficients, f"z{i + 1}", t_next > 0)


def ipndm_step(i: int, sigmas: Sequence[float], r: int) -> Step:
    """iPNDM: Adams-Bashforth with order ramping 1, 2, 3, 4 (one denoiser call per step)."""
    return _multistep_step(i, sigmas, r, min(i + 1, 4), (Denoise(f"D{i}", f"z{i}", sigmas[i]),))


def spndm_step(i: int, sigmas: Sequence[float], r: int) -> Step:
    """S-PNDM: a Heun first step (2 calls), then second-order Adams-Bashforth (3 d_i - d_{i-1}) / 2."""
    if i == 0 and sigmas[1] > 0:
        return _multistep_step(0, sigmas, r, 1, _heun_ops(0, sigmas[0], sigmas[1]), first=heun_increment(0, sigmas))
    return _multistep_step(i, sigmas, r, min(i + 1, 2), (Denoise(f"D{i}", f"z{i}", sigmas[i]),))


def dpmpp_2m_step(i: int, sigmas: Sequence[float], r: int) -> Step:
    """DPM-Solver++(2M) in log-sigma (data prediction, `dpmpp_weights` order 2), first order on the first step
    and the step to sigma = 0: the peer baseline (no basis, never fitted)."""
    t, t_next = sigmas[i], sigmas[i + 1]
    anchor = dpmpp_anchor(i, sigmas, 1 if i == 0 else 2)
    return Step(i, t, t_next, (Denoise(f"D{i}", f"z{i}", t),), anchor, (), (), f"z{i + 1}", False)


# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverSpec:
    name: str
    nfe_rule: str  # "heun": NFE = 2N - 1 (odd); "one": NFE = N; "heun-first": NFE = N + 1
    build_step: Callable[[int, Sequence[float], int], Step]
    fitted: bool  # IIA variant: coefficients are fitted by calibration
    base: str  # the base solver this one reduces to with default coefficients
    fine: str  # the family's fine integrator for the calibration target: "edm" (Heun) or "ddim"
    fixed_r: int | None = None  # base solvers ignore r
    search_only: bool = False  # fitted only by the auto search's global fit (no local fit): not a --solver choice

    def steps_for_nfe(self, nfe: int) -> int:
        if self.nfe_rule == "heun":
            if nfe < 3 or nfe % 2 == 0:
                raise ValueError(f"solver '{self.name}' needs an odd NFE >= 3 (Heun: NFE = 2 * steps - 1), got {nfe}")
            return (nfe + 1) // 2
        if self.nfe_rule == "heun-first":
            if nfe < 3:
                raise ValueError(f"solver '{self.name}' needs NFE >= 3 (a Heun first step, then one call a step), got {nfe}")
            return nfe - 1
        if nfe < 2:
            raise ValueError(f"solver '{self.name}' needs NFE >= 2, got {nfe}")
        return nfe


SOLVERS: dict[str, SolverSpec] = {
    "edm": SolverSpec("edm", "heun", iia_edm_step, False, "edm", "edm", fixed_r=0),
    "biia-edm": SolverSpec("biia-edm", "heun", biia_edm_step, True, "edm", "edm"),
    "iia-edm": SolverSpec("iia-edm", "heun", iia_edm_step, True, "edm", "edm"),
    "ddim": SolverSpec("ddim", "one", iia_ddim_step, False, "ddim", "ddim", fixed_r=0),
    "iia-ddim": SolverSpec("iia-ddim", "one", iia_ddim_step, True, "ddim", "ddim"),
    "ipndm": SolverSpec("ipndm", "one", ipndm_step, False, "ipndm", "edm", fixed_r=0),
    "iia-ipndm": SolverSpec("iia-ipndm", "one", ipndm_step, True, "ipndm", "edm"),
    "spndm": SolverSpec("spndm", "heun-first", spndm_step, False, "spndm", "edm", fixed_r=0),
    "iia-spndm": SolverSpec("iia-spndm", "heun-first", spndm_step, True, "spndm", "edm"),
    "dpm-solver++": SolverSpec("dpm-solver++", "one", dpmpp_2m_step, False, "dpm-solver++", "ddim", fixed_r=0),
}


# Bump when any solver's steps, basis terms or their order change: coefficient files and cached calibrations
# record it, and a file written under another definition is refused instead of read with a wrong meaning.
DEFINITION_VERSION = 2


def get_solver(name: str) -> SolverSpec:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver '{name}': choose one of {', '.join(user_solvers())}") from None


def valid_nfe(solver: str, nfe: int) -> bool:
    """Whether `solver` can spend exactly `nfe` denoiser calls (see SolverSpec.steps_for_nfe)."""
    try:
        get_solver(solver).steps_for_nfe(nfe)
        return True
    except ValueError:
        return False


def build_program(solver: str, sigmas: Sequence[float], r: int = 1) -> Program:
    """The solver's program over a schedule, with the base solver's coefficients."""
    spec = get_solver(solver)
    if r < 0:
        raise ValueError(f"history r must be >= 0, got {r}")
    r_used = spec.fixed_r if spec.fixed_r is not None else r
    sigmas = tuple(float(s) for s in sigmas)
    steps = tuple(spec.build_step(i, sigmas, r_used) for i in range(len(sigmas) - 1))
    return Program(solver, sigmas, steps, r_used)


def check_history(solver: str, nfe: int, r: int) -> None:
    """ValueError naming --r when `r` history terms would not shape `solver`'s fit at `nfe` as asked: its basis
    (every step's labels) is the same with one term fewer (at 0: with one more). iPNDM's basis holds its order's
    derivatives at any r below 4 (tester-42: --r 0, 1, 2 fitted the same coefficients and recorded three r's); at
    NFE 5 iia-edm's 3 steps have at most 2 earlier terms, so --r 3 is --r 2."""
    spec = get_solver(solver)
    if not spec.fitted or spec.fixed_r is not None:
        return
    n = spec.steps_for_nfe(nfe)
    sigmas = [float(n + 1 - i) for i in range(n + 1)]  # the labels do not depend on the grid

    def basis(history: int) -> tuple:
        return tuple(tuple(label for label, _ in step.basis) for step in build_program(solver, sigmas, history).steps)

    mine = basis(r)
    if mine != basis(r - 1 if r else 1):
        return
    same = [h for h in range(max(r, n) + 2) if basis(h) == mine]
    if same[-1] == max(r, n) + 1:  # every earlier step is used: more terms change nothing
        said = f"--r {same[0]} already uses every earlier step"
    else:
        said = f"--r {same[0]} to {same[-1]} give the same basis (--r {same[-1] + 1} adds a term)"
    raise ValueError(f"--r {r} does not shape --solver {solver}'s fit at NFE {nfe}: {said}; leave --r out or give "
                     f"one that changes the basis")


def base_program_for_grid(family: str, sigmas: Sequence[float]) -> Program:
    """The family's base solver over an arbitrary grid (the fine integrator, the reference solution)."""
    return build_program("edm" if family == "edm" else "ddim", sigmas)


for _name, _spec in {
    "deis-2": ("one", deis_step(2)), "deis-3": ("one", deis_step(3)),
    "dpm-solver++3m": ("one", dpmpp_step(3)),
    "unipc-2": ("one", unipc_step(2)), "unipc-3": ("one", unipc_step(3)),
}.items():
    SOLVERS[_name] = SolverSpec(_name, _spec[0], _spec[1], False, _name, "edm", fixed_r=0)
    # IIA variant: the correction basis with r history terms (UniPC's steps integrate from the corrected state)
    SOLVERS["iia-" + _name] = SolverSpec("iia-" + _name, _spec[0], _spec[1], True, _name, "edm")


# ---------------------------------------------------------------------------------------------------------
# The linear form as a solver, 'iia-linear-<family>' for the one-call families: step i calls D_i = D(z_i; t_i)
# and sets z_{i+1} = anchor + sum_j c_j basis_j with the basis noise, D_0, ..., D_i (each state any combination
# of the noise and the denoiser outputs so far: the widest sampler with these calls) and the anchor the
# family's own z_{i+1} on this schedule (its row of `linear_form`), so the base coefficients are all 0 and the
# base program is the family's. The auto search fits its lead in this form beside the family's basis
# (SearchOptions.basis: neither wins everywhere; digits NFE 9 0.66-0.89x the family fit's RMSE, gmm NFE 9 1.3x).
LINEAR_PREFIX = "iia-linear-"


@lru_cache(maxsize=64)
def _base_rows(family: str, sigmas: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """Row k: z_k of the family's base program on `sigmas` over [noise, D_0, ...] (k = 1..N, z_N its output)."""
    state, calls_at, out, _ = linear_form(build_program(family, sigmas).plan())
    if len(calls_at) != len(sigmas) - 1 or any(a != b for a, b in zip(calls_at, sigmas)):
        raise ValueError(f"solver '{family}' does not call the denoiser once at each sigma: no linear form")
    return tuple(tuple(float(w) for w in row) for row in (*state[1:], out))


def linear_step(family: str) -> Callable[[int, Sequence[float], int], Step]:
    """The step builder of LINEAR_PREFIX + family (r unused: the basis is every value so far)."""
    def build(i: int, sigmas: Sequence[float], r: int) -> Step:
        row = _base_rows(family, tuple(float(s) for s in sigmas))[i]
        names = ["noise"] + [f"D{j}" for j in range(i + 1)]
        anchor = tuple((name, w) for name, w in zip(names, row) if w != 0.0)
        basis = tuple((name, ((name, 1.0),)) for name in names)
        return Step(i, sigmas[i], sigmas[i + 1], (Denoise(f"D{i}", f"z{i}", sigmas[i]),), anchor, basis,
                    (0.0,) * len(names), f"z{i + 1}", True)
    return build


def linear_name(family: str) -> str | None:
    """The linear-form solver of `family`, or None where it has none (more than one call per step)."""
    name = LINEAR_PREFIX + family
    return name if name in SOLVERS else None


for _family in [f for f, spec in SOLVERS.items() if not spec.fitted and spec.nfe_rule == "one"]:
    SOLVERS[LINEAR_PREFIX + _family] = SolverSpec(LINEAR_PREFIX + _family, "one", linear_step(_family), True, _family,
                                                  SOLVERS[_family].fine, fixed_r=0, search_only=True)


def user_solver(name: str) -> SolverSpec:
    """`get_solver` for a solver a user names: ValueError for an unknown or search-only one."""
    spec = get_solver(name)
    if spec.search_only:
        raise ValueError(f"solver '{name}' is fitted only by the auto search (its global fits): choose one of "
                         f"{', '.join(user_solvers())}")
    return spec


def check_user_solvers(names: Sequence[str], flag: str, allow_auto: bool = False) -> None:
    """`user_solver` for each of `names` ('auto' passes where `allow_auto`): ValueError naming `flag` and the
    solver (a CLI's check before any work)."""
    for name in names:
        if not (allow_auto and name == "auto"):
            try:
                user_solver(name)
            except ValueError as err:
                raise ValueError(f"{flag} {name}: {err}{', or auto' if allow_auto else ''}") from None


def user_solvers(fitted: bool | None = None) -> list[str]:
    """The solvers a user may name (`fitted`: only IIA variants / only base solvers), in registry order."""
    return [n for n, s in SOLVERS.items() if not s.search_only and (fitted is None or s.fitted == fitted)]
