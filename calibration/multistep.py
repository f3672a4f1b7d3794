"""Multistep exponential-integrator solver families (DEIS, DPM-Solver++(2M/3M), UniPC) as `Step` builders."""

from __future__ import annotations

import math
from typing import Sequence

from iia.runtime.program import Combine, Denoise, Op, Terms, merge_terms

from .steps import Step, slope


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


def deis_step(max_order: int):
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


def dpmpp_anchor(i: int, sigmas: Sequence[float], order: int) -> Terms:
    a, w = dpmpp_weights(i, sigmas, order)
    return merge_terms((1.0, ((f"z{i}", a),)), *[(wk, ((f"D{i - k}", 1.0),)) for k, wk in enumerate(w)])


def dpmpp_step(max_order: int):
    def build(i: int, sigmas: Sequence[float], r: int) -> Step:
        order = _order(i, len(sigmas) - 1, sigmas[i + 1], max_order)
        anchor = dpmpp_anchor(i, sigmas, order)
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


def unipc_step(max_order: int, variant: str = "bh2"):
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
