"""Solvers as data: each step is denoiser calls plus ONE linear combination with coefficients.

A sampler is a `Program`: a prelude `z0 = sigma_0 * noise`, then `Step`s. A step holds
  - `ops`: denoiser calls (`Denoise`) and fixed linear combinations (`Combine`, e.g. Heun's predictor),
  - the update `z_{i+1} = anchor + sum_j c_j * basis_j`, each basis term a named linear combination of
    values computed so far (current state, denoiser outputs, history), with `c` the step's coefficients.
The base solver is one coefficient vector; IIA fits another. `Program.plan()` is the flat form every executor
runs (`iia.runtime.program`: the op types, liveness, the linear form, program.json and `execute` live there);
the PyTorch interpreter (`sampling.py`), the calibrator (`fit.py`), the search and the ONNX emitter
(`iia.compiler`) all read this one description.

Value names: `z{i}` states, `D{i}` = D(z_i; t_i), `zt{i}` Heun's predicted state at t_i and `Dt{i}` its
denoised value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from iia.runtime.program import Combine, Denoise, Op, Plan, Terms, Update, merge_terms


@dataclass(frozen=True)
class Step:
    index: int
    sigma_from: float
    sigma_to: float
    ops: tuple[Op, ...]
    anchor: Terms
    basis: tuple[tuple[str, Terms], ...]  # (label, terms) per coefficient
    coefficients: tuple[float, ...]
    out: str
    fittable: bool  # IIA may fit this step (never the step to sigma = 0)
    state: str = ""  # the state this step integrates from (default z{index}); the fitter's fine target starts here

    def __post_init__(self):
        if not self.state:
            object.__setattr__(self, "state", f"z{self.index}")

    def update(self) -> Update:
        """The step's update anchor + sum c_j basis_j, its coefficients kept apart (fit and search vary them)."""
        return Update(self.out, self.anchor, tuple(t for _, t in self.basis), self.coefficients)

    def with_coefficients(self, coefficients: Sequence[float]) -> "Step":
        if len(coefficients) != len(self.basis):
            raise ValueError(
                f"step {self.index} takes {len(self.basis)} coefficients ({', '.join(l for l, _ in self.basis)}), "
                f"got {len(coefficients)}"
            )
        return replace(self, coefficients=tuple(float(c) for c in coefficients))


@dataclass(frozen=True)
class Program:
    solver: str
    sigmas: tuple[float, ...]
    steps: tuple[Step, ...]
    r: int

    @property
    def prelude(self) -> Combine:
        # The graph input is standard-normal noise; the sampler scales it to sigma_max.
        return Combine("z0", (("noise", self.sigmas[0]),))

    @property
    def output(self) -> str:
        return self.steps[-1].out

    def plan(self) -> Plan:
        """The program as the runtime's flat plan (`iia.runtime.program`): what every executor runs."""
        ops: list[Op] = [self.prelude]
        for step in self.steps:
            ops.extend(step.ops + (step.update(),))
        return Plan(tuple(ops), self.output)

    def ops(self) -> list[Op]:
        """The ops with every update merged into one combination (what the graph and program.json compute)."""
        return list(self.plan().flat().ops)

    @property
    def nfe(self) -> int:
        return sum(isinstance(op, Denoise) for step in self.steps for op in step.ops)

    def coefficients(self) -> list[list[float]]:
        return [list(step.coefficients) for step in self.steps]

    def with_coefficients(self, coefficients: Sequence[Sequence[float]]) -> "Program":
        if len(coefficients) != len(self.steps):
            raise ValueError(f"{self.solver} has {len(self.steps)} steps, got coefficients for {len(coefficients)}")
        return replace(self, steps=tuple(s.with_coefficients(c) for s, c in zip(self.steps, coefficients)))


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


def slope(j: int, sigmas: Sequence[float]) -> Terms:
    """d_j = (z_j - D_j) / t_j."""
    return ((f"z{j}", 1.0 / sigmas[j]), (f"D{j}", -1.0 / sigmas[j]))


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
    anchor = _dpmpp_anchor(i, sigmas, 1 if i == 0 else 2)
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
        raise ValueError(f"unknown solver '{name}': choose one of {', '.join(SOLVERS)}") from None


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


def base_program_for_grid(family: str, sigmas: Sequence[float]) -> Program:
    """The family's base solver over an arbitrary grid (the fine integrator, the reference solution)."""
    return build_program("edm" if family == "edm" else "ddim", sigmas)


# ---------------------------------------------------------------------------------------------------------
# Multistep exponential-integrator families, written in x-space (alpha = 1, sigma = t, lambda = -log sigma)
# exactly as diffusers' schedulers run them in VP space (dividing their update by alpha_{i+1} gives ours):
# DEIS (tAB, log-rho Lagrange basis), DPM-Solver++(3M) and UniPC (B(h) = expm1(-h), "bh2", data prediction).
# Order ramp as diffusers with lower_order_final: step i has order <= i + 1, the last step order 1 and the
# one before <= 2 when there are fewer than 15 steps (UniPC: order <= N - i always); a step to sigma = 0 is
# first order. Their IIA basis is a generic correction (all coefficients 0 = the base solver):
#   eps0 = h/t (x - D_i) (an Euler increment) and dD_k = (1 - t'/t) (D_i - D_{i-k}), k = 1..min(i, r).


