"""What the `auto` search chooses among: solver families x final step x schedule x coefficients, its options,
the candidates, and the monotone parametrisation of learned schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from iia.models.base import Denoiser

from .schedules import karras_sigmas
from .solvers import Program, get_solver

FAMILIES = ("ipndm", "deis-3", "unipc-3", "dpm-solver++3m", "unipc-2", "deis-2")
RHO = 7.0


class SearchError(ValueError):
    pass


@dataclass
class SearchOptions:
    # wall-clock bound of the whole search, references included; None: bounded by evaluation counts only
    # (`max_evals` per schedule, `max_iter` L-BFGS iterations per global fit), the same on every machine
    budget_s: float | None = 180.0
    batch: int | None = None  # calibration noises for schedules and global fits (None: 512 analytic, 128 networks)
    families: tuple[str, ...] = FAMILIES
    finals: tuple[str, ...] = ("zero", "sigma_min")
    top_k: int = 2  # (family, final) pairs that get a learned schedule
    global_fits: int = 2  # global coefficient fits: the best learned schedule, the best Karras base, then more learned
    # what global fits fit: "both", each in its family's basis and then the lead (the first fitted) in the linear
    # form too where the time left affords it; "linear", all in the linear form; "family", all in their bases.
    # The linear form: each state any combination of the noise and all denoiser outputs so far
    # (`solvers.linear_step`). Its held-out RMSE against the family basis's (same schedule and noises, 2000
    # held-out noises): digits NFE 9 iPNDM 0.66-0.73x, gmm NFE 7 0.75x, but digits NFE 5 UniPC-3 1.04x and gmm
    # NFE 9 iPNDM 1.27-1.31x (every window of history terms): neither wins everywhere, the held-out noises choose
    basis: str = "both"
    # history terms of the local fit's and the "family" global fits' basis: 3 gives every family >= 4 terms, as
    # iPNDM has at any r <= 3 (digits NFE 5, learned schedules: UniPC-3's and DEIS-3's global fits 5-23% lower
    # held-out RMSE than at r = 1)
    r: int = 3
    loss: str = "mse"
    local: bool = True  # also score the paper's local IIA fit (families that support it, Karras)
    max_evals: int = 400  # Nelder-Mead evaluations per schedule
    max_iter: int = 60  # L-BFGS iterations per global fit
    rounds: int = 6  # fit rounds, each on fresh calibration noises, the first included (`search_rounds`)

    def validate(self) -> None:
        if self.budget_s is not None and self.budget_s <= 0:
            raise SearchError(f"--budget must be > 0 seconds, got {self.budget_s}")
        if self.batch is not None and self.batch < 2:
            raise SearchError(f"search batch must be >= 2, got {self.batch}")
        if self.basis not in ("both", "linear", "family"):
            raise SearchError(f"global fit basis must be 'both', 'linear' or 'family', got {self.basis!r}")
        if self.loss not in ("mse", "l2"):
            raise SearchError(f"search loss must be 'mse' or 'l2', got {self.loss!r}")
        if self.rounds < 1:
            raise SearchError(f"rounds must be >= 1 (the first round's fits), got {self.rounds}")
        if self.max_evals < 1 or self.max_iter < 1:
            raise SearchError(f"max_evals and max_iter must be >= 1, got {self.max_evals} and {self.max_iter}")
        for f in self.families:
            spec = get_solver(f)
            if spec.fitted or spec.nfe_rule != "one":
                raise SearchError(f"search family '{f}' must be a base solver with one denoiser call per step")


@dataclass
class Candidate:
    family: str
    final: str
    schedule: str  # karras | learned
    coefficients: str  # base | local | global | linear (a global fit in the linear form)
    program: Program
    calib_loss: float | None = None
    holdout: dict = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    round: int = 1  # the fit round whose calibration noises fitted it (`search_rounds`); 1 for bases
    # a fit's evaluations, a refinement's on m noises counted m / (the first round's) each: what its `seconds`
    # bought (`search_rounds.refine_fits` scales by it)
    evals: int = 0

    @property
    def label(self) -> str:
        """family/final/schedule/coefficients, with #k for a fit of round k >= 2."""
        tail = f"#{self.round}" if self.round > 1 else ""
        return f"{self.family}/{self.final}/{self.schedule}/{self.coefficients}{tail}"


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

    def jump_theta(self, first: float) -> list[float]:
        """The theta of a schedule that steps from sigma_max to `first` and on by the Karras schedule from
        `first` down to sigma_min (the remainder of final "zero" as in `karras_theta`): Nelder-Mead's start
        (`learn_schedule`). A network's learned schedules jump: digits NFE 5 UniPC-3 80 -> 3.03, Karras 24.4."""
        if first >= self.sigma_max:
            return self.karras_theta()
        n = self.n_steps if self.final == "sigma_min" else self.n_steps - 1
        rest = [first] if n < 2 else karras_sigmas(n, self.sigma_min, first, self.rho).tolist()[:-1]
        if self.final == "sigma_min":
            return self.theta_of([self.sigma_max] + rest)
        return self.theta_of([self.sigma_max] + rest + [0.0])[:-1] + [-9.0]

    def theta_of(self, sigmas) -> list[float]:
        """The theta whose sigmas are `sigmas` (a schedule of this space, e.g. a jump start); a gap below 1e-12
        of the first (a zero remainder) is taken as that."""
        t_min = self.sigma_min ** (1 / self.rho)
        t = [float(s) ** (1 / self.rho) for s in sigmas if s > 0]
        gaps = [a - b for a, b in zip(t, t[1:])] + ([] if self.final == "sigma_min" else [t[-1] - t_min])
        return [math.log(max(g, 1e-12 * gaps[0]) / gaps[0]) for g in gaps[1:]]


def own_base(c: Candidate, cands: list[Candidate]) -> Candidate:
    """`c`'s own base among `cands` (the shipping rule's reference): its family and final step on the Karras
    schedule with base coefficients."""
    return next(b for b in cands if (b.family, b.final, b.schedule, b.coefficients)
                == (c.family, c.final, "karras", "base"))


def schedule_space(denoiser: Denoiser, solver: str, nfe: int, final: str) -> ScheduleSpace:
    n = get_solver(solver).steps_for_nfe(nfe)
    return ScheduleSpace(n, denoiser.sigma_min, denoiser.sigma_max, final, getattr(denoiser, "rho", RHO))
