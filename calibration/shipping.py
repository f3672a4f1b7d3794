"""The shipping rule: may a candidate ship instead of its own base solver? One definition, used by the held-out
guard of local IIA fits (`fit.guard_end_to_end`) and by the `auto` search (`search_choice.choose`).

A candidate is judged on the held-out noises against its OWN base (same family, final step and time steps for a
local fit; Karras with base coefficients for the search) by the per-noise squared errors of both on the SAME
noises. It is eligible only when the one-sided `level` upper bound of RMSE(candidate) / RMSE(base), from a paired
bootstrap over the noises, is at most 1 + TOLERANCE, and the paired mean test of the squared-error differences
passes at the same level (`mean_gain_significant`): a better median or a better mean that a few noises could
undo does not ship. The test metric is the RMSE, whose square is a mean over noises: a candidate that trades a
heavier tail for a better bulk (the median) has a wide interval, and the bound refuses it unless the held-out
noises show the gain to be robust. The base itself is always eligible (its ratio is exactly 1 on every resample).

The bootstrap is seeded (BOOTSTRAP_SEED): the same errors give the same verdict in every run and process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVEL = 0.95  # one-sided confidence of the upper bound (CalibrationOptions.guard_level overrides it)
TOLERANCE = 0.0  # allowed excess of the upper bound over 1 (0: the gain must be significant at `level`)
RESAMPLES = 2000
# Noises per resample, at most: the size of a fresh evaluation (iia-accuracy's 500 test noises). With more
# held-out noises than that, the bound is that of the ratio on a fresh set of FRESH_NOISES (an m-out-of-n
# bootstrap): a gain carried by a few rare noises, which a fresh set of that size may hold none of or more of,
# does not ship. With fewer, resamples are as large as the held-out set (the usual, wider, bootstrap).
FRESH_NOISES = 500
BOOTSTRAP_SEED = 0
_CHUNK = 250  # resamples drawn at a time: bounds the index matrix to _CHUNK x n


@dataclass(frozen=True)
class Verdict:
    """RMSE(candidate) / RMSE(base) on the held-out noises (`ratio`), its one-sided `level` paired-bootstrap
    upper bound (`upper`), the paired mean test (`mean_gain`) and whether the candidate may ship (`eligible`:
    upper <= 1 + `tolerance` and mean_gain)."""

    ratio: float
    upper: float
    mean_gain: bool
    level: float
    tolerance: float
    eligible: bool

    def record(self) -> dict:
        """JSON-ready numbers for the guard's record (coefficients.json `guard`, the search table)."""
        return {"ratio_to_base": self.ratio, "ratio_upper": self.upper, "mean_gain": self.mean_gain,
                "level": self.level, "tolerance": self.tolerance, "eligible": self.eligible}


def _ratio(sum_cand: torch.Tensor, sum_base: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_cand / sum_base), 1 where both are 0 (a candidate as exact as an exact base), inf where only the
    base is 0."""
    out = (sum_cand / sum_base).sqrt()
    out = torch.where(sum_base > 0, out, torch.where(sum_cand > 0, torch.inf, 1.0))
    return out


def bootstrap_rmse_ratios(sq_a: torch.Tensor, sq_b: torch.Tensor, resamples: int = RESAMPLES,
                          seed: int = BOOTSTRAP_SEED, size: int | None = None) -> torch.Tensor:
    """float64 [resamples]: RMSE(a) / RMSE(b) on `resamples` paired bootstrap resamples of `size` noises (None: n),
    from
    per-noise mean squared errors `sq_a`, `sq_b` (float [n], the same n noises in the same order), drawn by a
    generator seeded with `seed` (the global one never enters). ValueError when the shapes differ or n < 2."""
    sq_a, sq_b = sq_a.to(torch.float64).reshape(-1), sq_b.to(torch.float64).reshape(-1)
    n = sq_a.numel()
    if sq_b.numel() != n or n < 2:
        raise ValueError(f"shipping rule: need the same >= 2 held-out noises for candidate and base, "
                         f"got {n} and {sq_b.numel()}")
    gen = torch.Generator().manual_seed(seed)
    ratios = []
    for start in range(0, resamples, _CHUNK):
        idx = torch.randint(0, n, (min(_CHUNK, resamples - start), size or n), generator=gen)
        ratios.append(_ratio(sq_a[idx].sum(1), sq_b[idx].sum(1)))
    return torch.cat(ratios)


def rmse_ratio_upper(sq_cand: torch.Tensor, sq_base: torch.Tensor, level: float = LEVEL,
                     resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """(ratio, upper): RMSE(cand) / RMSE(base) and the one-sided `level` upper bound of its paired bootstrap
    (`bootstrap_rmse_ratios` on resamples of min(n, FRESH_NOISES) noises)."""
    ratios = bootstrap_rmse_ratios(sq_cand, sq_base, resamples, seed, min(sq_cand.numel(), FRESH_NOISES))
    ratio = float(_ratio(sq_cand.to(torch.float64).sum(), sq_base.to(torch.float64).sum()))
    return ratio, float(torch.quantile(ratios, level, interpolation="higher"))  # "higher": no inf - inf


def mean_gain_significant(sq_cand: torch.Tensor, sq_base: torch.Tensor, level: float = LEVEL) -> bool:
    """The paired test of the guard before issue 24, one-sided at `level`: mean(d) + z se(d) <= 0 for the per-noise
    differences d = sq_cand - sq_base (True for a candidate equal to its base). Where the base errs hugely on a few
    noises that the candidate fixes, the bootstrap ratio (whose resamples nearly all hold one of them) passes while
    se(d) stays large: a gain carried by a few noises (digits, iia-edm NFE 25: 0.22x on 256 held-out noises,
    1.08x on the test noises) does not ship."""
    d = (sq_cand.to(torch.float64) - sq_base.to(torch.float64)).reshape(-1)
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(level, dtype=torch.float64)))
    return float(d.mean()) + z * float(d.std()) / d.numel() ** 0.5 <= 0.0


def rule_text(level: float, tolerance: float, against: str) -> str:
    """The rule as recorded (coefficients.json `guard.rule`, the search's and the local guard's alike): both tests
    at `level` against `against` (what the candidate's rmse is divided by)."""
    return (f"eligible only if the {level:g} one-sided paired-bootstrap upper bound of rmse / {against} is "
            f"<= {1 + tolerance:g} and the {level:g} one-sided paired mean test of the per-noise squared-error "
            f"differences shows a gain (calibration/shipping.py)")


def judge(sq_cand: torch.Tensor, sq_base: torch.Tensor, level: float = LEVEL,
          tolerance: float = TOLERANCE) -> Verdict:
    """The shipping rule's verdict on a candidate against its own base (see the module docstring): the bootstrap
    bound AND the paired mean test (`mean_gain_significant`) must pass."""
    ratio, upper = rmse_ratio_upper(sq_cand, sq_base, level)
    mean_gain = mean_gain_significant(sq_cand, sq_base, level)
    return Verdict(ratio, upper, mean_gain, level, tolerance, upper <= 1.0 + tolerance and mean_gain)