def _order(i: int, n_steps: int, t_next: float, max_order: int) -> int:
    order = min(max_order, i + 1)
    if t_next == 0 or (n_steps < 15 and i == n_steps - 1):
        order = 1
    elif n_steps < 15 and i == n_steps - 2:
        order = min(order, 2)
    return order


def _correction_basis(i: int, sigmas: Sequence[float], r: int, start: str) -> tuple[tuple[str, Terms], ...]:
    t, t_next = sigmas[i], sigmas[i + 1]
    basis = [("eps0", ((start, (t_next - t) / t), (f"D{i}", -(t_next - t) / t)))]
    for k in range(1, min(i, r) + 1):
        w = 1.0 - t_next / t
        basis.append((f"dD{k}", ((f"D{i}", w), (f"D{i - k}", -w))))
    return tuple(basis)


def _linear_step(i: int, sigmas: Sequence[float], r: int, ops: tuple[Op, ...], anchor: Terms, start: str) -> Step:
    basis = _correction_basis(i, sigmas, r, start)
    return Step(i, sigmas[i], sigmas[i + 1], ops, anchor, basis, (0.0,) * len(basis), f"z{i + 1}", sigmas[i + 1] > 0,
                state=start)


def _deis_ind2(t: float, b: float, c: float) -> float:
    # integral of (log tau - log c) / (log b - log c) d tau, evaluated at tau = t
    lt, lb, lc = math.log(t), math.log(b), math.log(c)
    return t * (lt - lc - 1.0) / (lb - lc)


def _deis_ind3(t: float, b: float, c: float, d: float) -> float:
    # integral of (log tau - log c)(log tau - log d) / ((log b - log c)(log b - log d)) d tau at tau = t
    lt, lb, lc, ld = math.log(t), math.log(b), math.log(c), math.log(d)
    return t * (lc * (ld - lt + 1) - ld * lt + ld + lt * lt - 2 * lt + 2) / ((lb - lc) * (lb - ld))


def deis_weights(i: int, sigmas: Sequence[float], order: int) -> list[float]:
    """DEIS tAB weights on eps_{i-k} = (z_{i-k} - D_{i-k}) / t_{i-k}: z_{i+1} = z_i + sum_k w_k eps_{i-k}
    (Lagrange interpolation of eps in log sigma, integrated exactly in sigma; Zhang & Chen 2023)."""
    t_next, s0 = sigmas[i + 1], sigmas[i]
    if order == 1:
        return [t_next - s0]
    if order == 2:
        s1 = sigmas[i - 1]
        return [_deis_ind2(t_next, s0, s1) - _deis_ind2(s0, s0, s1), _deis_ind2(t_next, s1, s0) - _deis_ind2(s0, s1, s0)]
    s1, s2 = sigmas[i - 1], sigmas[i - 2]
    return [_deis_ind3(t_next, s0, s1, s2) - _deis_ind3(s0, s0, s1, s2),
            _deis_ind3(t_next, s1, s2, s0) - _deis_ind3(s0, s1, s2, s0),
            _deis_ind3(t_next, s2, s0, s1) - _deis_ind3(s0, s2, s0, s1)]


def _deis_step(max_order: int):
    def build(i: int, sigmas: Sequence[float], r: int) -> Step:
        order = _order(i, len(sigmas) - 1, sigmas[i + 1], max_order)
        if sigmas[i + 1] == 0:
            anchor: Terms = ((f"D{i}", 1.0),)  # Euler to sigma = 0
        else:
            anchor = merge_terms((1.0, ((f"z{i}", 1.0),)),
                                 *[(w, slope(i - k, sigmas)) for k, w in enumerate(deis_weights(i, sigmas, order))])
        return _linear_step(i, sigmas, r, (Denoise(f"D{i}", f"z{i}", sigmas[i]),), anchor, f"z{i}")
    return build


def dpmpp_weights(i: int, sigmas: Sequence[float], order: int) -> tuple[float, list[float]]:
    """DPM-Solver++ multistep (midpoint 2nd order, 3rd order as Lu et al. 2022 / diffusers):
    z_{i+1} = a z_i + sum_k w_k D_{i-k}; returns (a, w)."""
    t, t_next = sigmas[i], sigmas[i + 1]
    ratio = t_next / t
    if order == 1 or t_next == 0:
        return ratio, [1.0 - ratio]
    h = math.log(t / t_next)
    phi1 = 1.0 - ratio  # 1 - e^{-h}
    r0 = math.log(sigmas[i - 1] / t) / h
    if order == 2:
        return ratio, [phi1 * (1 + 0.5 / r0), -phi1 * 0.5 / r0]
    r1 = math.log(sigmas[i - 2] / sigmas[i - 1]) / h
    c1 = (ratio - 1.0) / h + 1.0  # ((e^{-h} - 1) / h + 1)
    c2 = (ratio - 1.0 + h) / (h * h) - 0.5
    # D1_0 = (D0 - D1) / r0, D1_1 = (D1 - D2) / r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), Dd = (D1_0 - D1_1)/(r0+r1)
    d10 = {0: 1 / r0, 1: -1 / r0}
    d11 = {1: 1 / r1, 2: -1 / r1}
    diff = {k: d10.get(k, 0.0) - d11.get(k, 0.0) for k in range(3)}
    d1 = {k: d10.get(k, 0.0) + r0 / (r0 + r1) * diff[k] for k in range(3)}
    d2 = {k: diff[k] / (r0 + r1) for k in range(3)}
    return ratio, [phi1 * (k == 0) + c1 * d1[k] - c2 * d2[k] for k in range(3)]


