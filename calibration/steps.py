"""Solvers as data: a `Program` is a prelude `z0 = sigma_0 * noise` and `Step`s; each step holds denoiser calls
and fixed combinations (`ops`) and ONE update `z_{i+1} = anchor + sum_j c_j * basis_j` whose coefficients are
data (the base solver's, or fitted ones). `Program.plan()` is the flat form the one executor runs
(`iia.runtime.program`). The solver families that build steps are in `solvers.py` and `multistep.py`.

Value names: `z{i}` states, `D{i}` = D(z_i; t_i), `zt{i}` Heun's predicted state at t_i and `Dt{i}` its
denoised value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from iia.runtime.program import Combine, Denoise, Op, Plan, Terms, Update


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


def slope(j: int, sigmas: Sequence[float]) -> Terms:
    """d_j = (z_j - D_j) / t_j."""
    return ((f"z{j}", 1.0 / sigmas[j]), (f"D{j}", -1.0 / sigmas[j]))