def _dpmpp_anchor(i: int, sigmas: Sequence[float], order: int) -> Terms:
    a, w = dpmpp_weights(i, sigmas, order)
    return merge_terms((1.0, ((f"z{i}", a),)), *[(wk, ((f"D{i - k}", 1.0),)) for k, wk in enumerate(w)])


def _dpmpp_step(max_order: int):
    def build(i: int, sigmas: Sequence[float], r: int) -> Step:
        order = _order(i, len(sigmas) - 1, sigmas[i + 1], max_order)
        anchor = _dpmpp_anchor(i, sigmas, order)
        return _linear_step(i, sigmas, r, (Denoise(f"D{i}", f"z{i}", sigmas[i]),), anchor, f"z{i}")
    return build


def _unipc_rhos(h: float, rks: list[float], order: int, corrector: bool, variant: str) -> tuple[list[float], float]:
    """UniPC's rho vector and B(h) (Zhao et al. 2023, data prediction) for the given order."""
    import torch

    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial, b = 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.tensor([[rk ** (m) for rk in rks] for m in range(order)], dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)
    if corrector:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    return rhos, b_h


def _unipc_update(x: str, i: int, j_next_sigma: float, sigmas: Sequence[float], order: int, variant: str,
                  corrector: bool, model_t: str | None = None) -> Terms:
    """x_t = (t'/t) x + (1 - t'/t) D_i - B(h) (sum_k rho_k (D_{i-k} - D_i)/r_k [+ rho_last (D_t - D_i)])."""
    t, t_next = sigmas[i], j_next_sigma
    ratio = t_next / t
    terms: list[tuple[float, Terms]] = [(1.0, ((x, ratio),)), (1.0 - ratio, ((f"D{i}", 1.0),))]
    if order == 1 and not corrector:
        return merge_terms(*terms)
    h = math.log(t / t_next)
    rks = [(math.log(sigmas[i] / sigmas[i - k])) / h for k in range(1, order)] + [1.0]
    rhos, b_h = _unipc_rhos(h, rks, order, corrector, variant)
    for k in range(1, order):
        terms.append((-b_h * rhos[k - 1] / rks[k - 1], ((f"D{i - k}", 1.0), (f"D{i}", -1.0))))
    if corrector:
        terms.append((-b_h * rhos[-1], ((model_t, 1.0), (f"D{i}", -1.0))))
    return merge_terms(*terms)


def _unipc_step(max_order: int, variant: str = "bh2"):
    def build(i: int, sigmas: Sequence[float], r: int) -> Step:
        n = len(sigmas) - 1

        def order_at(j: int) -> int:  # diffusers: min(solver_order, N - j), warm-up min(., j + 1)
            return 1 if sigmas[j + 1] == 0 else min(max_order, n - j, j + 1)

        ops: list[Op] = [Denoise(f"D{i}", f"z{i}", sigmas[i])]
        start = f"z{i}"
        if i > 0:  # UniC: correct z_i with D_i (no extra call), from the previous step's start
            prev = "z0" if i == 1 else f"zc{i - 1}"
            ops.append(Combine(f"zc{i}", _unipc_update(prev, i - 1, sigmas[i], sigmas, order_at(i - 1), variant,
                                                       True, f"D{i}")))
            start = f"zc{i}"
        anchor = _unipc_update(start, i, sigmas[i + 1], sigmas, order_at(i), variant, False)
        return _linear_step(i, sigmas, r, tuple(ops), anchor, start)
    return build


for _name, _spec in {
    "deis-2": ("one", _deis_step(2)), "deis-3": ("one", _deis_step(3)),
    "dpm-solver++3m": ("one", _dpmpp_step(3)),
    "unipc-2": ("one", _unipc_step(2)), "unipc-3": ("one", _unipc_step(3)),
}.items():
    SOLVERS[_name] = SolverSpec(_name, _spec[0], _spec[1], False, _name, "edm", fixed_r=0)
    # IIA variant: the correction basis with r history terms (UniPC's steps integrate from the corrected state)
    SOLVERS["iia-" + _name] = SolverSpec("iia-" + _name, _spec[0], _spec[1], True, _name, "edm")
